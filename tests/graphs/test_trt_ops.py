"""The TensorRT graph check (graphs/trt_ops.py): every op of a TRT-targeted graph is our plugin or on
TensorRT's ONNX-parser list, for every precision the build exposes; unsupported nodes are named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from tiny_models import TinyBuilds, tiny_config

from llamaforge.build.builder import activation_precision
from llamaforge.export.checkpoint import open_checkpoint
from llamaforge.export.exporter import PRECISIONS, bind_weights, trace
from llamaforge.graphs.pipeline import ORT_ONLY_PASSES, pipeline, run_pipeline
from llamaforge.graphs.quantization.recipes import KV_CACHE_QUANT, QUANT_PRECISIONS, QuantConfig, QuantContext
from llamaforge.graphs.quantization.search import backend_int8_activation
from llamaforge.graphs.trt_ops import (
    SUPPORTED_OPS_FILE,
    UnsupportedForTensorRT,
    check_tensorrt_graph,
    tensorrt_problems,
)
from llamaforge.plugins.attention.schema import DOMAIN, OP_TYPE

ALL_PRECISIONS = [*PRECISIONS, *QUANT_PRECISIONS]  # what `make engine PRECISION=` accepts


@pytest.fixture(scope="module")
def ckpt_dir(tiny_builds: TinyBuilds) -> Path:
    return tiny_builds.hf_checkpoint(tiny_config(), seed=5)  # shared with tests/graphs/test_quantization.py


@pytest.fixture(scope="module")
def stats(ckpt_dir: Path):  # type: ignore[no-untyped-def]
    from llamaforge.graphs.quantization.awq import AWQSearch
    from llamaforge.graphs.quantization.calibrate import calibrate

    ckpt = open_checkpoint(ckpt_dir)
    tokens = torch.randint(0, ckpt.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
    return calibrate(ckpt, tokens, progress=False, search=AWQSearch(128))  # int4-awq's scales too


def trt_graph(ckpt_dir: Path, stats, precision: str, kv_cache: str | None = None) -> ir.Model:  # type: ignore[no-untyped-def]
    """The graph BACKEND=trt would hand to TensorRT, built up to (not including) the op check."""
    ckpt = open_checkpoint(ckpt_dir)
    base = activation_precision(precision)
    model = trace(ckpt.config, base)
    bind_weights(model, ckpt, PRECISIONS[base], tied=ckpt.config.tie_word_embeddings)
    # What BACKEND=trt builds: int8-sq with static activation scales (builder.py, search.backend_int8_activation);
    # a forced alpha, since these statistics carry AWQ's search, not SmoothQuant's (the graph's form is the same).
    quant = QuantConfig(precision if precision in QUANT_PRECISIONS else None, kv_cache, smoothquant_alpha=0.5,
                        int8_activation=backend_int8_activation("trt", None))
    passes = pipeline("trt", quant)
    assert passes[-1] == "check-trt-ops" and not ORT_ONLY_PASSES & set(passes)
    run_pipeline(model, passes[:-1], log=lambda _: None, quant=QuantContext(quant, stats.copy()))
    return model


def op_types(model: ir.Model) -> set[tuple[str, str]]:
    return {(n.domain, n.op_type) for n in ir.traversal.RecursiveGraphIterator(model.graph)}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ALL_PRECISIONS)
def test_trt_graph_uses_only_supported_ops(ckpt_dir: Path, stats, precision: str) -> None:  # type: ignore[no-untyped-def]
    model = trt_graph(ckpt_dir, stats, precision)
    ops = op_types(model)
    assert (DOMAIN, OP_TYPE) in ops, "the TRT graph keeps the attention plugin node"
    assert {d for d, _ in ops} <= {"", DOMAIN}, f"non-standard domains in a TRT graph: {ops}"
    if precision in QUANT_PRECISIONS:
        assert ("", "DequantizeLinear") in ops, f"PRECISION={precision}: no Q/DQ reached the TRT graph"
    assert tensorrt_problems(model) == []
    check_tensorrt_graph(model)


@pytest.mark.parametrize("kv_cache", KV_CACHE_QUANT)
def test_quantized_kv_cache_is_rejected_for_trt(ckpt_dir: Path, stats, kv_cache: str) -> None:  # type: ignore[no-untyped-def]
    # The TensorRT plugin's type combinations are fp32/fp16/bf16 caches only (trt_plugin.py), so a
    # KV_CACHE=fp8 graph must stop at the check, naming the attention nodes and the attribute.
    model = trt_graph(ckpt_dir, stats, "fp16", kv_cache)
    with pytest.raises(UnsupportedForTensorRT, match=r"node '[^']+' \(llamaforge::LlamaAttention\).*kv_cache_quant"):
        check_tensorrt_graph(model)


def _insert_after_first(model: ir.Model, op: str, domain: str = "", dtype: ir.DataType | None = None) -> ir.Node:
    """Route the first MatMul's output through a new `op` node (a unary op or a cast) named 'offender'."""
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    out = matmul.outputs[0]
    attrs = {"to": ir.AttrInt64("to", int(dtype))} if dtype is not None else {}
    node = ir.Node(domain, op, [out], attributes=list(attrs.values()), name="offender", num_outputs=1)
    node.outputs[0].dtype = dtype or out.dtype
    node.outputs[0].shape = out.shape
    model.graph.insert_after(matmul, node)
    for use, index in list(out.uses()):
        if use is not node:
            use.replace_input_with(index, node.outputs[0])
    return node


