"""Session fixtures: the tiny checkpoints and engines several test modules read, built once per
pytest session under `tmp_path_factory` (the helpers that make them live in tests/helpers/tiny_models.py).

Everything these fixtures hand out is shared by every test of the session, so tests only read it: a
test that edits a checkpoint or an engine copies it first (tests/export/test_checkpoint.py's `_copy`).

    tiny_hf_checkpoint    tiny_config(), seed 0: HF layout, fp32, >= 2 safetensors shards + tokenizer.json
    tiny_engine           the fp32 ONNX Runtime engine of tiny_hf_checkpoint (default BuildOptions)
    tiny_builds           any other tiny HF checkpoint or engine, built once per distinct set of arguments:
                          tiny_builds.hf_checkpoint(tiny_config(), seed=5), tiny_builds.engine(ckpt, precision="fp8")
    tiny_mllama_checkpoint  tiny_mllama.make_mllama_checkpoint, with the Llama 3.2 Vision Instruct chat template
    tiny_mllama_engine      its engine directory (model.onnx + vision.onnx, default BuildOptions)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tiny_models import TinyBuilds

# tiny_models (torch, transformers) is imported where a fixture first builds, so a session that uses
# none of these fixtures (runtime-only tests) never loads it.


@pytest.fixture(scope="session")
def tiny_builds(tmp_path_factory: pytest.TempPathFactory) -> TinyBuilds:
    from tiny_models import TinyBuilds

    return TinyBuilds(tmp_path_factory.mktemp("tiny-builds"))


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tiny_builds: TinyBuilds) -> Path:
    from tiny_models import tiny_config

    return tiny_builds.hf_checkpoint(tiny_config(), seed=0)


@pytest.fixture(scope="session")
def tiny_engine(tiny_builds: TinyBuilds, tiny_hf_checkpoint: Path) -> Path:
    return tiny_builds.engine(tiny_hf_checkpoint)


@pytest.fixture(scope="session")
def tiny_mllama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mllama_chat_template import LLAMA32_VISION_CHAT_TEMPLATE
    from tiny_mllama import make_mllama_checkpoint

    return make_mllama_checkpoint(tmp_path_factory.mktemp("mllama") / "ckpt", chat_template=LLAMA32_VISION_CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_mllama_engine(tiny_mllama_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llamaforge.build.builder import BuildOptions, build_engine

    return build_engine(BuildOptions(checkpoint=tiny_mllama_checkpoint, out=tmp_path_factory.mktemp("mllama-engine") / "engine"))
