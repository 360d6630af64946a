"""INT4 weight-only passes (graphs/passes/quantize_int4.py) and their ONNX Runtime lowering
(graphs/passes/lower_quant_ort.py) on a small MLP graph:

  quantize-int4    weights stored int4 with per-block scales, read through DequantizeLinear(axis 0,
                   block_size), equal to a numpy oracle of the arithmetic written out here;
  awq-scale        the calibration's AWQ scales folded in (norm weight / explicit Mul): same function;
  lower-quant-ort  MatMulNBits computing the DQ graph's numbers (accuracy level 1: to fp32 rounding;
                   level 4: with the activation rounded to int8 per block, emulated here); int8-sq's
                   per-token form through MatMulIntegerToFloat, exact (and why it needs the u8u8 switch
                   on CPUs without VNNI).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from small_graphs import MLP_LAYER, copy_model, mlp_linears, op_counts, run_ort, small_model
from small_graphs import mlp_model as mlp_model_of

from llamaforge.graphs.passes.lower_quant_ort import LowerQuantForORT
from llamaforge.graphs.passes.quantize import QuantizeMatMuls
from llamaforge.graphs.passes.quantize_int4 import AWQScale, QuantizeInt4
from llamaforge.graphs.passes.validate_quant import ValidateQuantization
from llamaforge.graphs.pipeline import ORT_ONLY_PASSES, pipeline
from llamaforge.graphs.quantization.int4 import block_for, matmulnbits_weight
from llamaforge.graphs.quantization.recipes import CalibrationStats, QuantConfig, QuantContext, QuantizationError

FLOAT = onnx.TensorProto.FLOAT
make_node = onnx.helper.make_node
HIDDEN, FFN, VOCAB = 128, 96, 10  # FFN 96: blocks of 128 and 64 do not divide it, 32 does
LAYER = MLP_LAYER
LINEARS = mlp_linears(HIDDEN, FFN)
FEED = {"x": np.random.default_rng(1).standard_normal((3, HIDDEN)).astype(np.float32)}


def mlp_model(seed: int = 0) -> ir.Model:
    return mlp_model_of(HIDDEN, FFN, VOCAB, seed)


def context(precision: str = "int4-rtn", block: int = 128, awq: dict[str, np.ndarray] | None = None) -> QuantContext:
    stats = CalibrationStats(awq_scale=dict(awq or {}))
    for name, (rows, _) in LINEARS.items():  # SmoothQuant-style bookkeeping the shared fold updates
        stats.act_amax[name] = np.ones(rows, np.float32)
        stats.weight_in_amax[name] = np.ones(rows, np.float32)
    return QuantContext(QuantConfig(precision, int4_block_size=block), stats)


def oracle_int4(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(q [in, out] as int8 values, scale [in / block, out]) written out from the definition:
    scale = max |w| over each block of `block` input rows / 7, q = round-half-even(w / scale) in [-8, 7]."""
    rows, cols = w.shape
    scale = np.empty((rows // block, cols), np.float32)
    q = np.empty((rows, cols), np.int8)
    for b in range(rows // block):
        part = w[b * block:(b + 1) * block]
        amax = np.abs(part).max(axis=0)
        scale[b] = np.where(amax > 0, amax / np.float32(7), np.float32(1))
        q[b * block:(b + 1) * block] = np.clip(np.rint(part / scale[b]), -8, 7)
    return q, scale


def dq_of(model: ir.Model, weight: str) -> ir.Node:
    return next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name == f"{weight}.int4")


@pytest.mark.parametrize("block", [32, 64, 128])
def test_quantize_int4_stores_the_oracle_blocks(block: int) -> None:
    model = mlp_model()
    floats = {name: model.graph.initializers[f"{name}.weight.T"].const_value.numpy().copy() for name in LINEARS}
    assert QuantizeInt4(context(block=block))(model).modified
    dequantized = {}
    for name, w in floats.items():
        weight = f"{name}.weight.T"
        want_block = block_for(w.shape[0], block)
        assert want_block == max(b for b in (32, 64, 128) if b <= block and w.shape[0] % b == 0)
        dq = dq_of(model, weight)
        assert dq.attributes.get_int("axis", 1) == 0 and dq.attributes.get_int("block_size", 0) == want_block
        q, scale = oracle_int4(w, want_block)
        stored = model.graph.initializers[f"{weight}.int4"].const_value
        assert stored.dtype == ir.DataType.INT4
        np.testing.assert_array_equal(stored.numpy().astype(np.int8), q)
        np.testing.assert_array_equal(dq.inputs[1].const_value.numpy(), scale)
        zero = dq.inputs[2].const_value
        assert zero.dtype == ir.DataType.INT4 and not zero.numpy().astype(np.int8).any()
        assert weight not in model.graph.initializers, "the float weight is no longer stored"
        dequantized[name] = (q.astype(np.float32).reshape(-1, want_block, w.shape[1]) * scale[:, None]).reshape(w.shape)
    assert floats[f"{LAYER}.down_proj"].shape[0] == FFN and block_for(FFN, block) == 32  # the fallback was exercised
    assert "lm_head.weight.T" in model.graph.initializers, "lm_head stays float by default"
    ValidateQuantization(context(block=block))(model)
    # ONNX Runtime (graph as written) computes x through the dequantized weights.
    (got,) = run_ort(model, FEED)
    want = reference_forward(model_weights(mlp_model()) | {n: dequantized[n] for n in LINEARS}, FEED["x"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def model_weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name.removesuffix(".weight.T"): v.const_value.numpy() for name, v in model.graph.initializers.items()}


def reference_forward(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    normed = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w["gamma"]
    act = (normed @ w[f"{LAYER}.gate_proj"]) * (normed @ w[f"{LAYER}.up_proj"])
    return (act @ w[f"{LAYER}.down_proj"]) @ w["lm_head"]


def test_width_no_block_divides_is_rejected_naming_the_weight() -> None:
    model = mlp_model()
    bad = "model.layers.0.mlp.down_proj.weight.T"
    model.graph.initializers[bad].const_value = ir.tensor(np.ones((100, HIDDEN), np.float32), name=bad)
    with pytest.raises(QuantizationError, match=r"down_proj\.weight\.T has 100 input channels, which no INT4 block size"):
        QuantizeInt4(context())(model)


def test_awq_scales_fold_exactly_and_quantize_what_they_scaled() -> None:
    rng = np.random.default_rng(3)
    s_in = np.exp(rng.normal(0, 0.7, HIDDEN)).astype(np.float32)  # gate/up share their input: one s
    s_ffn = np.exp(rng.normal(0, 0.7, FFN)).astype(np.float32)
    awq = {f"{LAYER}.gate_proj": s_in, f"{LAYER}.up_proj": s_in, f"{LAYER}.down_proj": s_ffn}
    model = mlp_model()
    (before,) = run_ort(model, FEED)
    AWQScale(context("int4-awq", awq=awq))(model)
    (after,) = run_ort(model, FEED)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)  # exact in real arithmetic
    counts = op_counts(model)
    assert counts[("", "Mul")] == 1, "down_proj's 1/s folded into up_proj's output columns: gate*up is the only Mul"
    assert "gamma.smoothed" in model.graph.initializers, "gate/up: 1/s folded into the RMSNorm weight"
    inits, original = model.graph.initializers, mlp_model().graph.initializers
    def weight(name: str) -> np.ndarray:
        return inits[name].const_value.numpy()  # type: ignore[no-any-return]
    np.testing.assert_allclose(weight(f"{LAYER}.gate_proj.weight.T.smoothed"),
                               original[f"{LAYER}.gate_proj.weight.T"].const_value.numpy() * s_in[:, None], rtol=1e-6)
    np.testing.assert_allclose(weight(f"{LAYER}.up_proj.weight.T.smoothed.smoothed"),
                               original[f"{LAYER}.up_proj.weight.T"].const_value.numpy() * s_in[:, None] / s_ffn[None, :], rtol=1e-6)


def test_awq_without_scales_in_the_statistics_says_so() -> None:
    with pytest.raises(QuantizationError, match="hold no AWQ scales"):
        AWQScale(context("int4-awq"))(mlp_model())


# -- the ONNX Runtime lowering -----------------------------------------------------------------------


def session(model: ir.Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # the unlowered graph: exact
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def quantized(precision: str) -> ir.Model:
    model = mlp_model()
    if precision == "int8-wo":
        stats = CalibrationStats(weight_out_amax={name: np.abs(model.graph.initializers[f"{name}.weight.T"]
                                                               .const_value.numpy()).max(axis=0) for name in LINEARS})
        QuantizeMatMuls(QuantContext(QuantConfig("int8-wo"), stats), "int8-wo")(model)
    else:
        QuantizeInt4(context(precision))(model)
    return model


@pytest.mark.parametrize("precision", ["int4-rtn", "int8-wo"])
def test_lowered_matmulnbits_level1_computes_the_dq_graph(precision: str) -> None:
    model = quantized(precision)
    (want,) = run_ort(model, FEED)  # DequantizeLinear -> MatMul as written
    lowered = copy_model(model)
    assert LowerQuantForORT(context(precision), accuracy_level=1)(lowered).modified
    counts = op_counts(lowered)
    assert counts[("com.microsoft", "MatMulNBits")] == 3 and not counts[("", "DequantizeLinear")]
    assert not any(n.endswith((".int4", ".int8")) for n in lowered.graph.initializers), "the DQ's codes are dropped"
    got = session(lowered).run(None, FEED)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_matmulnbits_packing_is_the_documented_layout() -> None:
    q = np.array([[-8, 7], [3, -1], [0, 5], [1, -2]], np.int8)  # K=4, N=2
    packed = matmulnbits_weight(q, 4, 16)  # one block of 16 (K padded with the zero code 8)
    assert packed.shape == (2, 1, 8)
    # column 0: codes 0, 11, 8, 9, then padding 8 -> bytes (lo | hi << 4)
    assert list(packed[0, 0, :3]) == [0 | 11 << 4, 8 | 9 << 4, 8 | 8 << 4]
    assert list(packed[1, 0, :2]) == [15 | 7 << 4, 13 | 6 << 4]
    assert list(matmulnbits_weight(q, 8, 16)[0, 0, :5]) == [120, 131, 128, 129, 128]  # q + 128


@pytest.mark.parametrize("precision", ["int4-rtn", "int8-wo"])
def test_level4_rounds_activation_blocks_to_int8(precision: str) -> None:
    """Accuracy level 4 is the level-1 product with the activation rounded to int8 inside the kernel,
    one symmetric scale amax / 127 per row and block of `block_size` input channels (the last block
    zero-padded): the arithmetic docs/quantization.md states, emulated here in numpy."""
    model = quantized(precision)
    level1, level4 = copy_model(model), copy_model(model)
    LowerQuantForORT(context(precision), accuracy_level=1)(level1)
    LowerQuantForORT(context(precision), accuracy_level=4)(level4)
    exact_nodes = {n.name: n for n in level1.graph}
    for node in level4.graph:  # one linear at a time, on the same input
        if node.op_type != "MatMulNBits":
            continue
        block, k = node.attributes.get_int("block_size", 0), node.attributes.get_int("K", 0)
        single4, single1 = single_linear(level4, node), single_linear(level1, exact_nodes[node.name])
        a = np.random.default_rng(7).standard_normal((5, k)).astype(np.float32) * 3
        y4, y1 = (session(s).run(None, {"a": a})[0] for s in (single4, single1))
        w = dequantized_weight(single1)
        padded = -(-k // block) * block  # int8's blocks of 128 over K=96: one partial block
        blocks = np.pad(a, ((0, 0), (0, padded - k))).reshape(a.shape[0], -1, block)
        scale = np.abs(blocks).max(-1, keepdims=True) / np.float32(127)
        a8 = (np.rint(blocks / scale) * scale).reshape(a.shape[0], -1)[:, :k]
        np.testing.assert_allclose(y4, a8 @ w, rtol=1e-4, atol=1e-4 * np.abs(y1).max())
        assert np.abs(y4 - y1).max() > 100 * np.abs(y4 - a8 @ w).max(), "level 4 must differ from level 1 here"


def single_linear(model: ir.Model, node: ir.Node) -> ir.Model:
    """A model of one MatMulNBits node with input `a` and output `y`, sharing the node's constants."""
    inputs = {"a": (FLOAT, ["m", node.attributes.get_int("K", 0)])}
    init = {str(v.name): v.const_value.numpy() for v in node.inputs[1:] if v is not None}
    attrs = {k: a.value for k, a in node.attributes.items()}
    proto = make_node("MatMulNBits", ["a", *[str(v.name) for v in node.inputs[1:]]], ["y"], domain="com.microsoft", **attrs)
    return small_model([proto], inputs, {"y": (FLOAT, ["m", attrs["N"]])}, init, {"com.microsoft": 1})


def dequantized_weight(model: ir.Model) -> np.ndarray:
    """W [K, N] from a single MatMulNBits model (the exact one) by feeding it the identity."""
    node = next(iter(model.graph))
    k = node.attributes.get_int("K", 0)
    return session(model).run(None, {"a": np.eye(k, dtype=np.float32)})[0]


def test_pipeline_lowers_only_for_ort_fast() -> None:
    integer = pipeline("ort", QuantConfig("int8-sq", ort_kernels="integer"))
    assert "lower-quant-ort" in integer and "lower-quant-ort" not in pipeline("ort", QuantConfig("int8-sq", ort_kernels="exact"))
    with pytest.raises(QuantizationError, match="--ort-kernels integer is int8-sq's per-token integer GEMM"):
        QuantConfig("int8-wo", ort_kernels="integer")
    for precision in ("int8-wo", "int8-sq", "int4-awq", "int4-rtn"):
        fast, exact = pipeline("ort", QuantConfig(precision)), pipeline("ort", QuantConfig(precision, ort_kernels="exact"))
        assert fast.index("lower-quant-ort") > fast.index("validate-quantization")
        assert "lower-quant-ort" not in exact and "lower-quant-ort" in ORT_ONLY_PASSES
        assert "lower-quant-ort" not in pipeline("trt", QuantConfig(precision))
    assert pipeline("ort", QuantConfig("int4-awq"))[5:7] == ["awq-scale", "quantize-int4"]
    assert "awq-scale" not in pipeline("ort", QuantConfig("int4-rtn"))
    # int8-wo is smoothed only for the fast kernel, whose activation rounding outliers would ruin
    fast, exact = pipeline("ort", QuantConfig("int8-wo")), pipeline("ort", QuantConfig("int8-wo", ort_kernels="exact"))
    assert fast[fast.index("quantize-int8-wo") - 1] == "smooth-int8"
    assert "smooth-int8" not in exact and "smooth-int8" not in pipeline("trt", QuantConfig("int8-wo"))


def test_int4_precision_options_are_checked() -> None:
    with pytest.raises(QuantizationError, match="--int4-block-size 48"):
        QuantConfig("int4-rtn", int4_block_size=48)
    with pytest.raises(QuantizationError, match="--ort-kernels 'turbo'"):
        QuantConfig("int4-rtn", ort_kernels="turbo")
    assert ml_dtypes.int4  # the numpy int4 type onnx-ir stores these weights with


# -- int8-sq's per-token form -> ORT's integer GEMM ---------------------------------------------------


def per_token_int8_sq() -> ir.Model:
    model = mlp_model()
    stats = CalibrationStats()
    for name in LINEARS:
        w = np.abs(model.graph.initializers[f"{name}.weight.T"].const_value.numpy())
        stats.act_amax[name], stats.weight_in_amax[name], stats.weight_out_amax[name] = w.max(1), w.max(1), w.max(0)
    config = QuantConfig("int8-sq", smoothquant_alpha=0.5)
    assert config.int8_activation == "per-token"
    QuantizeMatMuls(QuantContext(config, stats), "int8-sq")(model)
    return model


def integer_session(model: ir.Model, exact_switch: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if exact_switch:
        options.add_session_config_entry("session.x64quantprecision", "1")
    proto = ir.serde.serialize_model(model)
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def test_per_token_int8_sq_lowers_to_an_exact_integer_gemm() -> None:
    model = per_token_int8_sq()
    (want,) = run_ort(model, FEED)  # the Q/DQ graph as written: fp32 MatMuls of dequantized codes
    lowered = copy_model(model)
    assert LowerQuantForORT(QuantContext(QuantConfig("int8-sq", ort_kernels="integer"), CalibrationStats()))(lowered).modified
    counts = op_counts(lowered)
    assert counts[("com.microsoft", "MatMulIntegerToFloat")] == 3 and not counts[("", "DequantizeLinear")]
    assert counts[("", "QuantizeLinear")] == 3, "the per-token QuantizeLinear stays: it makes the codes"
    got = integer_session(lowered, exact_switch=True).run(None, FEED)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_per_token_int8_sq_on_the_fast_kernels_is_matmulnbits_on_its_codes() -> None:
    """--ort-kernels fast: each linear reads x itself and becomes int8 MatMulNBits holding the Q/DQ
    graph's weight codes (level 1 then computes x @ DQ(W) exactly); the per-token Q/DQ is gone once
    the pipeline's final clean drops the unused scale chain."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    model = per_token_int8_sq()
    assert LowerQuantForORT(QuantContext(QuantConfig("int8-sq"), CalibrationStats()), accuracy_level=1)(model).modified
    RemoveUnusedNodesPass()(model)
    counts = op_counts(model)
    assert counts[("com.microsoft", "MatMulNBits")] == 3 and not counts[("com.microsoft", "MatMulIntegerToFloat")]
    assert not counts[("", "QuantizeLinear")] and not counts[("", "DequantizeLinear")] and not counts[("", "ReduceMax")]
    nodes = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert all(n.attributes.get_int("bits", 0) == 8 for n in nodes)
    reference = per_token_int8_sq().graph
    for node in nodes:  # the weight each computes with is the DQ graph's, codes and per-channel scales
        (dq, _), = reference.initializers[node.name.removesuffix("/nbits")].uses()  # named after the codes
        codes, scale = (v.const_value.numpy() for v in dq.inputs[:2])  # type: ignore[union-attr]
        np.testing.assert_allclose(dequantized_weight(single_linear(model, node)), codes * scale, rtol=1e-6, atol=1e-7)


def saturating_feed(model: ir.Model) -> dict[str, np.ndarray]:
    """x = +-1 with the signs of gate_proj's first column: after the RMSNorm (gamma ~ 1) every code is
    near +-127 with the weight's sign, so the u8s8 kernel's int16 pair sums (up to 2 x 255 x 127) overflow."""
    w = model.graph.initializers[f"{LAYER}.gate_proj.weight.T.int8"].const_value.numpy()[:, 0]
    return {"x": np.where(w >= 0, 1.0, -1.0).astype(np.float32)[None]}


def test_without_the_exact_switch_a_cpu_without_vnni_saturates() -> None:
    """Why the runtime keeps `session.x64quantprecision=1` on CPUs without VNNI (engine.py)."""
    from llamaforge.runtime.core.engine import VNNI_FLAGS, cpu_flags

    if any(f in cpu_flags() for f in VNNI_FLAGS):
        pytest.skip("this CPU has VNNI: its u8s8 kernel sums in int32 and cannot saturate")
    model = per_token_int8_sq()
    lowered = copy_model(model)
    LowerQuantForORT(QuantContext(QuantConfig("int8-sq", ort_kernels="integer"), CalibrationStats()))(lowered)
    feed = saturating_feed(model)
    exact = integer_session(lowered, exact_switch=True).run(None, feed)[0]
    fast = integer_session(lowered, exact_switch=False).run(None, feed)[0]
    (want,) = run_ort(model, feed)
    np.testing.assert_allclose(exact, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.abs(fast - want).max() > 1e-3 * np.abs(want).max(), "u8s8 did not saturate: the switch would be moot"


def test_the_exact_switch_is_dropped_only_with_vnni() -> None:
    from llamaforge.runtime.core.engine import session_config_for_cpu

    manifest = {"session.x64quantprecision": "1", "session.qdq_matmulnbits_accuracy_level": "1"}
    assert session_config_for_cpu(manifest, frozenset({"avx2", "fma"})) == manifest
    assert session_config_for_cpu(manifest, frozenset({"avx2", "avx512_vnni"})) == {
        "session.qdq_matmulnbits_accuracy_level": "1"}
    assert session_config_for_cpu(manifest, frozenset({"avx_vnni"})) == {"session.qdq_matmulnbits_accuracy_level": "1"}
    assert session_config_for_cpu(manifest, frozenset()) == manifest  # unknown CPU: the exact path
