"""Quantization: calibration, the Q/DQ passes and their validator, the FP8 KV cache, quantized engines.

Oracles: transformers' LlamaForCausalLM with the same fake-quant arithmetic applied in torch
(tests/helpers/quant_oracle.py), and the attention reference with the same KV scales.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import torch
from quant_oracle import oracle_logits as oracle_for
from tiny_models import load_hf_oracle, make_hf_checkpoint, tiny_config

from llamaforge.build.builder import BuildError, BuildOptions, build_engine
from llamaforge.export.checkpoint import open_checkpoint
from llamaforge.graphs.passes.validate_quant import ValidateQuantization
from llamaforge.graphs.quantization.calibrate import (
    CalibrationError,
    calibrate,
    calibration_batch,
    read_calibration_text,
)
from llamaforge.graphs.quantization.recipes import CalibrationStats, QuantConfig, QuantContext, QuantizationError
from llamaforge.runtime.core.engine import Engine, session_config_for_cpu

pytestmark = pytest.mark.slow  # builds a few tiny engines (~10 s each on 2 cores)

LINEARS_PER_LAYER = 5  # qkv (packed), o, gate, up, down
PROMPT = np.array([[5, 77, 300, 12, 9, 410, 33, 2, 150, 600, 7, 88]], dtype=np.int64)


@pytest.fixture(scope="module")
def engines(ckpt: Path, calib_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engines")
    built = {}
    # int8-sq: per-token activations and a searched alpha (the defaults), on the integer GEMM whose numbers
    # are the per-token oracle's (fast = MatMulNBits: test_int4_engines.py); int8-sq-static: TensorRT's form
    for name, precision, kv, options in [("fp32", "fp32", None, {}), ("fp8", "fp8", None, {}),
                                         ("int8-sq", "int8-sq", None, {"ort_kernels": "integer"}),
                                         ("int8-sq-static", "int8-sq", None, {"int8_activation": "static"}),
                                         # the Q/DQ graph the oracle describes (fast = MatMulNBits: test_lower_quant_ort.py)
                                         ("int8-wo", "int8-wo", None, {"ort_kernels": "exact"}),
                                         ("kv-fp8", "fp32", "fp8", {})]:
        built[name] = build_engine(BuildOptions(
            checkpoint=ckpt, out=root / name, precision=precision, kv_cache=kv, calib=None if name == "fp32" else calib_file,
            dump_after=["validate-quantization"] if name == "int8-sq-static" else (), dump_dir=root / "dump", **options))
    return built


def oracle_logits(ckpt: Path, stats: CalibrationStats, precision: str | None, activation: str = "per-token") -> np.ndarray:
    return oracle_for(ckpt, stats, precision, PROMPT, activation)


def prefill_logits(engine_dir: Path) -> np.ndarray:
    engine = Engine(engine_dir)
    past = engine.kv.empty(1, 32)
    logits, _ = engine.step(PROMPT, np.zeros(1, np.int32), past)
    return logits[0]


# -- building -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp8", "int8-sq", "int8-sq-static", "int8-wo", "kv-fp8"])
def test_precision_builds_validated_with_manifest(engines: dict[str, Path], calib_file: Path, name: str) -> None:
    import onnx

    manifest = json.loads((engines[name] / "manifest.json").read_text())
    quant = manifest["quantization"]
    assert quant["calibration"]["path"] == str(calib_file) and quant["calibration"]["tokens"] > 0
    assert "validate-quantization" in manifest["passes"]
    assert (engines[name] / "calibration.safetensors").is_file()
    # what the engine applies: the manifest's settings, less the u8u8 switch on a CPU with VNNI
    assert Engine(engines[name]).session_config == session_config_for_cpu(manifest["ort_session_config"])
    assert manifest["ort_session_config"] != {}
    model = onnx.load(str(engines[name] / "model.onnx"), load_external_data=False)
    quantized = {t.name for t in model.graph.initializer
                 if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.FLOAT8E4M3FN) and len(t.dims) == 2}
    if name == "kv-fp8":
        assert manifest["precision"] == "fp32" and quant["kv_cache"] == "fp8" and not quantized
        assert manifest["kv_cache"]["quantization"]["dtype"] == "float8e4m3fn"
        assert manifest["ort_session_config"] == {"session.disable_quant_qdq": "1"}
    else:
        assert manifest["precision"] == name.removesuffix("-static") and manifest["kv_cache"]["dtype"] == "float32"
        assert len(quantized) == LINEARS_PER_LAYER * 2, sorted(quantized)  # every linear but lm_head
        data = (engines[name] / "model.onnx.data").stat().st_size
        assert data < 0.75 * (engines["fp32"] / "model.onnx.data").stat().st_size


def test_int8_sq_records_its_searched_alphas_and_scales(engines: dict[str, Path]) -> None:
    import onnx

    from llamaforge.graphs.quantization.search import ALPHA_GRID

    for name, activations in (("int8-sq", "per token"), ("int8-sq-static", "per tensor")):
        quant = json.loads((engines[name] / "manifest.json").read_text())["quantization"]
        stats = CalibrationStats.load(engines[name] / "calibration.safetensors")
        assert "smoothquant_alpha" not in quant  # not forced: searched, per layer
        alphas = quant["calibration"]["smoothquant_alpha"]
        assert alphas == stats.smoothquant_alpha and len(alphas) == 7 * 2  # q, k, v, o, gate, up, down; 2 layers
        assert set(alphas.values()) <= set(ALPHA_GRID)
        assert quant["scales"]["activations"].startswith(activations) and quant["scales"]["smoothquant"] == "searched per layer"
        graph = onnx.load(str(engines[name] / "model.onnx"), load_external_data=False).graph
        producers = {out: n for n in graph.node for out in n.output}
        int8 = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2}
        if name == "int8-sq":  # lower-quant-ort: ORT's integer GEMM on the int8 codes of x's per-token QuantizeLinear
            gemms = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
            assert len(gemms) == LINEARS_PER_LAYER * 2 and all(n.input[1] in int8 for n in gemms)
            for gemm in gemms:  # a <- Cast(uint8) <- Add(128) <- Cast(int32) <- QuantizeLinear(x, per-token scale)
                node = producers[gemm.input[0]]
                for op in ("Cast", "Add", "Cast"):
                    assert node.op_type == op
                    node = producers[node.input[0]]
                assert node.op_type == "QuantizeLinear"
        else:  # static: Q/DQ on x, DQ on the weight, a float MatMul (ORT fuses it itself)
            linear_inputs = [producers[n.input[0]] for n in graph.node if n.op_type == "MatMul"
                             and n.input[1] in producers and producers[n.input[1]].input[0] in int8]
            assert len(linear_inputs) == LINEARS_PER_LAYER * 2
            assert all(dq.op_type == "DequantizeLinear" for dq in linear_inputs)
        # one scale computation per input (q/k/v, o, gate/up, down), shared by the MatMuls reading it
        assert sum(n.op_type == "ReduceMax" and n.name.endswith("/token_amax") for n in graph.node) == \
            (4 * 2 if name == "int8-sq" else 0)


# -- numerics against the oracle -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp8", "int8-sq", "int8-sq-static", "int8-wo"])
def test_quantized_logits_match_fake_quant_oracle(engines: dict[str, Path], ckpt: Path, name: str) -> None:
    precision = name.removesuffix("-static")
    stats = CalibrationStats.load(engines[name] / "calibration.safetensors")
    got = prefill_logits(engines[name])
    want = oracle_logits(ckpt, stats, precision, "static" if name.endswith("-static") else "per-token")
    fp32 = oracle_logits(ckpt, stats, None)
    np.testing.assert_allclose(prefill_logits(engines["fp32"]), fp32, atol=1e-4)  # the oracle itself
    quant_error = np.abs(want - fp32).max()
    engine_error = np.abs(got - want).max()
    assert quant_error > 1e-3, "the quantization changed nothing: the test would prove nothing"
    # Same arithmetic up to summation order; a rounding tie flipping one activation code is the
    # most the two can disagree by, far below what quantization itself moves.
    assert engine_error < 0.05 * quant_error, (engine_error, quant_error)


def test_smoothquant_folding_preserves_fp32_function(engines: dict[str, Path], ckpt: Path, calib_file: Path,
                                                     tmp_path: Path) -> None:
    """smooth-int8 alone (no quantization) computes the fp32 model's function."""
    from llamaforge.export.exporter import bind_weights, save_streaming, trace
    from llamaforge.graphs.pipeline import run_pipeline

    checkpoint = open_checkpoint(ckpt)
    model = trace(checkpoint.config, "fp32")
    bind_weights(model, checkpoint, torch.float32)
    stats = CalibrationStats.load(engines["int8-sq"] / "calibration.safetensors")
    passes = ["fold-weight-transposes", "clean", "fuse-qkv", "fuse-rmsnorm", "smooth-int8", "lower-attention-ort", "clean"]
    run_pipeline(model, passes, quant=QuantContext(QuantConfig("int8-sq"), stats), log=lambda _: None)
    folded = [n for n in model.graph.initializers if n.endswith("norm.weight.smoothed")]
    assert len(folded) == 2 * 2, folded  # input_layernorm (q/k/v) and post_attention_layernorm (gate/up) per layer
    # no explicit Mul: down_proj's 1/s goes into up_proj's output columns, o_proj's (tied over the two
    # query heads of each value head, tiny_config's GQA) into the value columns of the packed QKV weight
    assert not [n.name for n in model.graph if n.op_type == "Mul" and n.name.endswith("/smooth")]
    assert sum(n.endswith("up_proj.weight.T.smoothed.smoothed") for n in model.graph.initializers) == 2
    assert sum(n.endswith("qkv_proj.weight.T.smoothed.smoothed") for n in model.graph.initializers) == 2
    s = 1 / (stats.act_amax["model.layers.0.self_attn.o_proj"]
             / CalibrationStats.load(engines["int8-sq"] / "calibration.safetensors").act_amax["model.layers.0.self_attn.o_proj"])
    assert np.ptp(s) > 0.5  # a real rescaling the fold must get right, per value channel
    engine = tmp_path / "smoothed"
    import shutil

    shutil.copytree(engines["fp32"], engine)
    save_streaming(model, engine / "model.onnx")
    np.testing.assert_allclose(prefill_logits(engine), prefill_logits(engines["fp32"]), atol=2e-5, rtol=1e-5)


