"""`validate-quantization` (graphs/passes/validate_quant.py): a graph quantized by the passes passes
unchanged; each way of breaking TensorRT's explicit-quantization rules is rejected with a
QuantizationError naming the node."""

from __future__ import annotations

from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from small_graphs import small_model

from llamaforge.graphs.passes.quantize import QuantizeMatMuls
from llamaforge.graphs.passes.validate_quant import ValidateQuantization
from llamaforge.graphs.quantization.recipes import CalibrationStats, QuantConfig, QuantContext, QuantizationError
from llamaforge.plugins.attention.schema import DOMAIN, INPUTS, OP_TYPE, AttentionAttrs

FLOAT, INT32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
LINEAR = "model.layers.0.mlp.down_proj"
WEIGHT = f"{LINEAR}.weight.T"
IN, OUT = 6, 4


def linear_model() -> ir.Model:
    """x [batch, 6] -> MatMul(down_proj [6, 4]) -> Relu -> y."""
    weight = np.random.default_rng(0).standard_normal((IN, OUT)).astype(np.float32)
    nodes = [onnx.helper.make_node("MatMul", ["x", WEIGHT], ["h"]), onnx.helper.make_node("Relu", ["h"], ["y"])]
    return small_model(nodes, {"x": (FLOAT, ["batch", IN])}, {"y": (FLOAT, ["batch", OUT])}, {WEIGHT: weight})


def context(precision: str | None = "int8-sq", kv_cache: str | None = None) -> QuantContext:
    stats = CalibrationStats(act_amax={LINEAR: np.full(IN, 3.0, np.float32)},
                             weight_out_amax={LINEAR: np.full(OUT, 2.0, np.float32)})
    # int8-sq's static per-tensor form: TensorRT's rules (the per-token form: test_quantize_per_token.py)
    return QuantContext(QuantConfig(precision, kv_cache, int8_activation="static"), stats)


def quantized(precision: str = "int8-sq") -> ir.Model:
    model = linear_model()
    QuantizeMatMuls(context(precision), precision)(model)
    return model


def node(model: ir.Model, op_type: str, reads: str | None = None) -> ir.Node:
    return next(n for n in model.graph if n.op_type == op_type and (reads is None or n.inputs[0].name == reads))


def set_initializer(model: ir.Model, name: str, array: np.ndarray) -> None:
    model.graph.initializers[name].const_value = ir.tensor(array, name=name)


@pytest.mark.parametrize("precision", ["int8-sq", "int8-wo", "fp8"])
def test_what_the_quantization_passes_write_is_valid(precision: str) -> None:
    model = quantized(precision)
    assert not ValidateQuantization(context(precision))(model).modified


def dq_feeds_relu(model: ir.Model) -> None:
    """The weight's DQ output read by a Relu instead of (only) the MatMul."""
    dq = node(model, "DequantizeLinear", f"{WEIGHT}.int8")
    relu = node(model, "Relu")
    relu.replace_input_with(0, dq.outputs[0])


def activation_qdq_bypassed(model: ir.Model) -> None:
    matmul = node(model, "MatMul")
    matmul.replace_input_with(0, model.graph.inputs[0])


def fused_integer_op(model: ir.Model) -> None:
    model.graph.append(ir.node("MatMulInteger", [model.graph.inputs[0], model.graph.inputs[0]], name="fused"))


def block_quantized(model: ir.Model) -> None:
    dq = node(model, "DequantizeLinear", f"{WEIGHT}.int8")
    dq.attributes["block_size"] = ir.AttrInt64("block_size", 2)


def unquantized_linear(model: ir.Model) -> None:
    """A second, float linear after the quantized one."""
    extra = ir.Value(name="model.layers.0.mlp.up_proj.weight.T", type=ir.TensorType(ir.DataType.FLOAT),
                     shape=ir.Shape([OUT, OUT]), const_value=ir.tensor(np.eye(OUT, dtype=np.float32)))
    model.graph.register_initializer(extra)
    relu = node(model, "Relu")
    matmul = ir.node("MatMul", [relu.inputs[0], extra], name="up")
    model.graph.insert_before(relu, matmul)
    relu.replace_input_with(0, matmul.outputs[0])


