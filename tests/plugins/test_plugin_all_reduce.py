"""`llamaforge::AllReduce` (plugins/all_reduce/): the reference, the torch op, and each backend's form
of it in a traced rank graph: ONNX Runtime CPU (the MPI contrib op; run by tests/parallel/), ONNX
Runtime CUDA (com.microsoft::AllReduce, structural: no GPU here) and TensorRT (TensorRT-LLM's NCCL
plugin, accepted by check-trt-ops)."""

from __future__ import annotations

import onnx
import onnx_ir as ir
import pytest
import torch
from tiny_models import tiny_config

from llamaforge.export.exporter import trace
from llamaforge.export.tensor_parallel import RankShard
from llamaforge.graphs.passes.lower_all_reduce import LowerAllReduceForORT, LowerAllReduceForTensorRT
from llamaforge.graphs.pipeline import pipeline, run_pipeline
from llamaforge.graphs.trt_ops import tensorrt_problems
from llamaforge.plugins.all_reduce import reference, trt_plugin
from llamaforge.plugins.all_reduce.schema import DOMAIN, OP_TYPE, AllReduceAttrs, single_op_model
from llamaforge.plugins.all_reduce.torch_op import all_reduce
from llamaforge.runtime.parallel.collective import ALL_REDUCE_DOMAIN, ALL_REDUCE_OP_TYPE


def test_reference_is_the_sum_of_the_ranks_inputs() -> None:
    xs = [torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(r)) for r in range(3)]
    torch.testing.assert_close(reference.all_reduce(xs, AllReduceAttrs(3)), xs[0] + xs[1] + xs[2], rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 rank inputs for world_size=3"):
        reference.all_reduce(xs[:2], AllReduceAttrs(3))
    with pytest.raises(ValueError, match="reduce='max'"):
        AllReduceAttrs(2, "max")


def test_torch_op_is_the_identity_alone_and_refuses_to_pretend_otherwise() -> None:
    x = torch.randn(4, 8)
    torch.testing.assert_close(all_reduce(x, AllReduceAttrs(1)), x, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="world_size=2 runs only inside a rank graph"):
        all_reduce(x, AllReduceAttrs(2))


def rank_graph(tp: int = 2, precision: str = "fp32") -> ir.Model:
    config = tiny_config()
    return trace(config, precision, RankShard(config, tp, 0))


def nodes(model: ir.Model, domain: str, op_type: str) -> list[ir.Node]:
    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == domain and n.op_type == op_type]


def test_a_rank_graph_reduces_after_every_row_parallel_projection() -> None:
    model = rank_graph()
    reduces = nodes(model, DOMAIN, OP_TYPE)
    assert len(reduces) == 2 * tiny_config().num_layers  # o_proj and down_proj of each layer
    for node in reduces:
        producer = node.inputs[0].producer()
        assert producer is not None and producer.op_type == "MatMul"
        assert node.attributes["world_size"].value == 2
    assert not nodes(trace(tiny_config(), "fp32"), DOMAIN, OP_TYPE)  # TP=1: none


def test_ort_cpu_lowering_is_the_mpi_contrib_op_in_float32() -> None:
    model = rank_graph()
    run_pipeline(model, pipeline("ort"), log=lambda _: None)
    assert not nodes(model, DOMAIN, OP_TYPE)
    lowered = nodes(model, ALL_REDUCE_DOMAIN, ALL_REDUCE_OP_TYPE)
    assert len(lowered) == 4 and all(n.outputs[0].dtype == ir.DataType.FLOAT for n in lowered)
    assert model.opset_imports[ALL_REDUCE_DOMAIN] == 1


def test_ort_cpu_lowering_casts_half_precision_to_float32_and_back() -> None:
    model = ir.serde.deserialize_model(single_op_model(AllReduceAttrs(2), onnx.TensorProto.FLOAT16))
    LowerAllReduceForORT()(model)
    ops = [(n.domain, n.op_type) for n in model.graph]
    assert ops == [("", "Cast"), (ALL_REDUCE_DOMAIN, ALL_REDUCE_OP_TYPE), ("", "Cast")]
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT16 and model.graph.outputs[0].name == "y"
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def test_ort_cuda_form_is_com_microsoft_all_reduce() -> None:
    model = ir.serde.deserialize_model(single_op_model(AllReduceAttrs(2)))
    LowerAllReduceForORT(cuda=True)(model)
    (node,) = list(model.graph)
    assert (node.domain, node.op_type, len(node.attributes)) == ("com.microsoft", "AllReduce", 0)
    bf16 = ir.serde.deserialize_model(single_op_model(AllReduceAttrs(2), onnx.TensorProto.BFLOAT16))
    with pytest.raises(ValueError, match="all_reduce: com.microsoft::AllReduce takes float16 or float32, not BFLOAT16"):
        LowerAllReduceForORT(cuda=True)(bf16)


def test_tensorrt_form_is_tensorrt_llm_nccl_plugin_and_passes_the_op_check() -> None:
    model = rank_graph(precision="fp16")
    passes = pipeline("trt")
    assert passes[-2:] == ["lower-all-reduce-trt", "check-trt-ops"]
    run_pipeline(model, passes, log=lambda _: None)  # ends with check-trt-ops: raises on any problem
    (node, *_) = nodes(model, DOMAIN, OP_TYPE)
    attrs = {k: a.value for k, a in node.attributes.items()}
    assert attrs["plugin_namespace"] == "tensorrt_llm" and attrs["plugin_version"] == "1"
    assert list(attrs["group"]) == [0, 1] and attrs["type_id"] == 1  # nvinfer1::DataType::kHALF
    assert attrs["strategy"] == trt_plugin.STRATEGY_NCCL and attrs["fusion_op"] == trt_plugin.FUSION_NONE


def test_op_check_names_an_all_reduce_not_in_tensorrt_form() -> None:
    model = rank_graph()
    problems = tensorrt_problems(model)
    assert any("not in TensorRT form" in p and "lower-all-reduce-trt" in p for p in problems)
    LowerAllReduceForTensorRT()(model)
    node = nodes(model, DOMAIN, OP_TYPE)[0]
    node.attributes["group"] = ir.AttrInt64s("group", [0, 1, 2])
    assert any("fields ['group']" in p for p in tensorrt_problems(model))