def test_with_an_fp8_kv_cache_o_proj_keeps_its_smoothing_mul(engines: dict[str, Path], ckpt: Path) -> None:
    """The fp8 cache's V scale was measured on V as the checkpoint computes it, so o_proj's 1/s cannot
    move into the value columns: it stays an explicit Mul (q/k/v, gate/up and down_proj still fold)."""
    from llamaforge.export.exporter import bind_weights, trace
    from llamaforge.graphs.pipeline import run_pipeline

    checkpoint = open_checkpoint(ckpt)
    model = trace(checkpoint.config, "fp32")
    bind_weights(model, checkpoint, torch.float32)
    stats = CalibrationStats.load(engines["int8-sq"] / "calibration.safetensors")
    passes = ["fold-weight-transposes", "clean", "fuse-qkv", "fuse-rmsnorm", "quantize-kv-fp8", "smooth-int8"]
    run_pipeline(model, passes, quant=QuantContext(QuantConfig("int8-sq", kv_cache="fp8"), stats), log=lambda _: None)
    assert [n.name for n in model.graph if n.op_type == "Mul" and n.name.endswith("/smooth")] == \
        [f"model.layers.{i}.self_attn.o_proj/smooth" for i in range(2)]
    assert not any(n.endswith("qkv_proj.weight.T.smoothed.smoothed") for n in model.graph.initializers)


