"""runtime/core/host_memory.py: the step loop's vocabulary-sized arrays reuse memory the process
already has, instead of faulting fresh pages in every step."""

from __future__ import annotations

import os
import resource
import sys

import numpy as np
import pytest

from llamaforge.runtime.core import host_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc's thresholds: Linux only")
def test_a_vocabulary_sized_array_made_every_step_faults_no_new_pages() -> None:
    if any(os.environ.get(name) for name in (*host_memory._ENV_TUNING, "LLAMAFORGE_MALLOC_DEFAULTS")):
        pytest.skip("this environment tunes malloc itself; retain_freed_memory leaves it alone")
    assert host_memory.retain_freed_memory(), "glibc's mallopt should take the thresholds on this host"
    logits = np.random.default_rng(0).standard_normal(128256).astype(np.float32)

    def step() -> int:  # what a sampled pick allocates: a widened copy, a scaled one, a CDF (1 MB each)
        x = logits.astype(np.float64)
        y = x / 0.8
        return int(np.searchsorted(np.cumsum(y), 0.0))

    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # Fresh pages would be 3 x 256 faults a step (4 KiB pages); retained memory needs none.
    assert faults < 50, faults


def test_an_environment_that_tunes_malloc_itself_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for env in ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "LLAMAFORGE_MALLOC_DEFAULTS"):
        monkeypatch.setattr(host_memory, "_applied", None)
        monkeypatch.setenv(env, "glibc.malloc.trim_threshold=0" if env == "GLIBC_TUNABLES" else "1")
        assert host_memory.retain_freed_memory() is False, env
        monkeypatch.delenv(env)
