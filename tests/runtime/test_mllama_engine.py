"""A Llama 3.2 Vision engine end to end against transformers' `MllamaForConditionalGeneration`.

The tiny random checkpoint of `tiny_mllama` is built into an engine directory (`build_engine`:
model.onnx with the cross-attention layers, vision.onnx, the manifest's `vision` entry); PNG images
go through the runtime's preprocessing (`mllama_image`, itself compared with transformers'
processor in test_mllama_image.py) and the engine (`mllama_engine`). The oracle gets the same pixel
values and transformers' own cross-attention mask. Criteria as for text engines: prefill logits
within 1e-4 at every position (before and after the `<|image|>` tokens), 32 greedy tokens equal.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_mllama import load_mllama_oracle, tiny_mllama_configs
from tiny_models import hf_greedy

from llamaforge import cli
from llamaforge.build.builder import BuildOptions, build_engine
from llamaforge.build.errors import BuildError
from llamaforge.runtime.core.engine import Engine, EngineError
from llamaforge.runtime.core.mllama_engine import MllamaEngine
from llamaforge.runtime.core.mllama_image import ImageInput, MllamaImageBatch, MllamaImageConfig, preprocess_images
from llamaforge.runtime.core.sampling import SamplingParams

TOLERANCE = 1e-4
MIN_MARGIN = 10 * TOLERANCE  # the oracle's top-2 logit gap at every greedy step
IMAGE = tiny_mllama_configs()[0].image_token_index
# (prompt ids, image sizes (width, height)): text before and after the image tokens.
PROMPTS = {
    "one-image": ([1, 45, 67, IMAGE, 88, 99, 100, 120, 7], [(60, 30)]),
    "two-images": ([1, IMAGE, 8, 9, IMAGE, 12, 300, 12], [(50, 20), (60, 60)]),
    "two-adjacent-images": ([IMAGE, IMAGE, 5, 6, 7, 8], [(28, 28), (70, 40)]),  # both seen by all that follows
    "image-first": ([IMAGE, 1, 88, 99, 5, 6, 200], [(40, 28)]),
}


@pytest.fixture(scope="module")
def checkpoint(tiny_mllama_checkpoint: Path) -> Path:
    return tiny_mllama_checkpoint


@pytest.fixture(scope="module")
def engine_dir(tiny_mllama_engine: Path) -> Path:
    return tiny_mllama_engine


@pytest.fixture(scope="module")
def engine(engine_dir: Path) -> Iterator[MllamaEngine]:
    engine = MllamaEngine(engine_dir, threads=1)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def oracle(checkpoint: Path) -> Any:
    return load_mllama_oracle(checkpoint)


def png(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def inputs_of(sizes: list[tuple[int, int]]) -> list[ImageInput]:
    return [ImageInput(f"image[{i}]", png(s, i)) for i, s in enumerate(sizes)]


def images_of(sizes: list[tuple[int, int]]) -> MllamaImageBatch:
    """What the oracle gets: the runtime's preprocessing (compared with transformers' in test_mllama_image.py)."""
    config = MllamaImageConfig(tile_size=tiny_mllama_configs()[0].image_size, max_images=2)
    return preprocess_images([inputs_of(sizes)], config)


def oracle_inputs(ids: list[int], images: MllamaImageBatch) -> dict[str, torch.Tensor]:
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    mask = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(ids, IMAGE)], images.num_tiles,
                                                        images.pixel_values.shape[2], len(ids))
    return {"input_ids": torch.tensor([ids]), "pixel_values": torch.from_numpy(images.pixel_values),
            "aspect_ratio_ids": torch.from_numpy(images.aspect_ratio_ids),
            "aspect_ratio_mask": torch.from_numpy(images.aspect_ratio_mask), "cross_attention_mask": torch.from_numpy(mask)}


def test_engine_directory(engine_dir: Path) -> None:
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert {"model.onnx", "model.onnx.data", "vision.onnx", "vision.onnx.data"} <= {p.name for p in engine_dir.iterdir()}
    vision = manifest["vision"]
    assert vision["model_file"] == "vision.onnx" and vision["cross_attention_layers"] == [1, 3]
    assert vision["past_inputs"] == ["past_cross_key.1", "past_cross_value.1", "past_cross_key.3", "past_cross_value.3"]
    assert "lower-cross-attention-ort" in manifest["passes"]
    with pytest.raises(EngineError, match="Llama 3.2 Vision engine's text model also takes image states"):
        Engine(engine_dir).step(np.ones((1, 2), np.int64), np.zeros(1, np.int32), [])


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_prefill_logits_match_transformers(engine: MllamaEngine, oracle: Any, name: str) -> None:
    ids, sizes = PROMPTS[name]
    images = images_of(sizes)
    with torch.no_grad():
        want = oracle(**oracle_inputs(ids, images)).logits[0].numpy()
    got = engine.prefill_logits(ids, inputs_of(sizes))
    diff = float(np.abs(got - want).max())
    print(f"{name}: prefill max abs diff {diff:.3g} (|logits| max {np.abs(want).max():.3g})")
    assert diff <= TOLERANCE
    # The test can fail: the same prompt with other images gives other logits after the image token.
    others = [ImageInput(f"image[{i}]", png(s, 10 + i)) for i, s in enumerate(sizes)]
    assert np.abs(engine.prefill_logits(ids, others) - want)[ids.index(IMAGE):].max() > 100 * TOLERANCE


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_greedy_tokens_match_transformers(engine: MllamaEngine, oracle: Any, name: str) -> None:
    ids, sizes = PROMPTS[name]
    images = images_of(sizes)
    inputs = oracle_inputs(ids, images)
    with torch.no_grad():
        out = oracle.generate(**inputs, attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                              max_new_tokens=32, eos_token_id=None, pad_token_id=0, output_scores=True,
                              return_dict_in_generate=True)
    want = out.sequences[0, len(ids):].tolist()
    # A prompt whose greedy path passes a near-tie cannot test equality at this tolerance: pick another.
    top2 = torch.stack(out.scores)[:, 0].topk(2, dim=-1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > MIN_MARGIN, f"{name}: the oracle's greedy path has a near-tie"
    assert engine.generate(ids, inputs_of(sizes), max_new_tokens=32) == want


def test_text_only_request(engine: MllamaEngine, oracle: Any) -> None:
    """No image: transformers skips the cross-attention layers; the engine's empty cross cache must too."""
    ids = [1, 45, 67, 88, 99, 100, 120, 7]
    with torch.no_grad():
        want = oracle(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert float(np.abs(engine.prefill_logits(ids) - want).max()) <= TOLERANCE
    assert engine.generate(ids, (), max_new_tokens=32) == hf_greedy(oracle, ids, 32)


@pytest.mark.parametrize("options, match", [
    ({"backend": "trt"}, "BACKEND=trt"), ({"precision": "int8-wo", "calib": Path("/nonexistent")}, "CALIB=")])
def test_unsupported_builds_are_refused(checkpoint: Path, tmp_path: Path, options: dict[str, Any], match: str) -> None:
    with pytest.raises(BuildError, match=match):
        build_engine(BuildOptions(checkpoint=checkpoint, out=tmp_path / "engine", **options))
    assert not (tmp_path / "engine").exists()


def test_cli_generate_with_an_image(engine_dir: Path, engine: MllamaEngine, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`llamaforge generate ENGINE PROMPT --image FILE`: the tokenizer's `<|image|>` marks the image, and
    the output is the engine's greedy continuation (the engine itself is compared with transformers above)."""
    image = tmp_path / "a.png"
    image.write_bytes(png((60, 30), 0))
    prompt = "Look at this:<|image|> it is"
    assert cli.main(["generate", str(engine_dir), prompt, "--image", str(image), "--max-new-tokens", "8"]) == 0
    assert engine.tokenizer is not None
    ids = engine.tokenizer.encode(prompt, allow_special=True)
    assert ids.count(IMAGE) == 1
    want = engine.tokenizer.decode(engine.generate(ids, inputs_of([(60, 30)]), 8, stop_ids=engine.eos_ids))
    assert capsys.readouterr().out == f"{prompt}{want}\n"
    with pytest.raises(SystemExit, match=r"1 <\|image\|> token\(s\) but 0 --image"):
        cli.main(["generate", str(engine_dir), prompt])
    sampled = ["generate", str(engine_dir), prompt, "--image", str(image), "--max-new-tokens", "8",
               "--temperature", "0.7", "--seed", "3"]
    assert cli.main(sampled) == 0
    want = engine.tokenizer.decode(engine.generate(ids, inputs_of([(60, 30)]), 8, SamplingParams(temperature=0.7, seed=3),
                                                   stop_ids=engine.eos_ids))
    assert capsys.readouterr().out == f"{prompt}{want}\n"
