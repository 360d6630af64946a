"""int8-sq's per-token activation quantization, SmoothQuant's searched alpha and fp8's scale options
(graphs/passes/quantize.py, graphs/quantization/search.py) on small graphs:

  * the per-token form computes, under ONNX Runtime, exactly the numpy oracle written here
    (scale = max(max|x_row| / 127, float32 tiny), round half to even, clip to 127), on rows with
    a spike and an all-zero row, and differs from per-tensor and from fp32;
  * validate-quantization accepts it and rejects each way of breaking it, naming the node;
  * SmoothQuant uses the alpha calibration chose per group (or the forced one), and fails naming
    the linear when the statistics have none;
  * fp8: per-channel weights, the weight MSE clip, the searched activation clip;
  * the searches: the chosen alpha is the grid's least output error, recorded for every linear of
    the group; too little calibration text fails naming CALIB and both counts.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from small_graphs import op_counts, run_ort, small_model

from llamaforge.graphs.passes.quantize import QuantizeMatMuls, SmoothQuant
from llamaforge.graphs.passes.validate_quant import ValidateQuantization
from llamaforge.graphs.quantization.calibrate import CalibrationError, CalibrationText
from llamaforge.graphs.quantization.recipes import (
    CLIP_GRID,
    CalibrationStats,
    QuantConfig,
    QuantContext,
    QuantizationError,
    fp8_weight_scale,
    smoothing_factors,
)
from llamaforge.graphs.quantization.search import (
    ALPHA_GRID,
    MIN_SEARCH_TOKENS,
    SmoothQuantSearch,
    backend_int8_activation,
    layer_search,
)

FLOAT = onnx.TensorProto.FLOAT
LINEAR = "model.layers.0.mlp.down_proj"
WEIGHT = f"{LINEAR}.weight.T"
IN, OUT = 16, 5


def linear_model(rank: int = 3) -> ir.Model:
    weight = np.random.default_rng(0).standard_normal((IN, OUT)).astype(np.float32)
    dims = ["b", "s", IN][-rank:]
    nodes = [onnx.helper.make_node("MatMul", ["x", WEIGHT], ["y"])]
    return small_model(nodes, {"x": (FLOAT, dims)}, {"y": (FLOAT, [*dims[:-1], OUT])}, {WEIGHT: weight})


def context(precision: str = "int8-sq", **options: object) -> QuantContext:
    stats = CalibrationStats(act_amax={LINEAR: np.full(IN, 3.0, np.float32)},
                             weight_out_amax={LINEAR: np.abs(linear_model().graph.initializers[WEIGHT]
                                                             .const_value.numpy()).max(axis=0)})
    return QuantContext(QuantConfig(precision, **options), stats)  # type: ignore[arg-type]


def feed(rank: int = 3) -> np.ndarray:
    x = np.random.default_rng(3).standard_normal((2, 4, IN)).astype(np.float32)
    x[0, 1, 7] = 250.0  # a massive activation on one token
    x[1, 2] = 0.0  # an all-zero token: its scale is the floor, nothing divides by 0
    return x if rank == 3 else x.reshape(-1, IN)


def oracle(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per-token int8 of x, per-output-channel int8 of the weight, fp32 products."""
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / np.float32(127), np.finfo(np.float32).tiny)
    xq = np.clip(np.rint(x / scale), -127, 127) * scale
    w_scale = (np.abs(weight).max(axis=0) / np.float32(127)).astype(np.float32)
    wq = np.clip(np.rint(weight / w_scale), -127, 127) * w_scale
    return (xq.astype(np.float64) @ wq.astype(np.float64)).astype(np.float32)


