"""`quantize-experts-*` (graphs/passes/quantize_experts.py), after `lower-moe-ort`: each expert weight
[E, in, out] is stored quantized, the Loop body reads one expert's slice and its scale row through
DequantizeLinear, and ONNX Runtime computes the MoE with the dequantized weights. Before the lowering
(the MoE op reading the weights whole) the pass refuses."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from small_graphs import op_counts, run_ort, small_model

from llamaforge.graphs.passes import quantize_experts
from llamaforge.graphs.passes.lower_moe import LowerMoEForORT
from llamaforge.graphs.passes.quantize_experts import QuantizeExperts
from llamaforge.graphs.passes.validate_quant import ValidateQuantization
from llamaforge.graphs.quantization.recipes import CalibrationStats, QuantConfig, QuantContext, QuantizationError
from llamaforge.graphs.verify import verify
from llamaforge.plugins.moe import reference
from llamaforge.plugins.moe.schema import DOMAIN, OP_TYPE, MoEAttrs

FLOAT = onnx.TensorProto.FLOAT
HIDDEN, INTER = 8, 6
ATTRS = MoEAttrs(num_experts=4, top_k=2)
PREFIX = "model.layers.0.feed_forward"
EXPERTS = (f"{PREFIX}.experts.gate_up_proj", f"{PREFIX}.experts.down_proj")
HIDDEN_STATES = np.random.default_rng(1).standard_normal((2, 5, HIDDEN)).astype(np.float32)


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    e = ATTRS.num_experts
    return {f"{PREFIX}.router.weight": rng.standard_normal((e, HIDDEN)).astype(np.float32),
            EXPERTS[0]: (0.3 * rng.standard_normal((e, HIDDEN, 2 * INTER))).astype(np.float32),
            EXPERTS[1]: (0.3 * rng.standard_normal((e, INTER, HIDDEN))).astype(np.float32)}


def moe_model(lowered: bool = True) -> ir.Model:
    model = small_model([onnx.helper.make_node(OP_TYPE, ["hidden", *weights()], ["output"], domain=DOMAIN, name="moe",
                                               **ATTRS.onnx_attributes())],
                        {"hidden": (FLOAT, ["batch", "seq", HIDDEN])}, {"output": (FLOAT, ["batch", "seq", HIDDEN])},
                        weights(), {DOMAIN: 1})
    if lowered:
        LowerMoEForORT()(model)
    return model


def int8_context() -> QuantContext:
    return QuantContext(QuantConfig("int8-wo"), CalibrationStats())  # no weight statistics: read from the weights


def quantize_and_check() -> None:
    """Run quantize-experts-int8-wo and assert its promise: no float expert weight left, `<W>.int8`
    = round(W / scale) with scale [E, out] = per expert and output channel amax / 127, a Gather of the
    scale row + DequantizeLinear in the Loop body per expert weight, a graph validate-quantization
    accepts, and ONNX Runtime's output equal to the reference MoE on the dequantized weights."""
    model = moe_model()
    floats = weights()
    assert QuantizeExperts(int8_context(), "int8-wo")(model).modified
    verify(model, "quantize-experts-int8-wo")
    ValidateQuantization(int8_context())(model)
    inits = model.graph.initializers
    dequantized = dict(floats)
    for name in EXPERTS:
        assert name not in inits
        scale = (np.abs(floats[name]).max(axis=1) / np.float32(127)).astype(np.float32)  # [E, out]
        np.testing.assert_allclose(inits[f"{name}.scale"].const_value.numpy(), scale, rtol=1e-6)
        stored = inits[f"{name}.int8"].const_value
        assert stored.dtype == ir.DataType.INT8
        np.testing.assert_array_equal(stored.numpy(), np.clip(np.rint(floats[name] / scale[:, None, :]), -127, 127))
        dequantized[name] = stored.numpy().astype(np.float32) * scale[:, None, :]
    assert op_counts(model)[("", "DequantizeLinear")] == len(EXPERTS)
    (got,) = run_ort(model, {"hidden": HIDDEN_STATES})
    want = reference.moe(torch.from_numpy(HIDDEN_STATES), *(torch.from_numpy(w) for w in dequantized.values()), ATTRS)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_int8_experts_are_stored_quantized_and_dequantized_per_expert_slice() -> None:
    quantize_and_check()


