"""Timing shared by the bench scripts."""

from __future__ import annotations

import time
from collections.abc import Callable


def call_times(fn: Callable[[], object], repeat: int) -> list[float]:
    """Seconds taken by each of `repeat` calls of `fn`, after one untimed warm-up call (the first
    ONNX Runtime run of a shape allocates)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times
