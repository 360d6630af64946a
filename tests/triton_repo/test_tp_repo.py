"""`make repo ENGINE=<tensor-parallel engine>`: the repository deploys as tensorrtllm_backend's
orchestrator mode (triton_repo/README.md): one `llama` instance, rank 0, spawns the other ranks.

The Python models run against the stand-in for `triton_python_backend_utils`
(tests/helpers/pb_utils_standin.py) in a subprocess: rank 0 initialises MPI there and spawns the
other rank, which must not happen inside the test process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import text_format
from tp_engines import tp_engine
from tritonclient.grpc import model_config_pb2 as mc

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
from llamaforge.triton_repo.repository import RepoError, RepoOptions, write_repo

CORE = CoreConfig(KVCacheConfig(budget_tokens=2048), SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=128),
                  threads=1)
PROMPTS = ["def main(args):\n", "import os\nimport sys\n\nclass Config:"]

STANDIN_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    import pb_utils_standin as pb
    pb.install()
    texts = {}
    for repo in sys.argv[3:]:
        server = pb.StandInServer(repo)
        try:
            for prompt in json.loads(sys.argv[2]):
                for model in ("ensemble", "bls"):
                    call = server.infer(model, {"text_input": np.array([[prompt.encode()]], dtype=np.object_),
                                                "max_tokens": np.array([[24]], dtype=np.int32)}).wait(120)
                    assert not call.errors, [e.message() for e in call.errors]
                    texts.setdefault(repo, []).append(b"".join(bytes(o["text_output"][0]) for o in call.outputs).decode())
        finally:
            server.stop()
    print("TEXTS " + json.dumps(texts))
""")


@pytest.fixture(scope="module")
def tp2_engine(tiny_builds: Any, tiny_hf_checkpoint: Path) -> Path:
    return tp_engine(tiny_builds, tiny_hf_checkpoint, size=2)


def test_tp_repository_is_one_llama_instance_with_mpi_requirements(tp2_engine: Path, tmp_path: Path) -> None:
    repo = write_repo(RepoOptions(engine=tp2_engine, out=tmp_path / "tp", device="cpu", core=CORE))
    cfg = text_format.Parse((repo / "llama" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.parameters["tensor_parallel_size"].string_value == "2"
    assert [g.count for g in cfg.instance_group] == [1]
    requirements = (repo / "llama" / "1" / "requirements.txt").read_text().split()
    for dist in ("mpi4py==", "mpich==", "onnxruntime-extensions=="):
        assert any(r.startswith(dist) for r in requirements), requirements
    with pytest.raises(RepoError, match="INSTANCES=2"):
        write_repo(RepoOptions(engine=tp2_engine, out=tmp_path / "tp2", device="cpu", core=CORE, instances=2))


def test_tp_repository_answers_as_the_tp1_one(tp2_engine: Path, tiny_engine: Path, tmp_path: Path) -> None:
    tp1 = write_repo(RepoOptions(engine=tiny_engine, out=tmp_path / "tp1", device="cpu", core=CORE))
    tp2 = write_repo(RepoOptions(engine=tp2_engine, out=tmp_path / "tp2", device="cpu", core=CORE))
    helpers = Path(__file__).resolve().parents[1] / "helpers"
    proc = subprocess.run([sys.executable, "-c", STANDIN_SCRIPT, str(helpers), json.dumps(PROMPTS), str(tp1), str(tp2)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("TEXTS "))
    texts = json.loads(line[len("TEXTS "):])
    assert all(texts[str(tp1)]), texts
    assert texts[str(tp2)] == texts[str(tp1)]
