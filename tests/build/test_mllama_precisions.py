"""Llama 3.2 Vision engines at every precision the text pipeline has (tiny random checkpoint of
`tiny_mllama`): each builds, both graphs run under ONNX Runtime (bf16: build only, ORT's CPU provider
has no bf16 Conv/MatMul), and the logits are compared with transformers' fp32 model (fp16 also with
transformers' own fp16 model).

Random weights make no quality claim: these tests say "builds, runs, error bounded". The bound is the
format's own quantization step relative to the largest logit, times two (fp16: 2^-7, eight fp16 unit
roundoffs; int8: 2/127 per int8 rounding, and int8-wo on ONNX Runtime's fast kernel rounds the
activations to int8 too (MatMulNBits accuracy level 4, docs/quantization.md): 4/127; fp8 E4M3: 2^-3,
one step of its 3-bit mantissa, also for an FP8 KV cache; int4: 2/7): a broken recipe
(a layer unquantized against fp32 weights, a scale off by its range, image states calibrated as zeros)
moves logits by far more, and every quantized build must move them by more than 1e-3 (else the test
would prove nothing). Top-1 agreement with fp32 over the prompt is reported and held to >= 0.75.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from mllama_graphs import prefill_logits
from tiny_mllama import load_mllama_oracle, make_mllama_checkpoint, tiny_mllama_configs

from llamaforge.build.builder import BuildOptions, build_engine
from llamaforge.export.checkpoint import open_checkpoint
from llamaforge.graphs.quantization.calibrate import calibration_batch, read_calibration_text
from llamaforge.graphs.quantization.mllama_images import calibration_image_states
from llamaforge.graphs.quantization.recipes import CalibrationStats
from llamaforge.runtime.core.mllama_image import ImageInput, MllamaImageConfig, preprocess_images
from llamaforge.runtime.core.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow  # one engine build per precision: ~20 s each on 2 cores

VISION, TEXT = tiny_mllama_configs()
IMAGE = VISION.image_token_index
PROMPT = [1, 45, 67, IMAGE, 88, 99, 100, 120, 7, 300, 12, 5]
# name -> (BuildOptions fields, bound on max |logit error| / max |fp32 logit|)
BUILDS: dict[str, tuple[dict[str, Any], float]] = {
    "fp16": ({"precision": "fp16"}, 2**-7),
    "int8-wo": ({"precision": "int8-wo"}, 4 / 127),
    # K and V rounded to E4M3 as well: the coarser format's bound (int8-sq alone measured 0.98%)
    "int8-sq+kv-fp8": ({"precision": "int8-sq", "kv_cache": "fp8"}, 2**-3),
    "fp8": ({"precision": "fp8"}, 2**-3),
    "int4-awq": ({"precision": "int4-awq"}, 2 / 7),
    "int4-rtn": ({"precision": "int4-rtn"}, 2 / 7),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mllama_checkpoint(tmp_path_factory.mktemp("mllama") / "ckpt")


@pytest.fixture(scope="module")
def engines(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engines")
    return {name: build_engine(BuildOptions(checkpoint=checkpoint, out=root / name, **options))
            for name, (options, _) in {**BUILDS, "bf16": ({"precision": "bf16"}, 0.0)}.items()}


@pytest.fixture(scope="module")
def inputs() -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, torch.Tensor]]:
    """The vision graph's feeds, the cross-attention mask, and transformers' inputs, for PROMPT with one
    image of 2 tiles (through the runtime's preprocessing)."""
    import io

    from PIL import Image
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    pixels = np.random.default_rng(0).integers(0, 256, (30, 60, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    images = preprocess_images([[ImageInput("image", data.getvalue())]], MllamaImageConfig(tile_size=VISION.image_size))
    mask = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(PROMPT, IMAGE)], images.num_tiles,
                                                        VISION.max_num_tiles, len(PROMPT))
    feeds = {"pixel_values": images.pixel_values, "aspect_ratio_ids": images.aspect_ratio_ids,
             "aspect_ratio_mask": images.aspect_ratio_mask}
    hf = {"input_ids": torch.tensor([PROMPT]), **{k: torch.from_numpy(v) for k, v in feeds.items()},
          "cross_attention_mask": torch.from_numpy(mask)}
    return feeds, mask.reshape(1, len(PROMPT), -1), hf


@pytest.fixture(scope="module")
def oracle_logits(checkpoint: Path, inputs: Any) -> dict[str, np.ndarray]:
    model = load_mllama_oracle(checkpoint)
    hf = inputs[2]
    with torch.no_grad():
        fp32 = model(**hf).logits[0].numpy()
        model = model.to(torch.float16)
        fp16 = model(**{**hf, "pixel_values": hf["pixel_values"].half()}).logits[0].float().numpy()
    return {"fp32": fp32, "fp16": fp16}


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_precision_builds_runs_and_error_is_bounded(engines: dict[str, Path], inputs: Any,
                                                     oracle_logits: dict[str, np.ndarray], name: str) -> None:
    feeds, mask, _ = inputs
    got = prefill_logits(engines[name], PROMPT, feeds, mask)
    want = oracle_logits["fp32"]
    scale = float(np.abs(want).max())
    error = float(np.abs(got - want).max())
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    print(f"{name}: max |logit error| {error:.3g} = {error / scale:.2%} of max |logit| {scale:.3g}; top-1 agreement {agree:.2f}")
    assert error <= BUILDS[name][1] * scale
    assert agree >= 0.75
    if name != "fp16":
        assert error > 1e-3, "quantization changed nothing: the test would prove nothing"
    else:  # transformers' own fp16 model is as far from fp32 as the engine
        assert float(np.abs(got - oracle_logits["fp16"]).max()) <= 2**-7 * scale


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_the_serving_engine_core_runs_every_precision(engines: dict[str, Path], inputs: Any, name: str) -> None:
    """The engine core `serve` runs (through MllamaEngine: the manifest's session settings, caches in
    its KV dtype, the runtime's own preprocessing and mask) gives the two graphs' own prefill logits."""
    import io

    from PIL import Image

    from llamaforge.runtime.core.mllama_engine import MllamaEngine

    feeds, mask, _ = inputs
    want = prefill_logits(engines[name], PROMPT, feeds, mask)
    pixels = np.random.default_rng(0).integers(0, 256, (30, 60, 3), dtype=np.uint8)
    data = io.BytesIO()
    Image.fromarray(pixels).save(data, format="PNG")
    engine = MllamaEngine(engines[name], threads=2)
    try:
        got = engine.prefill_logits(PROMPT, [ImageInput("image", data.getvalue())])
    finally:
        engine.close()
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=1e-4 * float(np.abs(want).max()), rtol=0)