@pytest.mark.parametrize("rank", [2, 3])
def test_per_token_int8_computes_the_oracle(rank: int) -> None:
    model = linear_model(rank)
    weight = model.graph.initializers[WEIGHT].const_value.numpy().copy()
    assert QuantizeMatMuls(context(), "int8-sq")(model).modified
    counts = op_counts(model)
    assert counts[("", "ReduceMax")] == 1 and counts[("", "QuantizeLinear")] == 1
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    assert len(q.inputs) == 2 and q.attributes.get_int("block_size") == IN and q.attributes.get_int("axis") == -1
    x = feed(rank)
    (got,) = run_ort(model, {"x": x})
    want = oracle(x, weight)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.isfinite(got).all()
    static = linear_model(rank)  # the same graph with one calibrated per-tensor scale
    QuantizeMatMuls(context(int8_activation="static"), "int8-sq")(static)
    (per_tensor,) = run_ort(static, {"x": x})
    assert np.abs(per_tensor - want).max() > 100 * np.abs(got - want).max() + 1e-3  # the spike ruins per tensor
    assert np.abs(got - x @ weight).max() > 1e-4  # quantization happened


def test_gate_and_up_share_one_scale_computation() -> None:
    nodes = [onnx.helper.make_node("MatMul", ["x", "model.layers.0.mlp.gate_proj.weight.T"], ["g"]),
             onnx.helper.make_node("MatMul", ["x", "model.layers.0.mlp.up_proj.weight.T"], ["u"]),
             onnx.helper.make_node("Add", ["g", "u"], ["y"])]
    rng = np.random.default_rng(1)
    weights = {f"model.layers.0.mlp.{n}.weight.T": rng.standard_normal((IN, OUT)).astype(np.float32) for n in ("gate_proj", "up_proj")}
    model = small_model(nodes, {"x": (FLOAT, ["b", IN])}, {"y": (FLOAT, ["b", OUT])}, weights)
    stats = CalibrationStats(act_amax={f"model.layers.0.mlp.{n}": np.ones(IN, np.float32) for n in ("gate_proj", "up_proj")})
    ctx = QuantContext(QuantConfig("int8-sq"), stats)
    QuantizeMatMuls(ctx, "int8-sq")(model)
    counts = op_counts(model)
    assert counts[("", "ReduceMax")] == 1 and counts[("", "QuantizeLinear")] == 2  # one scale, a Q/DQ per MatMul
    ValidateQuantization(ctx)(model)


def validate(model: ir.Model, **options: object) -> None:
    ValidateQuantization(context(**options))(model)


def quantized() -> ir.Model:
    model = linear_model()
    QuantizeMatMuls(context(), "int8-sq")(model)
    return model


def test_validator_accepts_the_per_token_form() -> None:
    validate(quantized())


def by_op(model: ir.Model, op_type: str) -> ir.Node:
    return next(n for n in model.graph if n.op_type == op_type)


def break_qmax(model: ir.Model) -> None:
    div = by_op(model, "Div")
    div.inputs[1].const_value = ir.tensor(np.array(100.0, np.float32), name=div.inputs[1].name)  # type: ignore[union-attr]


def add_zero_point(model: ir.Model) -> None:
    q = by_op(model, "QuantizeLinear")
    zero = ir.Value(name="zp", const_value=ir.tensor(np.array(0, np.int8), name="zp"))
    model.graph.register_initializer(zero)
    q.resize_inputs(3)
    q.replace_input_with(2, zero)


