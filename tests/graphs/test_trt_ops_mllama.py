"""`check-trt-ops` on Llama 3.2 Vision's two graphs: the text decoder (both plugin ops,
`llamaforge::LlamaAttention` and `llamaforge::CrossAttention`) and the vision encoder (standard ops),
as BACKEND=trt builds them (llamaforge/build/mllama.py): the tiny model at every precision TensorRT
takes, and the full-size 11B-Instruct graphs from the registry (graph only: fp32/fp16/bf16, since a
quantized build needs the checkpoint's weights to calibrate)."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest
import torch
from tiny_mllama import make_mllama_checkpoint

from llamaforge.build.builder import activation_precision
from llamaforge.build.mllama import VISION_PASSES, vision_precision
from llamaforge.export.checkpoint import open_checkpoint
from llamaforge.export.config import ModelConfig
from llamaforge.export.exporter import PRECISIONS, bind_placeholder_weights, bind_weights
from llamaforge.export.mllama_export import trace_text, trace_vision
from llamaforge.export.variants import get_variant
from llamaforge.export.vision_config import VisionConfig
from llamaforge.graphs.pipeline import pipeline, run_pipeline
from llamaforge.graphs.quantization.recipes import QUANT_PRECISIONS, CalibrationStats, QuantConfig, QuantContext
from llamaforge.graphs.quantization.search import backend_int8_activation
from llamaforge.graphs.trt_ops import UnsupportedForTensorRT, check_tensorrt_graph, tensorrt_problems
from llamaforge.plugins.cross_attention.schema import DOMAIN, OP_TYPE

TRT_PRECISIONS = ["fp32", "fp16", "bf16", *QUANT_PRECISIONS]


def trt_graphs(config: ModelConfig, vision: VisionConfig, precision: str, bind: object,
               stats: CalibrationStats | None = None, kv_cache: str | None = None) -> tuple[ir.Model, ir.Model]:
    """(text, vision) as BACKEND=trt hands them to TensorRT, every pass run but the final op check."""
    text = trace_text(config, vision, activation_precision(precision))
    image = trace_vision(vision, config.hidden_size, vision_precision(precision))
    bind(text, image)  # type: ignore[operator]
    quant = QuantConfig(precision if precision in QUANT_PRECISIONS else None, kv_cache, smoothquant_alpha=0.5,
                        int8_activation=backend_int8_activation("trt", None))
    passes = pipeline("trt", quant)
    assert passes[-1] == "check-trt-ops" and VISION_PASSES["trt"][-1] == "check-trt-ops"
    context = QuantContext(quant, stats.copy()) if quant.active and stats is not None else None
    run_pipeline(text, passes[:-1], log=lambda _: None, quant=context)
    run_pipeline(image, VISION_PASSES["trt"][:-1], log=lambda _: None)
    return text, image


def ops(model: ir.Model) -> set[tuple[str, str]]:
    return {(n.domain, n.op_type) for n in ir.traversal.RecursiveGraphIterator(model.graph)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from llamaforge.graphs.quantization.awq import AWQSearch
    from llamaforge.graphs.quantization.calibrate import calibrate
    from llamaforge.graphs.quantization.mllama_images import calibration_image_states

    ckpt = open_checkpoint(make_mllama_checkpoint(tmp_path_factory.mktemp("mllama") / "ckpt"))
    tokens = torch.randint(0, ckpt.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    images = calibration_image_states(ckpt, ckpt.vision, ckpt.config.hidden_size, tokens)
    return ckpt, calibrate(ckpt, tokens, progress=False, search=AWQSearch(32), images=images)


@pytest.mark.slow
@pytest.mark.parametrize("precision", TRT_PRECISIONS)
def test_tiny_graphs_pass_the_trt_check(tiny, precision: str) -> None:  # type: ignore[no-untyped-def]
    ckpt, stats = tiny

    def bind(text: ir.Model, image: ir.Model) -> None:
        bind_weights(text, ckpt, PRECISIONS[activation_precision(precision)])
        bind_weights(image, ckpt, PRECISIONS[vision_precision(precision)])

    text, image = trt_graphs(ckpt.config, ckpt.vision, precision, bind, stats)
    assert (DOMAIN, OP_TYPE) in ops(text) and ("llamaforge", "LlamaAttention") in ops(text)
    assert {d for d, _ in ops(image)} == {""}, "the vision graph is standard ops only"
    if precision in QUANT_PRECISIONS:
        assert ("", "DequantizeLinear") in ops(text) and ("", "DequantizeLinear") not in ops(image)
    assert tensorrt_problems(text) == [] and tensorrt_problems(image) == []
    check_tensorrt_graph(text)
    check_tensorrt_graph(image)


def test_cross_attention_node_without_namespace_is_named(tiny) -> None:  # type: ignore[no-untyped-def]
    ckpt, stats = tiny
    text, _ = trt_graphs(ckpt.config, ckpt.vision, "fp16",
                         lambda t, i: (bind_weights(t, ckpt, torch.float16), bind_weights(i, ckpt, torch.float16)))
    node = next(n for n in text.graph if n.op_type == OP_TYPE)
    node.attributes.pop("plugin_namespace")
    node.attributes["window"] = ir.AttrInt64("window", 3)
    with pytest.raises(UnsupportedForTensorRT, match=r"\(llamaforge::CrossAttention\): plugin <no namespace>"
                                                     r"::CrossAttention.*\n.*attribute window"):
        check_tensorrt_graph(text)


@pytest.mark.slow
# fp32 and bf16 (the published checkpoints' dtype) at full size, ~70 s each; fp16 differs from bf16
# only in the type, which the tiny graphs check at every precision.
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_11b_graph_only_passes_the_trt_check(tmp_path: Path, precision: str) -> None:
    """The full-size graphs (40 layers, 8 cross-attention; the 560-pixel, 4-tile vision tower)."""
    variant = get_variant("llama3.2-11b-vision-instruct")
    assert variant.vision is not None

    def bind(text: ir.Model, image: ir.Model) -> None:
        bind_placeholder_weights(text, tmp_path / "text.data")
        bind_placeholder_weights(image, tmp_path / "vision.data")

    text, image = trt_graphs(variant.config, variant.vision, precision, bind)
    assert sum(n.op_type == OP_TYPE for n in text.graph) == 8
    check_tensorrt_graph(text)
    check_tensorrt_graph(image)