@pytest.fixture
def fp32_graph(ckpt_dir: Path, stats) -> ir.Model:  # type: ignore[no-untyped-def]
    return trt_graph(ckpt_dir, stats, "fp32")


def test_unsupported_op_fails_naming_the_node(fp32_graph: ir.Model) -> None:
    _insert_after_first(fp32_graph, "Det")  # Det is marked N (unsupported) in the parser's table
    with pytest.raises(UnsupportedForTensorRT, match=r"node 'offender' \(ai\.onnx::Det\): Det is not on TensorRT 10\.13"):
        check_tensorrt_graph(fp32_graph)


def test_foreign_domain_fails_naming_the_node(fp32_graph: ir.Model) -> None:
    _insert_after_first(fp32_graph, "FastGelu", domain="com.microsoft")
    with pytest.raises(UnsupportedForTensorRT, match=r"node 'offender' \(com\.microsoft::FastGelu\): domain"):
        check_tensorrt_graph(fp32_graph)


def test_unsupported_dtype_fails_naming_the_node(fp32_graph: ir.Model) -> None:
    # Cast to float64: DOUBLE is not among Cast's TensorRT types.
    _insert_after_first(fp32_graph, "Cast", dtype=ir.DataType.DOUBLE)
    problems = tensorrt_problems(fp32_graph)
    assert "node 'offender' (ai.onnx::Cast): output" in problems[0] and "is DOUBLE" in problems[0]
    assert all("is DOUBLE" in p for p in problems[1:]), "only the cast and its (now float64) consumers"


def test_asymmetric_quantization_is_rejected(fp32_graph: ir.Model) -> None:
    matmul = next(n for n in fp32_graph.graph if n.op_type == "MatMul")
    x = matmul.inputs[0]
    scale = ir.Value(name="s", const_value=ir.tensor(np.float32(0.1)))
    zp = ir.Value(name="zp", const_value=ir.tensor(np.int8(3)))
    for v in (scale, zp):
        fp32_graph.graph.register_initializer(v)
    q = ir.Node("", "QuantizeLinear", [x, scale, zp], name="q_asym")
    q.outputs[0].dtype = ir.DataType.INT8
    dq = ir.Node("", "DequantizeLinear", [q.outputs[0], scale, zp], name="dq_asym")
    dq.outputs[0].dtype = ir.DataType.FLOAT
    fp32_graph.graph.insert_before(matmul, [q, dq])
    matmul.replace_input_with(0, dq.outputs[0])
    problems = tensorrt_problems(fp32_graph)
    assert [p.split("): ")[0] + ")" for p in problems] == ["node 'q_asym' (ai.onnx::QuantizeLinear)",
                                                  "node 'dq_asym' (ai.onnx::DequantizeLinear)"]
    assert all("zero point 'zp' must be a constant 0" in p for p in problems)


def test_supported_list_records_its_source() -> None:
    data = json.loads(SUPPORTED_OPS_FILE.read_text())
    assert data["tensorrt_version"] == "10.13"
    assert len(data["source"]["commit"]) == 40 and data["source"]["repository"].endswith("onnx/onnx-tensorrt")
    # Operators the parser gained after 10.13 are not on a 10.13 list.
    assert not set(data["removed_as_added_after_10_13"]) & set(data["operators"])
    assert data["operators"]["DequantizeLinear"]["types"] == ["INT8", "FP8", "FP4", "INT4"]


# -- INT4 weight-only: the block form TensorRT's IDequantizeLayer takes ---------------------------------


def int4_dq_model(weight_is_input: bool = False, scale_shape: tuple[int, ...] = (2, 8), axis: int = 0) -> ir.Model:
    """W int4 [64, 8] -> DequantizeLinear(block_size 32) -> MatMul weight input (a graph input
    instead of a stored weight with `weight_is_input`)."""
    import ml_dtypes

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 64]))
    codes = ir.Value(name="w", type=ir.TensorType(ir.DataType.INT4), shape=ir.Shape([64, 8]))
    if not weight_is_input:
        codes.const_value = ir.tensor(np.zeros((64, 8), ml_dtypes.int4), name="w")
    scale = ir.Value(name="s", const_value=ir.tensor(np.full(scale_shape, 0.1, np.float32), name="s"))
    zero = ir.Value(name="z", const_value=ir.tensor(np.zeros(scale_shape, ml_dtypes.int4), name="z"))
    dq = ir.node("DequantizeLinear", [codes, scale, zero], attributes={"axis": axis, "block_size": 32}, name="dq")
    dq.outputs[0].dtype = ir.DataType.FLOAT
    dq.outputs[0].shape = ir.Shape([64, 8])
    matmul = ir.node("MatMul", [x, dq.outputs[0]], name="mm")
    matmul.outputs[0].dtype, matmul.outputs[0].name = ir.DataType.FLOAT, "y"
    graph = ir.Graph([x, *([codes] if weight_is_input else [])], [matmul.outputs[0]], nodes=[dq, matmul],
                     initializers=[scale, zero, *([] if weight_is_input else [codes])], opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def test_int4_block_dequantize_of_a_weight_is_accepted() -> None:
    assert tensorrt_problems(int4_dq_model()) == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weight_is_input": True}, "INT4 is weight-only in TensorRT; 'w' is not a build-time constant"),
    ({"scale_shape": (1, 2, 8)}, "scale has rank 3, data rank 2"),
])
def test_int4_forms_tensorrt_cannot_take_are_named(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    problems = tensorrt_problems(int4_dq_model(**kwargs))
    assert any(p.startswith("node 'dq' (ai.onnx::DequantizeLinear)") and message in p for p in problems), problems