def test_fp8_kv_cache_matches_reference_with_same_scales() -> None:
    import onnxruntime as ort

    from llamaforge.graphs.passes.lower_attention import LowerAttentionForORT
    from llamaforge.plugins.attention.reference import llama_attention
    from llamaforge.plugins.attention.schema import AttentionAttrs, single_op_model

    attrs = AttentionAttrs(num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                           kv_cache_quant="fp8", k_scale=0.011, v_scale=0.007)
    model = ir.from_proto(single_op_model(attrs))
    model.metadata_props["llamaforge.max_positions"] = "64"
    LowerAttentionForORT()(model)
    assert not any(n.op_type == "If" for n in model.graph), "fp8 KV must not take the GQA kernel path"
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    b, s, cap = 2, 5, 16
    q, k, v = (torch.randn(b, s, n * 16, generator=gen) for n in (4, 2, 2))
    past_k, past_v = (torch.randn(b, 2, cap, 16, generator=gen) for _ in range(2))
    lengths = torch.tensor([3, 7], dtype=torch.int32)
    want = llama_attention(q, k, v, past_k, past_v, lengths, attrs)
    got = session.run(None, {"query": q.numpy(), "key": k.numpy(), "value": v.numpy(), "past_key": past_k.numpy(),
                             "past_value": past_v.numpy(), "past_lengths": lengths.numpy()})
    plain = llama_attention(q, k, v, past_k, past_v, lengths, AttentionAttrs(num_heads=4, num_kv_heads=2, head_dim=16))
    for g, w, p in zip(got, want, plain):
        assert np.abs(w.numpy() - p.numpy()).max() > 1e-3  # the scales matter
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5, rtol=1e-5)
    new_v = want[2][0, :, 3:8]  # row 0's new V: on the fp8 grid of its scale
    grid = (new_v / 0.007).to(torch.float8_e4m3fn).float() * 0.007
    torch.testing.assert_close(new_v, grid, rtol=0, atol=1e-7)


