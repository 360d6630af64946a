"""A Triton model repository of a Llama 3.2 Vision engine (`make repo`): the ensemble and `bls` take
TensorRT-LLM's multimodal image inputs and hand them to `llama`, run in-process against the
pb_utils STAND-IN (tests/helpers/pb_utils_standin.py; a real Triton server cannot run here). The
answers equal the engine core's own for the same request (the core itself is compared with
transformers in tests/runtime/test_mllama_serving.py)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pb_utils_standin as pb
import pytest
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2 as mc

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
from llamaforge.runtime.core.engine_core import run_to_completion
from llamaforge.runtime.core.mllama_image import ImageInput
from llamaforge.runtime.core.requests import GenerationRequest
from llamaforge.runtime.core.sampling import SamplingParams
from llamaforge.triton_repo.repository import RepoOptions, write_repo

pb.install()

NEW = 16
PROMPT = "Look at this:<|image|> it is a"


def png(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(tiny_mllama_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    core = CoreConfig(KVCacheConfig(budget_tokens=1024), SchedulerConfig(max_num_seqs=4), threads=1)
    repo = write_repo(RepoOptions(engine=tiny_mllama_engine, out=tmp_path_factory.mktemp("repos") / "mllama",
                                  device="cpu", core=core))
    s = pb.StandInServer(repo)
    yield s
    s.stop()


def request(image: dict[str, np.ndarray], **extra: Any) -> dict[str, np.ndarray]:
    return {"text_input": np.array([[PROMPT.encode()]], dtype=np.object_), "max_tokens": np.array([[NEW]], np.int32),
            "exclude_input_in_output": np.array([[True]]), **image, **extra}


def test_configs_declare_the_image_inputs(server: Any) -> None:
    for model in ("ensemble", "bls", "llama"):
        cfg = text_format.Parse((server.repo / model / "config.pbtxt").read_text(), mc.ModelConfig())
        inputs = {t.name: t for t in cfg.input}
        assert inputs["image_url_input"].data_type == mc.TYPE_STRING and inputs["image_url_input"].optional
        assert inputs["image_bytes_input"].data_type == mc.TYPE_UINT8 and list(inputs["image_bytes_input"].dims) == [-1] * 4


def test_images_through_the_ensemble_and_bls(server: Any) -> None:
    core = server.models["llama"].core
    data = png((60, 30), 0)
    ids = core.tokenizer.encode(PROMPT, add_bos=True, allow_special=True)
    (want,) = run_to_completion(core, [GenerationRequest("want", ids, NEW, SamplingParams(temperature=0.0),
                                                         images=(ImageInput("image", data),))])
    pixels = np.asarray(Image.open(io.BytesIO(data)))
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for image in ({"image_url_input": np.array([[url.encode()]], dtype=np.object_)},
                  {"image_bytes_input": pixels[None, None]}):
        for model in ("ensemble", "bls"):
            call = server.infer(model, request(image)).wait()
            assert not call.errors, [e.message() for e in call.errors]
            assert b"".join(bytes(o["text_output"][0]) for o in call.outputs) == want.text.encode(), model
    assert core.kv.all_free() and len(core.runner.cross.cache) == 0


def test_bad_images_are_invalid_arg_naming_the_tensor(server: Any) -> None:
    for model in ("ensemble", "bls"):
        call = server.infer(model, request({"image_url_input": np.array([[b"https://example.com/a.png"]],
                                                                        dtype=np.object_)})).wait()
        assert call.errors and "image_url_input[0]" in call.errors[0].message() and "not fetched" in call.errors[0].message()
