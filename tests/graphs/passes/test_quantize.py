"""The quantization passes of graphs/passes/quantize.py on a small graph:

  quantize-int8-wo / quantize-fp8 (QuantizeMatMuls)  weights stored quantized with a DequantizeLinear in
      front of each linear MatMul, scales amax / qmax from the calibration statistics; W8A8 adds one
      QuantizeLinear -> DequantizeLinear per consuming MatMul; lm_head stays float unless asked for;
  smooth-int8 (SmoothQuant)  1/s folded into the RMSNorm weight, s into the weights: same function;
  quantize-kv-fp8 (QuantizeKVCache)  per-layer K/V scales on the attention op.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from small_graphs import MLP_LAYER, mlp_linears, op_counts, run_ort, small_model
from small_graphs import mlp_model as mlp_model_of

from llamaforge.graphs.passes import quantize
from llamaforge.graphs.passes.quantize import QuantizeKVCache, QuantizeMatMuls, SmoothQuant
from llamaforge.graphs.quantization.recipes import (
    CalibrationStats,
    QuantConfig,
    QuantContext,
    QuantizationError,
    ort_session_config,
)
from llamaforge.graphs.verify import verify
from llamaforge.plugins.attention.schema import DOMAIN, INPUTS, OP_TYPE, AttentionAttrs

FLOAT, INT32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
make_node = onnx.helper.make_node
HIDDEN, FFN, VOCAB = 8, 6, 10
LAYER = MLP_LAYER
LINEARS = mlp_linears(HIDDEN, FFN)


def mlp_model() -> ir.Model:
    return mlp_model_of(HIDDEN, FFN, VOCAB)


def calibration(model: ir.Model) -> CalibrationStats:
    """Amax statistics as calibration would record them: activations measured on `FEED`, weights read."""
    stats = CalibrationStats()
    rng = np.random.default_rng(5)
    for name in LINEARS:
        w = model.graph.initializers[f"{name}.weight.T"].const_value.numpy()
        stats.act_amax[name] = (1 + rng.random(w.shape[0])).astype(np.float32)
        if name.endswith(".up_proj"):  # reads the same input as gate_proj: the same statistics
            stats.act_amax[name] = stats.act_amax[f"{LAYER}.gate_proj"].copy()
        stats.weight_in_amax[name] = np.abs(w).max(axis=1)
        stats.weight_out_amax[name] = np.abs(w).max(axis=0)
    return stats


FEED = {"x": np.random.default_rng(1).standard_normal((3, HIDDEN)).astype(np.float32)}


def quantize_and_check(precision: str, **options: str) -> None:
    """Run QuantizeMatMuls and assert its promise for every linear: the float weight replaced by
    `<W>.int8|fp8` = round(W / scale) read through DequantizeLinear (axis 1 for per-channel int8),
    scale = amax / qmax from the statistics (per output channel for int8, per tensor for fp8),
    zero point 0; with W8A8 a Q/DQ pair with scale max(act amax) / qmax on each MatMul's input;
    lm_head untouched; ONNX Runtime computes x through the dequantized weights."""
    model = mlp_model()
    stats = calibration(model)
    floats = {name: model.graph.initializers[f"{name}.weight.T"].const_value.numpy() for name in LINEARS}
    assert QuantizeMatMuls(QuantContext(QuantConfig(precision, **options), stats.copy()), precision)(model).modified
    verify(model, precision)
    qmax, kind = (127.0, "int8") if precision.startswith("int8") else (448.0, "fp8")
    inits = model.graph.initializers
    for name, w in floats.items():
        assert f"{name}.weight.T" not in inits
        amax = stats.weight_out_amax[name] if kind == "int8" else stats.weight_out_amax[name].max()
        scale = (np.asarray(amax, np.float32) / np.float32(qmax)).astype(np.float32)
        np.testing.assert_array_equal(inits[f"{name}.weight.T.scale"].const_value.numpy(), scale)
        assert not inits[f"{name}.weight.T.zero_point"].const_value.numpy().astype(np.float32).any()
        stored = inits[f"{name}.weight.T.{kind}"].const_value.numpy()
        want = np.clip(np.rint(w / scale), -127, 127).astype(np.int8) if kind == "int8" else \
            np.clip(w / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
        np.testing.assert_array_equal(stored.astype(np.float32), want.astype(np.float32))
        (dq,) = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name == f"{name}.weight.T.{kind}"]
        assert dq.attributes.get_int("axis", 1) == 1 if kind == "int8" else "axis" not in dq.attributes
        (matmul, index), = [(n, i) for n, i in dq.outputs[0].uses()]
        assert matmul.op_type == "MatMul" and index == 1
        x_dq = matmul.inputs[0].producer()
        if precision == "int8-wo":
            assert x_dq is None or x_dq.op_type != "DequantizeLinear"
        else:  # one Q -> DQ per MatMul, scale from that input's activation amax (gate/up share one)
            assert x_dq.op_type == "DequantizeLinear" and x_dq.inputs[0].producer().op_type == "QuantizeLinear"
            act = max(stats.act_amax[n].max() for n in LINEARS if LINEARS[n][0] == LINEARS[name][0])
            assert float(inits[f"{name}.input_scale"].const_value.numpy()) == pytest.approx(act / qmax, rel=1e-6)
    assert "lm_head.weight.T" in inits  # not quantized by default
    counts = op_counts(model)
    assert counts[("", "QuantizeLinear")] == (0 if precision == "int8-wo" else len(LINEARS))
    if precision == "int8-wo":  # weight-only: the graph computes exactly x @ (stored * scale)
        (got,) = run_ort(model, FEED, ort_session_config(precision, None))
        (unquantized,) = run_ort(mlp_model(), FEED)
        reference = mlp_model()  # the float graph with each weight replaced by its dequantized value
        for name in LINEARS:
            value = reference.graph.initializers[f"{name}.weight.T"]
            stored = inits[f"{name}.weight.T.int8"].const_value.numpy().astype(np.float32)
            value.const_value = ir.tensor(stored * inits[f"{name}.weight.T.scale"].const_value.numpy())
        (want,) = run_ort(reference, FEED)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert not np.allclose(got, unquantized, rtol=0, atol=1e-7)  # quantization changed something


@pytest.mark.parametrize("precision", ["int8-wo", "int8-sq", "fp8"])
def test_quantize_matmuls_stores_quantized_weights_with_calibrated_scales(precision: str) -> None:
    # int8-sq with a calibrated per-tensor activation scale here; per token: test_quantize_per_token.py
    quantize_and_check(precision, **({"int8_activation": "static"} if precision == "int8-sq" else {}))


def test_lm_head_is_quantized_only_when_asked() -> None:
    model = mlp_model()
    stats = calibration(model)
    stats.weight_out_amax["lm_head"] = np.abs(model.graph.initializers["lm_head.weight.T"].const_value.numpy()).max(axis=0)
    QuantizeMatMuls(QuantContext(QuantConfig("int8-wo", quantize_lm_head=True), stats), "int8-wo")(model)
    assert "lm_head.weight.T" not in model.graph.initializers and "lm_head.weight.T.int8" in model.graph.initializers


def test_a_wrong_scale_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """`quantize_and_check` rejects a pass that divides amax by the wrong qmax."""
    monkeypatch.setattr(quantize, "scale_from_amax", lambda amax, qmax: (np.asarray(amax, np.float32) / 100).astype(np.float32))
    with pytest.raises(AssertionError):
        quantize_and_check("int8-wo")


def test_smoothquant_folds_into_the_norm_and_keeps_the_function() -> None:
    model = mlp_model()
    stats = calibration(model)
    (want,) = run_ort(model, FEED)
    gate_in = stats.act_amax[f"{LAYER}.gate_proj"].copy()
    ctx = QuantContext(QuantConfig("int8-sq", smoothquant_alpha=0.5), stats)
    assert SmoothQuant(ctx)(model).modified
    verify(model, "smooth-int8")
    inits = model.graph.initializers
    assert "gamma" not in inits and "gamma.smoothed" in inits  # 1/s folded into the RMSNorm weight: no Mul
    # down_proj's 1/s folded into up_proj's output columns (its input is gate * up): no Mul either
    assert all(f"{name}.weight.T.smoothed" in inits for name in LINEARS if not name.endswith("up_proj"))
    assert f"{LAYER}.up_proj.weight.T.smoothed.smoothed" in inits
    assert op_counts(model)[("", "Mul")] == 1  # gate * up only
    (got,) = run_ort(model, FEED)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    smoothed = ctx.stats.act_amax[f"{LAYER}.gate_proj"]
    assert not np.allclose(smoothed, gate_in)  # the statistics now describe the smoothed model
    np.testing.assert_array_equal(smoothed, ctx.stats.act_amax[f"{LAYER}.up_proj"])  # one input, one s


def attention_model(present_key: str = "present_key.1") -> ir.Model:
    attrs = AttentionAttrs(num_heads=2, num_kv_heads=1, head_dim=4)
    cache = ["batch", 1, "capacity", 4]
    node = make_node(OP_TYPE, list(INPUTS), ["output", present_key, "present_value.1"], domain=DOMAIN, name="attn",
                     **attrs.onnx_attributes())
    return small_model([node], {"query": (FLOAT, ["b", "s", 8]), "key": (FLOAT, ["b", "s", 4]), "value": (FLOAT, ["b", "s", 4]),
                                "past_key": (FLOAT, cache), "past_value": (FLOAT, cache), "past_lengths": (INT32, ["b"])},
                       {"output": (FLOAT, ["b", "s", 8]), present_key: (FLOAT, cache), "present_value.1": (FLOAT, cache)},
                       opsets={DOMAIN: 1})


def test_kv_cache_scales_are_set_per_layer() -> None:
    model = attention_model()
    stats = CalibrationStats(k_amax=[1.0, 44.8], v_amax=[2.0, 8.96])
    assert QuantizeKVCache(QuantContext(QuantConfig(kv_cache="fp8"), stats))(model).modified
    (node,) = list(model.graph)
    assert node.attributes.get_string("kv_cache_quant") == "fp8"
    assert node.attributes.get_float("k_scale") == pytest.approx(0.1) and node.attributes.get_float("v_scale") == pytest.approx(0.02)
    verify(model, "quantize-kv-fp8")


@pytest.mark.parametrize("problem", ["no-attention", "unknown-layer", "unnamed-present"])
def test_kv_cache_pass_refuses_what_it_cannot_scale(problem: str) -> None:
    stats = CalibrationStats(k_amax=[1.0], v_amax=[1.0])  # layer 0 only
    model = mlp_model() if problem == "no-attention" else attention_model("present_key.1" if problem == "unknown-layer" else "pk")
    match = {"no-attention": "must run before the attention lowering", "unknown-layer": "not layer 1",
             "unnamed-present": "cannot tell its layer"}[problem]
    with pytest.raises(QuantizationError, match=match):
        QuantizeKVCache(QuantContext(QuantConfig(kv_cache="fp8"), stats))(model)
