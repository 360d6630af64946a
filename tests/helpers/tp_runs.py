"""Running a tensor-parallel engine's ranks for the tests: each rank a process of tp_rank.py under
`.venv/bin/mpiexec` (a TP=1 engine as one plain process), rank 0's results read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

NEW_TOKENS = 16
PROMPT_LENGTHS = (7, 23)
RANK_SCRIPT = Path(__file__).with_name("tp_rank.py")


def prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 640, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def run_ranks(engine: Path, batch: list[list[int]], tmp: Path, ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """(prefill logits [batch, longest, vocab], greedy tokens [batch, NEW_TOKENS]) from rank 0."""
    (tmp / "prompts.json").write_text(json.dumps(batch))
    out = tmp / f"{engine.name}.npz"
    command = [sys.executable, str(RANK_SCRIPT), str(engine), str(out), str(tmp / "prompts.json"), str(NEW_TOKENS)]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *command]
    subprocess.run(command, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = np.load(out)
    return result["prefill"], result["tokens"]


def assert_tp2_computes_what_tp1_computes(sharded: Path, single: Path, tmp: Path, seed: int, atol: float,
                                          case: str) -> None:
    """The TP=2 engine's prefill logits within `atol` of the TP=1 engine's on `prompts(seed)`, and its
    greedy tokens identical."""
    batch = prompts(seed)
    tp_logits, tp_tokens = run_ranks(sharded, batch, tmp, 2)
    one_logits, one_tokens = run_ranks(single, batch, tmp, 1)
    for b, p in enumerate(batch):
        diff = np.abs(tp_logits[b, :len(p)] - one_logits[b, :len(p)]).max()
        print(f"{case} prompt {b}: max |TP=2 - TP=1| = {diff:.3e}")
        assert diff <= atol, f"{case} prompt {b}: TP=2 prefill logits differ from TP=1 by {diff:.2e}"
    np.testing.assert_array_equal(tp_tokens, one_tokens)
