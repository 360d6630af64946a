"""Fixtures shared by the quantized-engine tests of this folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import TinyBuilds, corpus_text, tiny_config


@pytest.fixture(scope="module")
def ckpt(tiny_builds: TinyBuilds) -> Path:
    """The tiny HF checkpoint the quantization tests build engines of (tiny_builds caches it by config and seed)."""
    return tiny_builds.hf_checkpoint(tiny_config(), seed=5)


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibration text: the tiny corpus, as a file (CALIB=)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(corpus_text())
    return path