# -- the validator --------------------------------------------------------------------------------


def dumped_int8_sq(engines: dict[str, Path]) -> ir.Model:
    """The static int8-sq graph (TensorRT's form), as validate-quantization saw it."""
    return ir.load(engines["int8-sq-static"].parent / "dump" / "after-validate-quantization.onnx")


def validate(model: ir.Model) -> None:
    ValidateQuantization(QuantContext(QuantConfig("int8-sq", int8_activation="static"), CalibrationStats()))(model)


def test_validator_accepts_built_graph(engines: dict[str, Path]) -> None:
    validate(dumped_int8_sq(engines))


def test_validator_rejects_asymmetric_zero_point(engines: dict[str, Path]) -> None:
    model = dumped_int8_sq(engines)
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear")
    zp = q.inputs[2]
    zp.const_value = ir.tensor(np.array(3, dtype=np.int8), name=zp.name)  # type: ignore[union-attr]
    with pytest.raises(QuantizationError, match=f"node '{q.name}'.*zero point .*not 0"):
        validate(model)


def test_validator_rejects_qdq_not_right_before_matmul(engines: dict[str, Path]) -> None:
    model = dumped_int8_sq(engines)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.name.endswith("input_dequantize"))
    matmul, index = next(iter(dq.outputs[0].uses()))
    relu = ir.node("Relu", [dq.outputs[0]], name="misplaced")
    model.graph.insert_before(matmul, relu)
    matmul.replace_input_with(index, relu.outputs[0])
    with pytest.raises(QuantizationError, match=f"node '{dq.name}'.*feeds Relu 'misplaced'.*right before MatMul"):
        validate(model)


