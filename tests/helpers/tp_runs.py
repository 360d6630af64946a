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
