"""The tensor-parallel runner on the engine core's other paths, against the TP=1 engine of the same
checkpoint: n > 1 and beam search (a fork's block copies go to the other rank in the step plan),
prefix caching (block tables shared across sequences), context logits, speculative decoding, and
the chunked prefill of a prompt longer than a step's token budget.

The TP=2 engine runs in orchestrator mode (rank 0 spawns rank 1 through MPI_Comm_spawn) in a
subprocess, so MPI never starts in the test process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from tp_engines import tp_engine

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig, SpeculativeConfig
    from llamaforge.runtime.core.engine_core import EngineCore, run_to_completion
    from llamaforge.runtime.core.requests import GenerationRequest
    from llamaforge.runtime.core.sampling import SamplingParams

    shared = list(range(3, 3 + 40))  # 2 full blocks and a partial one, shared by two prompts
    def requests():
        return [
            GenerationRequest("n3", [7, 8, 9, 10, 11] * 5, 12, SamplingParams(temperature=1.0, seed=5), n=3),
            GenerationRequest("beam", [21, 22, 23, 24, 25, 26, 27], 10, beam_width=3, n=2),
            GenerationRequest("ctx", [5, 9, 33, 2, 17, 40], 6, return_context_logits=True),
            GenerationRequest("long", list(range(100, 190)), 8),  # 90 tokens: chunked at 32 a step
        ]
    def later():
        return [GenerationRequest("p1", shared + [400, 401], 8), GenerationRequest("p2", shared + [500], 8)]

    result = {}
    for name, engine in (("tp1", sys.argv[1]), ("tp2", sys.argv[2])):
        for spec in (False, True):
            config = CoreConfig(KVCacheConfig(budget_tokens=1024), SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32),
                                threads=1, speculative=SpeculativeConfig("ngram") if spec else SpeculativeConfig())
            core = EngineCore(engine, config)
            outs = run_to_completion(core, requests()) + run_to_completion(core, later())
            hits = core.stats()["prefix_cache_hit_tokens"] if "prefix_cache_hit_tokens" in core.stats() else None
            core.stop()
            result[f"{name}{'-spec' if spec else ''}"] = {
                "tokens": [[o.request_id, o.sequence_index, o.token_ids] for o in outs],
                "context": [o.context_logits.tolist() for o in outs if o.context_logits is not None],
                "hits": hits,
            }
    print("RESULT " + json.dumps(result))
""")


@pytest.fixture(scope="module")
def result(tiny_builds: Any, tiny_hf_checkpoint: Path, tiny_engine: Path) -> dict[str, Any]:
    tp2 = tp_engine(tiny_builds, tiny_hf_checkpoint, size=2)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_engine), str(tp2)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return dict(json.loads(line[len("RESULT "):]))


@pytest.mark.parametrize("spec", ["", "-spec"], ids=["plain", "speculative"])
def test_every_path_gives_the_tp1_tokens(result: dict[str, Any], spec: str) -> None:
    tp1, tp2 = result["tp1" + spec], result["tp2" + spec]
    assert [r for r, _, _ in tp1["tokens"]].count("n3") == 3 and [r for r, _, _ in tp1["tokens"]].count("beam") == 2
    assert tp2["tokens"] == tp1["tokens"]
    assert tp1["hits"] > 0  # p2 found p1's full blocks
    assert tp2["hits"] == tp1["hits"]


def test_context_logits_match_tp1(result: dict[str, Any]) -> None:
    import numpy as np

    (a,), (b,) = result["tp1"]["context"], result["tp2"]["context"]
    assert np.asarray(a).shape == np.asarray(b).shape == (6, 640)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4