MUTATIONS: dict[str, tuple[Callable[[ir.Model], None], str]] = {
    "negative-weight-scale": (lambda m: set_initializer(m, f"{WEIGHT}.scale", np.full(OUT, -0.01, np.float32)),
                              "not finite and > 0"),
    "inf-activation-scale": (lambda m: set_initializer(m, f"{LINEAR}.input_scale", np.array(np.inf, np.float32)),
                             "not finite and > 0"),
    "scale-of-wrong-length": (lambda m: (set_initializer(m, f"{WEIGHT}.scale", np.full(OUT + 1, 0.01, np.float32)),
                                         set_initializer(m, f"{WEIGHT}.zero_point", np.zeros(OUT + 1, np.int8))),
                              "does not match axis 1"),
    "float16-scale": (lambda m: set_initializer(m, f"{WEIGHT}.scale", np.full(OUT, 0.01, np.float16)), "expected FLOAT"),
    "asymmetric-zero-point": (lambda m: set_initializer(m, f"{WEIGHT}.zero_point", np.ones(OUT, np.int8)), "asymmetric"),
    "uint8-zero-point": (lambda m: set_initializer(m, f"{LINEAR}.input_zero_point", np.array(0, np.uint8)), "has type UINT8"),
    "dq-feeds-relu": (dq_feeds_relu, "Q/DQ must sit right before MatMul inputs"),
    "activation-not-quantized": (activation_qdq_bypassed, "has no QuantizeLinear/DequantizeLinear pair"),
    "fused-integer-op": (fused_integer_op, "fused/integer quantized op"),
    "block-quantization": (block_quantized, "block quantization"),
    "float-linear-left": (unquantized_linear, "is stored unquantized"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_each_broken_rule_is_rejected_naming_the_node(mutation: str) -> None:
    model = quantized("int8-sq")
    ValidateQuantization(context())(model)  # valid before the mutation
    mutate, message = MUTATIONS[mutation]
    mutate(model)
    with pytest.raises(QuantizationError, match=f"validate-quantization: node .*{message}"):
        ValidateQuantization(context())(model)


def attention_model(k_scale: float) -> ir.Model:
    attrs = AttentionAttrs(num_heads=2, num_kv_heads=1, head_dim=4, kv_cache_quant="fp8", k_scale=1.0)
    cache = ["batch", 1, "capacity", 4]
    fields = attrs.onnx_attributes() | {"k_scale": k_scale}
    n = onnx.helper.make_node(OP_TYPE, list(INPUTS), ["output", "present_key.0", "present_value.0"], domain=DOMAIN,
                              name="attn", **fields)
    return small_model([n], {"query": (FLOAT, ["b", "s", 8]), "key": (FLOAT, ["b", "s", 4]), "value": (FLOAT, ["b", "s", 4]),
                             "past_key": (FLOAT, cache), "past_value": (FLOAT, cache), "past_lengths": (INT32, ["b"])},
                       {"output": (FLOAT, ["b", "s", 8]), "present_key.0": (FLOAT, cache), "present_value.0": (FLOAT, cache)},
                       opsets={DOMAIN: 1})


def test_fp8_kv_cache_needs_positive_scales_on_every_attention_op() -> None:
    ValidateQuantization(context(None, "fp8"))(attention_model(k_scale=0.5))
    with pytest.raises(QuantizationError, match="k_scale=0.0 must be finite and > 0"):
        ValidateQuantization(context(None, "fp8"))(attention_model(k_scale=0.0))


# -- INT4 weight-only: DequantizeLinear(axis 0, block_size) of a stored int4 weight -----------------

INT4_IN = 64  # --int4-block-size 128 does not divide it: the weight takes blocks of 64
INT4_WEIGHT = f"{WEIGHT}.int4"


def int4_model() -> ir.Model:
    from llamaforge.graphs.passes.quantize_int4 import QuantizeInt4

    weight = np.random.default_rng(0).standard_normal((INT4_IN, OUT)).astype(np.float32)
    nodes = [onnx.helper.make_node("MatMul", ["x", WEIGHT], ["h"]), onnx.helper.make_node("Relu", ["h"], ["y"])]
    model = small_model(nodes, {"x": (FLOAT, ["batch", INT4_IN])}, {"y": (FLOAT, ["batch", OUT])}, {WEIGHT: weight})
    QuantizeInt4(int4_context())(model)
    return model


def int4_context(block: int = 128) -> QuantContext:
    return QuantContext(QuantConfig("int4-rtn", int4_block_size=block), CalibrationStats())


def int4_dq(model: ir.Model) -> ir.Node:
    return node(model, "DequantizeLinear", INT4_WEIGHT)


def set_attribute(model: ir.Model, name: str, value: int) -> None:
    int4_dq(model).attributes[name] = ir.AttrInt64(name, value)


def int4_weight_as(dtype: ir.DataType) -> Callable[[ir.Model], None]:
    def mutate(model: ir.Model) -> None:
        codes = model.graph.initializers[INT4_WEIGHT].const_value.numpy().astype(np.int8)
        set_initializer(model, INT4_WEIGHT, codes.astype(dtype.numpy()))
    return mutate


INT4_MUTATIONS: dict[str, tuple[Callable[[ir.Model], None], str]] = {
    "block-size-32-not-64": (lambda m: set_attribute(m, "block_size", 32), "block_size=32 on axis 0; INT4 weights take block_size=64"),
    "blocks-on-axis-1": (lambda m: set_attribute(m, "axis", 1), "on axis 1; INT4 weights take block_size=64 on axis 0"),
    "no-blocks": (lambda m: int4_dq(m).attributes.pop("block_size"), "block_size=0"),
    "non-zero-zero-point": (lambda m: set_initializer(m, f"{WEIGHT}.zero_point", np.ones((1, OUT), ml_dtypes.int4)),
                            "asymmetric"),
    "uint4-weight": (int4_weight_as(ir.DataType.UINT4), "a stored UINT4 tensor of rank 2"),
    "int8-weight-in-blocks": (int4_weight_as(ir.DataType.INT8), "a stored INT8 tensor of rank 2"),
    "scale-of-wrong-shape": (lambda m: (set_initializer(m, f"{WEIGHT}.scale", np.full((2, OUT), 0.1, np.float32)),
                                        set_initializer(m, f"{WEIGHT}.zero_point", np.zeros((2, OUT), ml_dtypes.int4))),
                             r"has shape \(2, 4\); blocks of 64"),
    "negative-block-scale": (lambda m: set_initializer(m, f"{WEIGHT}.scale", np.full((1, OUT), -0.1, np.float32)),
                             "not finite and > 0"),
}


def test_int4_block_form_is_valid() -> None:
    model = int4_model()
    dq = int4_dq(model)
    assert dq.attributes.get_int("block_size", 0) == 64 and dq.attributes.get_int("axis", 1) == 0
    assert not ValidateQuantization(int4_context())(model).modified


@pytest.mark.parametrize("mutation", list(INT4_MUTATIONS))
def test_each_broken_int4_rule_is_rejected_naming_the_node(mutation: str) -> None:
    model = int4_model()
    mutate, message = INT4_MUTATIONS[mutation]
    mutate(model)
    with pytest.raises(QuantizationError, match=f"validate-quantization: node .*{message}"):
        ValidateQuantization(int4_context())(model)


def test_int4_blocks_follow_the_configured_block_size() -> None:
    # Built with blocks of 64; a build configured for 32 expects 32 on this weight.
    with pytest.raises(QuantizationError, match="block_size=64 on axis 0; INT4 weights take block_size=32"):
        ValidateQuantization(int4_context(32))(int4_model())


def test_int4_blocks_under_another_precision_are_rejected() -> None:
    with pytest.raises(QuantizationError, match="only INT4 weight-only's form"):
        ValidateQuantization(context("int8-wo"))(int4_model())