def test_before_the_moe_lowering_the_pass_refuses() -> None:
    with pytest.raises(QuantizationError, match="run lower-moe-ort before quantizing experts"):
        QuantizeExperts(int8_context(), "int8-wo")(moe_model(lowered=False))


def test_fp8_experts_need_calibrated_activation_amax() -> None:
    with pytest.raises(QuantizationError, match="no activation amax for the experts"):
        QuantizeExperts(QuantContext(QuantConfig("fp8"), CalibrationStats()), "fp8")(moe_model())


def test_a_wrong_expert_scale_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """`quantize_and_check` rejects a pass that scales with amax / 100 instead of amax / 127."""
    monkeypatch.setattr(quantize_experts, "scale_from_amax",
                        lambda amax, qmax: (np.asarray(amax, np.float32) / 100).astype(np.float32))
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        quantize_and_check()


# -- INT4 experts: per-expert blocks along the input channels, dequantized whole ---------------------

INT4_HIDDEN, INT4_INTER = 64, 32  # gate_up [E, 64, 64] takes blocks of 64, down [E, 32, 64] blocks of 32


def int4_model() -> tuple[ir.Model, dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    e = ATTRS.num_experts
    floats = {f"{PREFIX}.router.weight": rng.standard_normal((e, INT4_HIDDEN)).astype(np.float32),
              EXPERTS[0]: (0.3 * rng.standard_normal((e, INT4_HIDDEN, 2 * INT4_INTER))).astype(np.float32),
              EXPERTS[1]: (0.3 * rng.standard_normal((e, INT4_INTER, INT4_HIDDEN))).astype(np.float32)}
    model = small_model([onnx.helper.make_node(OP_TYPE, ["hidden", *floats], ["output"], domain=DOMAIN, name="moe",
                                               **ATTRS.onnx_attributes())],
                        {"hidden": (FLOAT, ["batch", "seq", INT4_HIDDEN])},
                        {"output": (FLOAT, ["batch", "seq", INT4_HIDDEN])}, floats, {DOMAIN: 1})
    LowerMoEForORT()(model)
    return model, floats


def test_int4_experts_are_stored_in_per_expert_blocks() -> None:
    model, floats = int4_model()
    context = QuantContext(QuantConfig("int4-rtn", int4_block_size=128), CalibrationStats())
    assert QuantizeExperts(context, "int4-rtn")(model).modified
    verify(model, "quantize-experts-int4")
    ValidateQuantization(context)(model)
    inits, dequantized = model.graph.initializers, dict(floats)
    for name, block in zip(EXPERTS, (64, 32)):
        w = floats[name]  # [E, in, out]; blocks of `block` input channels per expert and output channel
        blocks = w.reshape(w.shape[0], -1, block, w.shape[2])
        amax = np.abs(blocks).max(axis=2)
        scale = np.where(amax > 0, amax / np.float32(7), np.float32(1)).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[:, :, None]), -8, 7)
        dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name == f"{name}.int4")
        assert dq.attributes.get_int("axis", 0) == 1 and dq.attributes.get_int("block_size", 0) == block
        np.testing.assert_array_equal(inits[f"{name}.scale"].const_value.numpy(), scale)
        np.testing.assert_array_equal(inits[f"{name}.int4"].const_value.numpy().astype(np.int8), q.reshape(w.shape))
        dequantized[name] = (q * scale[:, :, None]).reshape(w.shape).astype(np.float32)
        assert name not in inits
    hidden = np.random.default_rng(1).standard_normal((2, 5, INT4_HIDDEN)).astype(np.float32)
    (got,) = run_ort(model, {"hidden": hidden})
    want = reference.moe(torch.from_numpy(hidden), *(torch.from_numpy(w) for w in dequantized.values()), ATTRS)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    # A build configured for blocks of 32 expects 32 on gate_up too.
    with pytest.raises(QuantizationError, match="block_size=64 on axis 1; INT4 weights take block_size=32"):
        ValidateQuantization(QuantContext(QuantConfig("int4-rtn", int4_block_size=32), CalibrationStats()))(model)
