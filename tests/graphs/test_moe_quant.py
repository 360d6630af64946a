"""Quantized MoE experts (int8-wo, fp8) on a tiny random Scout-like Llama 4 checkpoint.

The oracle is transformers' `Llama4ForCausalLM` with the same fake-quant arithmetic applied in torch:
every linear but lm_head and the router gets its quantize-dequantized weight (and, for fp8, a
quantize-dequantized input), and each `Llama4TextExperts` its quantize-dequantized expert weights
(per expert and output channel for int8, per expert for fp8) and, for fp8, quantize-dequantized
inputs to both expert matmuls with the layer's calibrated scales.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from tiny_models import load_llama4_oracle, make_llama4_checkpoint, tiny_llama4_config

from llamaforge.build.builder import BuildOptions, build_engine
from llamaforge.export.checkpoint import open_checkpoint
from llamaforge.graphs.passes.validate_quant import ValidateQuantization
from llamaforge.graphs.quantization.calibrate import calibrate
from llamaforge.graphs.quantization.recipes import CalibrationStats, QuantConfig, QuantContext, QuantizationError
from llamaforge.runtime.core.engine import Engine

pytestmark = pytest.mark.slow  # three tiny engine builds

PRECISIONS = ("int8-wo", "fp8")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama4_checkpoint(tmp_path_factory.mktemp("moeq") / "ckpt", tiny_llama4_config(), seed=11)


@pytest.fixture(scope="module")
def engines(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moeq-engines")
    # ort_kernels="exact": the engine computes the Q/DQ graph's own numbers, which the fake-quant oracle
    # reproduces; the fast MatMulNBits path (int8 activations inside the kernel, dense layers only) has
    # its own oracle in test_int4_engines.py.
    return {p: build_engine(BuildOptions(checkpoint=ckpt, out=root / p, precision=p, dump_dir=root / f"dump-{p}",
                                         dump_after=["validate-quantization"] if p != "fp32" else (),
                                         ort_kernels="exact"))
            for p in ("fp32", *PRECISIONS)}


def prompt() -> np.ndarray:
    return torch.randint(3, 640, (1, 40), generator=torch.Generator().manual_seed(3)).numpy()


def engine_logits(engine_dir: Path) -> np.ndarray:
    engine = Engine(engine_dir)
    logits, _ = engine.step(prompt(), np.zeros(1, np.int32), engine.kv.empty(1, 64))
    return logits[0]


def fq_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), -127, 127) * scale


def fq_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x / scale, -448, 448).to(torch.float8_e4m3fn).float() * scale


def quantize_hf(model: torch.nn.Module, stats: CalibrationStats, precision: str) -> None:
    """Fake-quantize transformers' model in place as the engine's graph quantizes it."""
    for i, layer in enumerate(model.model.layers):
        attn, ffn = layer.self_attn, layer.feed_forward
        mlp = ffn.shared_expert if hasattr(ffn, "experts") else ffn
        groups = [[attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj], [mlp.up_proj], [mlp.down_proj]]
        names = {m: n for n, m in layer.named_modules()}
        for group in groups:
            packed_amax = torch.stack([m.weight.abs().amax() for m in group]).amax()  # q/k/v: one MatMul
            act_scale = float(stats.act_amax[f"model.layers.{i}.{names[group[0]]}"].max()) / 448
            for m in group:
                with torch.no_grad():
                    if precision == "fp8":
                        m.weight.copy_(fq_fp8(m.weight, packed_amax / 448))
                        m.register_forward_pre_hook(lambda _, args, s=act_scale: (fq_fp8(args[0], torch.tensor(s)),))
                    else:
                        m.weight.copy_(fq_int8(m.weight, m.weight.abs().amax(1, keepdim=True) / 127))
        if hasattr(ffn, "experts"):
            quantize_hf_experts(ffn.experts, stats, f"model.layers.{i}.feed_forward.experts", precision)


def quantize_hf_experts(experts: torch.nn.Module, stats: CalibrationStats, prefix: str, precision: str) -> None:
    with torch.no_grad():
        for w in (experts.gate_up_proj, experts.down_proj):  # [E, in, out]
            if precision == "fp8":
                w.copy_(fq_fp8(w, w.abs().amax(dim=(1, 2), keepdim=True) / 448))
            else:
                w.copy_(fq_int8(w, w.abs().amax(dim=1, keepdim=True) / 127))
    if precision != "fp8":
        return
    s_in, s_mid = (torch.tensor(float(stats.act_amax[f"{prefix}.{w}"].max()) / 448) for w in ("gate_up_proj", "down_proj"))

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # Llama4TextExperts.forward with Q/DQ'd inputs
        x = fq_fp8(hidden.view(experts.num_experts, -1, experts.hidden_size), s_in)
        gate, up = torch.bmm(x, experts.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(fq_fp8(up * experts.act_fn(gate), s_mid), experts.down_proj).view(-1, experts.hidden_size)

    experts.forward = forward


def oracle_logits(ckpt: Path, stats: CalibrationStats | None, precision: str | None) -> np.ndarray:
    model = load_llama4_oracle(ckpt)
    if precision is not None:
        assert stats is not None
        quantize_hf(model, stats, precision)
    with torch.no_grad():
        return model(torch.from_numpy(prompt())).logits[0].numpy()


def test_calibration_records_expert_inputs_as_transformers_computes_them(ckpt: Path) -> None:
    """Per MoE layer, the experts' input amax (score-scaled hidden states) and SwiGLU-output amax,
    streamed layer by layer, equal what a hook on transformers' experts sees in one full forward."""
    tokens = torch.randint(3, 640, (3, 24), generator=torch.Generator().manual_seed(5))
    stats = calibrate(open_checkpoint(ckpt), tokens, progress=False)
    model = load_llama4_oracle(ckpt)
    seen: dict[str, list[torch.Tensor]] = {}
    for i, layer in enumerate(model.model.layers):
        experts = layer.feed_forward.experts

        def hook(module, args, i=i, experts=experts):  # type: ignore[no-untyped-def]
            x = args[0].view(experts.num_experts, -1, experts.hidden_size)  # unrouted rows are 0: no effect on max
            gate, up = torch.bmm(x, experts.gate_up_proj).chunk(2, dim=-1)
            seen[f"model.layers.{i}.feed_forward.experts"] = [x.abs().amax((0, 1)), (up * experts.act_fn(gate)).abs().amax((0, 1))]

        experts.register_forward_pre_hook(hook)
    with torch.no_grad():
        model(tokens)
    assert len(seen) == 4
    for prefix, (x_amax, mid_amax) in seen.items():
        np.testing.assert_allclose(stats.act_amax[f"{prefix}.gate_up_proj"], x_amax.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.act_amax[f"{prefix}.down_proj"], mid_amax.numpy(), rtol=1e-5, atol=1e-6)
        w = model.model.layers[int(prefix.split(".")[2])].feed_forward.experts.gate_up_proj
        np.testing.assert_array_equal(stats.weight_out_amax[f"{prefix}.gate_up_proj"], w.abs().amax(1).detach().numpy())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_experts_stored_quantized_router_float(engines: dict[str, Path], precision: str) -> None:
    import onnx

    model = onnx.load(str(engines[precision] / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    qtype = onnx.TensorProto.INT8 if precision == "int8-wo" else onnx.TensorProto.FLOAT8E4M3FN
    fmt = "int8" if precision == "int8-wo" else "fp8"
    config = tiny_llama4_config()
    e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
    for layer in config.moe_layer_indices():
        prefix = f"model.layers.{layer}.feed_forward"
        assert inits[f"{prefix}.router.weight.T"].data_type == onnx.TensorProto.FLOAT
        for name, dims, out in (("gate_up_proj", [e, h, 2 * i], 2 * i), ("down_proj", [e, i, h], h)):
            q = inits[f"{prefix}.experts.{name}.{fmt}"]
            assert q.data_type == qtype and list(q.dims) == dims
            assert list(inits[f"{prefix}.experts.{name}.scale"].dims) == ([e, out] if precision == "int8-wo" else [e])
            assert f"{prefix}.experts.{name}" not in inits  # no float copy left
    loops = [n for n in model.graph.node if n.op_type == "Loop"]
    assert len(loops) == len(config.moe_layer_indices())
    for loop in loops:
        body = loop.attribute[0].g
        dqs = [n for n in body.node if n.op_type == "DequantizeLinear"]
        assert len(dqs) == 2  # int8: each gathered weight slice; fp8: each expert matmul's input (W8A8)
        assert any(n.op_type == "QuantizeLinear" for n in body.node) == (precision == "fp8")
    if precision == "fp8":  # no float8 Gather in ONNX: the whole [E, in, out] weight is dequantized per step
        whole = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_proj.fp8")
                 and ".experts." in n.input[0]]
        assert len(whole) == 2 * len(config.moe_layer_indices())


def test_quantized_moe_logits_match_fake_quant_oracle(engines: dict[str, Path], ckpt: Path) -> None:
    fp32 = oracle_logits(ckpt, None, None)
    np.testing.assert_allclose(engine_logits(engines["fp32"]), fp32, atol=1e-4)  # the oracle itself
    for precision in PRECISIONS:
        stats = CalibrationStats.load(engines[precision] / "calibration.safetensors")
        want = oracle_logits(ckpt, stats, precision)
        got = engine_logits(engines[precision])
        quant_error, engine_error = np.abs(want - fp32).max(), np.abs(got - want).max()
        assert quant_error > 1e-3, f"{precision}: the quantization changed nothing: the test would prove nothing"
        assert engine_error < 0.05 * quant_error, (precision, engine_error, quant_error)


def dumped(engines: dict[str, Path], precision: str) -> ir.Model:
    return ir.load(engines[precision].parent / f"dump-{precision}" / "after-validate-quantization.onnx")


def validate(model: ir.Model, precision: str) -> None:
    ValidateQuantization(QuantContext(QuantConfig(precision), CalibrationStats()))(model)


def expert_dequantize(model: ir.Model) -> ir.Node:
    return next(n for n in ir.traversal.RecursiveGraphIterator(model.graph)
                if n.op_type == "DequantizeLinear" and n.name.endswith("/dequantize"))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_validator_accepts_quantized_experts(engines: dict[str, Path], precision: str) -> None:
    validate(dumped(engines, precision), precision)


def test_validator_rejects_scale_row_of_another_expert(engines: dict[str, Path]) -> None:
    model = dumped(engines, "int8-wo")
    dq = expert_dequantize(model)
    row = dq.inputs[1].producer()  # type: ignore[union-attr]
    other = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(0, np.int64), name="other")}, name="other_expert")
    row.graph.insert_before(row, other)  # type: ignore[union-attr]
    row.replace_input_with(1, other.outputs[0])  # type: ignore[union-attr]
    with pytest.raises(QuantizationError, match=f"node '{dq.name}'.*scale gathered .*same index"):
        validate(model, "int8-wo")


def test_validator_rejects_float_expert_weight(engines: dict[str, Path]) -> None:
    model = dumped(engines, "int8-wo")
    dq = expert_dequantize(model)
    gather = dq.inputs[0].producer()  # type: ignore[union-attr]
    name = gather.inputs[0].name.removesuffix(".int8")  # type: ignore[union-attr]
    shape = gather.inputs[0].shape.numpy()  # type: ignore[union-attr]
    float_weight = ir.Value(name=name, const_value=ir.tensor(np.ones(shape, np.float32), name=name))
    model.graph.register_initializer(float_weight)
    plain = ir.node("Gather", [float_weight, gather.inputs[1]], attributes={"axis": 0}, name="float_gather")  # type: ignore[union-attr]
    gather.graph.insert_before(gather, plain)  # type: ignore[union-attr]
    matmul, _ = next(iter(dq.outputs[0].uses()))
    matmul.replace_input_with(1, plain.outputs[0])
    with pytest.raises(QuantizationError, match=f"node 'float_gather'.*{name}.*unquantized"):
        validate(model, "int8-wo")