def test_validator_rejects_unquantized_weight(engines: dict[str, Path]) -> None:
    model = dumped_int8_sq(engines)
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.name.endswith("weight_dequantize"))
    matmul, _ = next(iter(dq.outputs[0].uses()))
    rows, cols = dq.inputs[0].shape.numpy()  # type: ignore[union-attr]
    float_weight = ir.Value(name="float.weight", const_value=ir.tensor(np.ones((rows, cols), np.float32), name="float.weight"))
    model.graph.register_initializer(float_weight)
    matmul.replace_input_with(1, float_weight)
    with pytest.raises(QuantizationError, match=f"node '{matmul.name}'.*'float.weight'.*unquantized"):
        validate(model)


# -- calibration ----------------------------------------------------------------------------------


def test_calibration_holds_at_most_one_layer(tmp_path: Path, calib_file: Path) -> None:
    """Instrument the checkpoint: at every read, count the tensors read earlier that are still alive."""
    config = tiny_config(num_layers=3)
    checkpoint = open_checkpoint(make_hf_checkpoint(tmp_path / "ckpt", config, seed=1))
    alive: list[weakref.ref[torch.Tensor]] = []
    peak = 0
    original = checkpoint.load

    def load(name: str) -> torch.Tensor:
        nonlocal peak
        tensor = original(name)
        peak = max(peak, sum(r() is not None for r in alive) + 1)
        alive.append(weakref.ref(tensor))
        return tensor

    checkpoint.load = load  # type: ignore[method-assign]
    from llamaforge.runtime.core.tokenizer import HFTokenizer

    tokens = calibration_batch(HFTokenizer(checkpoint.tokenizer_path, {}), read_calibration_text(calib_file),
                               sequences=4, seq_len=32)
    stats = calibrate(checkpoint, tokens, progress=False)
    per_layer = sum(1 for n in checkpoint.tensor_names() if n.startswith("model.layers.0."))
    assert len(alive) == len(checkpoint.tensor_names())  # every tensor read once
    assert peak <= per_layer, f"{peak} checkpoint tensors alive at once; one layer has {per_layer}"
    assert len(stats.k_amax) == 3 and min(stats.k_amax) > 0 and min(stats.v_amax) > 0
    assert stats.act_amax["model.layers.2.mlp.down_proj"].shape == (config.intermediate_size,)


def test_calibration_stats_match_a_full_forward(ckpt: Path, calib_file: Path) -> None:
    """The streamed per-layer statistics equal those of transformers' whole-model forward."""
    from llamaforge.runtime.core.tokenizer import HFTokenizer

    checkpoint = open_checkpoint(ckpt)
    tokens = calibration_batch(HFTokenizer(checkpoint.tokenizer_path, {}), read_calibration_text(calib_file),
                               sequences=3, seq_len=24)
    stats = calibrate(checkpoint, tokens, progress=False)
    model = load_hf_oracle(ckpt)
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].abs().amax((0, 1))))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    for name, amax in seen.items():
        np.testing.assert_allclose(stats.act_amax[name], amax.numpy(), rtol=1e-4, err_msg=name)


def test_calib_errors_name_the_path(tmp_path: Path, ckpt: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(CalibrationError, match=f"CALIB={missing}: no such file"):
        read_calibration_text(missing)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(CalibrationError, match=f"CALIB={empty_dir}: directory holds no files"):
        read_calibration_text(empty_dir)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(CalibrationError, match=f"CALIB={binary}: not UTF-8"):
        read_calibration_text(binary)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n")
    with pytest.raises(CalibrationError, match=f"CALIB={blank}: no text"):
        read_calibration_text(blank)
    with pytest.raises(BuildError, match=f"CALIB={missing}"):  # before any export work
        build_engine(BuildOptions(checkpoint=ckpt, out=tmp_path / "e", precision="fp8", calib=missing))
    with pytest.raises(BuildError, match="CALIB=.*only used by"):
        build_engine(BuildOptions(checkpoint=ckpt, out=tmp_path / "e", precision="fp32", calib=blank))
