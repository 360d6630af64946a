"""Tensor-parallel engines for the runtime's tests (a helper module, not a test file).

    tp_dir = tp_engine(tiny_builds, checkpoint, size=2)     # `llamaforge build --tp 2`, built once

The one place the serving and Triton tests get a TP engine from (the layout of
docs/tensor_parallel.md: rank{i}/ with each rank's graph and manifest, the top-level manifest with
`tensor_parallel`). Until the build had `--tp`, this module made a stand-in from a TP=1 engine (its
graph on every rank with all-reduces added, logits cut per rank); it now builds the real,
Megatron-sharded engine through the session's `TinyBuilds`, so each distinct engine is built once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["tp_engine"]


def tp_engine(builds: Any, checkpoint: Path, size: int = 2) -> Path:
    """The fp32 ONNX Runtime engine of `checkpoint` built with TP=`size`."""
    return Path(builds.engine(checkpoint, tp=size))