@pytest.mark.parametrize("name", ["fp16", "bf16", "int8-wo", "fp8", "int4-awq"])
def test_vision_graph_precision(engines: dict[str, Path], name: str) -> None:
    """fp16/bf16: both graphs in that type. Quantized: the text decoder's linears, cross-attention
    layers included, are stored quantized; the vision graph is unquantized, in the text graph's
    activation type (float32), as TensorRT-LLM leaves its visual engine unquantized."""
    text = onnx.load(str(engines[name] / "model.onnx"), load_external_data=False).graph
    vision = onnx.load(str(engines[name] / "vision.onnx"), load_external_data=False).graph
    float_type = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}.get(name, onnx.TensorProto.FLOAT)
    assert vision.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # pixel values: float32 always
    assert vision.output[0].type.tensor_type.elem_type == float_type
    states = next(i for i in text.input if i.name == "cross_attention_states")
    assert states.type.tensor_type.elem_type == float_type
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in vision.node)
    weights = [t for t in vision.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == float_type for t in weights)
    cross = [t for t in text.initializer if ".cross_attn." in t.name and len(t.dims) >= 2]
    assert len(cross) == 4 * len(VISION.cross_attention_layers)
    quantized = name not in ("fp16", "bf16")
    assert all((t.data_type != float_type) == quantized for t in cross), [(t.name, t.data_type) for t in cross]


def test_a_vision_text_graph_keeps_the_attention_fallback(engines: dict[str, Path]) -> None:
    """Its calls carry per-row image inputs, which the runtime's row-by-row continuation does not
    split, so each self-attention layer is the `If` between GQA and the decomposition."""
    assert "batched_continuation" not in json.loads((engines["int8-wo"] / "manifest.json").read_text())["kv_cache"]
    graph = onnx.load(str(engines["int8-wo"] / "model.onnx"), load_external_data=False).graph
    assert any(n.op_type == "If" for n in graph.node)


def test_calibration_ran_with_image_states(engines: dict[str, Path], checkpoint: Path) -> None:
    """The cross-attention layers' k_proj/v_proj read the image states: their calibrated input
    maximum is the image states' own, channel by channel (zero states would give zeros)."""
    stats = CalibrationStats.load(engines["int8-wo"] / "calibration.safetensors")
    ckpt = open_checkpoint(checkpoint)
    text = read_calibration_text(None)
    tokens = calibration_batch(load_tokenizer(engines["int8-wo"], json.loads(
        (engines["int8-wo"] / "manifest.json").read_text())["tokenizer"]), text)
    images = calibration_image_states(ckpt, ckpt.vision, ckpt.config.hidden_size, tokens)
    want = images.states.abs().reshape(-1, images.states.shape[-1]).amax(0).numpy()
    assert float(want.min()) > 0
    for layer in VISION.cross_attention_layers:
        for proj in ("k_proj", "v_proj"):
            np.testing.assert_allclose(stats.act_amax[f"model.layers.{layer}.cross_attn.{proj}"], want, rtol=1e-6)
    manifest = json.loads((engines["int8-sq+kv-fp8"] / "manifest.json").read_text())
    assert manifest["quantization"]["precision"] == "int8-sq"
    assert manifest["kv_cache"]["quantization"]["dtype"] == "float8e4m3fn"