def wrong_block(model: ir.Model) -> None:
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.name.endswith("input_dequantize"))
    dq.attributes["block_size"] = ir.AttrInt64("block_size", IN // 2)


def scale_of_another_tensor(model: ir.Model) -> None:
    """The scale computed from x * 2 while the Q quantizes x."""
    abs_node = by_op(model, "Abs")
    two = ir.Value(name="two", const_value=ir.tensor(np.array(2.0, np.float32), name="two"))
    model.graph.register_initializer(two)
    mul = ir.node("Mul", [abs_node.inputs[0], two], name="doubled")
    model.graph.insert_before(abs_node, mul)
    abs_node.replace_input_with(0, mul.outputs[0])


@pytest.mark.parametrize(("breaker", "options", "message"), [
    (break_qmax, {}, "scale .* is not max\\(ReduceMax\\(\\|x\\|, axes=\\[-1\\]\\) / 127, floor\\)"),
    (add_zero_point, {}, "has a zero point"),
    (wrong_block, {}, "block_size 8; one block must span the last axis"),
    (scale_of_another_tensor, {}, "is not max\\(ReduceMax"),
    (lambda m: None, {"int8_activation": "static"}, "per-token activation quantization is only int8-sq's "
                                                    "--int8-activation per-token form \\(this build: PRECISION=int8-sq, "
                                                    "--int8-activation static\\)"),
], ids=["qmax-not-127", "zero-point", "block-not-the-hidden-axis", "scale-of-another-tensor", "static-config"])
def test_validator_rejects_a_broken_per_token_form(breaker, options, message) -> None:  # type: ignore[no-untyped-def]
    model = quantized()
    breaker(model)
    with pytest.raises(QuantizationError, match=f"validate-quantization: node '[^']+' \\((Quantize|Dequantize)Linear\\): .*{message}"):
        validate(model, **options)


def test_trt_keeps_int8_sq_static() -> None:
    assert backend_int8_activation("ort", None) == "per-token"
    assert backend_int8_activation("trt", None) == "static"
    assert backend_int8_activation("ort", "static") == "static"
    with pytest.raises(QuantizationError, match="--int8-activation per-token: TensorRT has no ONNX form"):
        backend_int8_activation("trt", "per-token")


# -- SmoothQuant's alpha -----------------------------------------------------------------------------


def norm_model() -> tuple[ir.Model, CalibrationStats]:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((IN, OUT)).astype(np.float32)
    nodes = [onnx.helper.make_node("RMSNormalization", ["x", "gamma"], ["n"], axis=-1, epsilon=1e-5),
             onnx.helper.make_node("MatMul", ["n", "model.layers.0.mlp.gate_proj.weight.T"], ["y"])]
    model = small_model(nodes, {"x": (FLOAT, ["b", IN])}, {"y": (FLOAT, ["b", OUT])},
                        {"gamma": np.ones(IN, np.float32), "model.layers.0.mlp.gate_proj.weight.T": w})
    stats = CalibrationStats(act_amax={"model.layers.0.mlp.gate_proj": (1 + 10 * rng.random(IN)).astype(np.float32)},
                             weight_in_amax={"model.layers.0.mlp.gate_proj": np.abs(w).max(axis=1)})
    return model, stats


@pytest.mark.parametrize(("forced", "searched"), [(None, 0.8), (0.3, 0.8)])
def test_smoothquant_takes_the_searched_or_the_forced_alpha(forced: float | None, searched: float) -> None:
    model, stats = norm_model()
    stats.smoothquant_alpha["model.layers.0.mlp.gate_proj"] = searched
    a, w = stats.act_amax["model.layers.0.mlp.gate_proj"].copy(), stats.weight_in_amax["model.layers.0.mlp.gate_proj"]
    SmoothQuant(QuantContext(QuantConfig("int8-sq", smoothquant_alpha=forced), stats))(model)
    folded = model.graph.initializers["gamma.smoothed"].const_value.numpy()
    np.testing.assert_allclose(folded, 1 / smoothing_factors(a, w, searched if forced is None else forced), rtol=1e-6)


def test_smoothquant_without_a_searched_alpha_names_the_linear() -> None:
    model, stats = norm_model()
    with pytest.raises(QuantizationError, match="no searched SmoothQuant alpha for 'model.layers.0.mlp.gate_proj'"):
        SmoothQuant(QuantContext(QuantConfig("int8-sq"), stats))(model)


def test_alpha_search_records_the_least_error_for_the_whole_group() -> None:
    """Two linears reading one input with an outlier channel: the recorded alpha is the grid point
    whose per-token int8 output error, recomputed here in numpy (s fit on the first half of the
    tokens, the error measured on the second), is the least, and beats alpha 0."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((MIN_SEARCH_TOKENS, IN)).astype(np.float32)
    x[:, 3] *= 60.0  # a channel outlier
    weights = {f"mlp.{n}.weight": torch.from_numpy(rng.standard_normal((OUT, IN)).astype(np.float32))
               for n in ("gate_proj", "up_proj")}
    search = SmoothQuantSearch("per-token")
    t = torch.from_numpy(x)
    search.capture("mlp.gate_proj", t)
    search.capture("mlp.up_proj", t)
    stats = CalibrationStats()
    search.finish("model.layers.0.", weights, stats)
    alpha = stats.smoothquant_alpha["model.layers.0.mlp.gate_proj"]
    assert stats.smoothquant_alpha["model.layers.0.mlp.up_proj"] == alpha

    fit, held = x[: len(x) // 2], x[len(x) // 2:]

    def error(a: float) -> float:
        amax, w_in = np.abs(fit).max(0), np.stack([w.numpy() for w in weights.values()]).__abs__().max(axis=(0, 1))
        s = smoothing_factors(amax, w_in, a)
        xs = held / s
        scale = np.maximum(np.abs(xs).max(-1, keepdims=True) / 127, np.finfo(np.float32).tiny)
        xq = np.clip(np.rint(xs / scale), -127, 127) * scale
        total = 0.0
        for w in weights.values():
            ws = w.numpy() * s
            wscale = np.abs(ws).max(1, keepdims=True) / 127
            want = held @ w.numpy().T
            total += ((xq @ (np.clip(np.rint(ws / wscale), -127, 127) * wscale).T - want) ** 2).sum() / (want ** 2).sum()
        return total / 2

    errors = [error(a) for a in ALPHA_GRID]
    assert alpha == ALPHA_GRID[int(np.argmin(errors))]
    assert error(alpha) < 0.5 * error(0.0)  # smoothing pays off on an outlier channel


def test_a_search_on_too_little_text_names_calib_and_the_counts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    calib = CalibrationText("text", {"kind": "file", "path": str(tmp_path / "small.txt")})
    tokens = torch.zeros(2, 256, dtype=torch.int64)
    for config, what in [(QuantConfig("int8-sq"), "SmoothQuant alpha search"),
                         (QuantConfig("fp8", fp8_activation_scale="mse"), "fp8 mse activation scale search")]:
        with pytest.raises(CalibrationError, match=f"CALIB={tmp_path / 'small.txt'}: 512 calibration tokens \\(2 sequences "
                                                   f"of 256\\) found; the {what}.* needs at least {MIN_SEARCH_TOKENS}"):
            layer_search(config, calib, tokens)
    assert layer_search(QuantConfig("int8-sq", smoothquant_alpha=0.5), calib, tokens) is None  # forced: no search
    assert layer_search(QuantConfig("fp8"), calib, tokens) is None  # amax: no search


# -- fp8 scales ---------------------------------------------------------------------------------------


def test_fp8_per_channel_weights_and_searched_clips() -> None:
    model = linear_model()
    weight = model.graph.initializers[WEIGHT].const_value.numpy().copy()
    ctx = context("fp8", fp8_weights="per-channel", fp8_weight_scale="mse", fp8_activation_scale="percentile")
    ctx.stats.act_clip[LINEAR] = 1.5
    QuantizeMatMuls(ctx, "fp8")(model)
    inits = model.graph.initializers
    scale = inits[f"{WEIGHT}.scale"].const_value.numpy()
    assert scale.shape == (OUT,)
    np.testing.assert_array_equal(scale, fp8_weight_scale(weight, "mse", per_channel=True))
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name == f"{WEIGHT}.fp8")
    assert dq.attributes.get_int("axis") == 1
    assert float(inits[f"{LINEAR}.input_scale"].const_value.numpy()) == pytest.approx(1.5 / 448)
    ValidateQuantization(ctx)(model)


def test_fp8_weight_mse_clip_is_never_worse_than_amax() -> None:
    w = np.random.default_rng(6).standard_normal((64, 8)).astype(np.float32)
    w[0, 0] = 40.0  # one outlier weight stretches the amax scale
    for per_channel in (False, True):
        def error(scale: np.ndarray) -> float:
            return float(((np.clip(w / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale - w) ** 2).sum())

        amax, mse = fp8_weight_scale(w, "amax", per_channel), fp8_weight_scale(w, "mse", per_channel)
        assert error(mse) <= error(amax)
        ratio = mse / amax
        assert np.all(np.isin(np.round(ratio, 3), np.round(np.asarray(CLIP_GRID, np.float32), 3)))
