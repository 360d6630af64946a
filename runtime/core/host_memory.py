"""Host memory of the serving process: keep what the step loop frees for its next step.

Each step makes arrays of the vocabulary's size per row (the logits row widened to float64, the
scaled logits, the CDF a token is drawn from: 1 MB each at Llama 3's 128256 tokens). glibc's
malloc serves such sizes with fresh mmap'ed pages or trims them off the heap once freed, so every
step faults them in again: about 470 page faults per sampled token, which made a sampled pick cost
2.3 ms where its arithmetic costs 0.7 ms. Raising malloc's mmap and trim thresholds keeps that
memory in the process (what PyTorch's CPU inference guides get by preloading jemalloc or tcmalloc).

`retain_freed_memory()` is called by the engine core; it leaves malloc alone where the environment
already tunes it (GLIBC_TUNABLES, MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, or
LLAMAFORGE_MALLOC_DEFAULTS=1) and off glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["retain_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2): bigger arrays still get their own mapping
TRIM_THRESHOLD = 128 << 20  # free memory the heap keeps before giving any back
_ENV_TUNING = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Raise glibc malloc's mmap and trim thresholds, once per process; whether they are raised."""
    global _applied
    if _applied is None:
        _applied = False
        if (sys.platform.startswith("linux") and os.environ.get("LLAMAFORGE_MALLOC_DEFAULTS") != "1"
                and not any(os.environ.get(name) for name in _ENV_TUNING)):
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                return False
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
