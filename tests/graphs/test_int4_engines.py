"""INT4 engines (int4-rtn, int4-awq) and the ONNX Runtime lowerings (graphs/passes/lower_quant_ort.py),
end to end on a tiny random-weight checkpoint: arithmetic, not quality.

  * `--ort-kernels exact` engines (the Q/DQ graph as written) equal a torch oracle: transformers'
    LlamaForCausalLM with every linear but lm_head replaced by its INT4 block quantize-dequantize,
    computed here from the definition; for int4-awq with the AWQ scales read back from the engine's
    calibration.safetensors (inputs divided by s, weight columns multiplied by s before rounding);
  * `--ort-kernels fast` engines (MatMulNBits, accuracy level 4) equal the same oracle with each
    linear's input also rounded to int8 per token and block (scale amax / 127), which is what level 4
    computes (graphs/passes/lower_quant_ort.py; the unit test checks it one layer at a time);
  * int8-sq fast runs int8-wo's kernel on its own codes and equals the same level-4 oracle;
  * int8-sq integer (per-token int8 through MatMulIntegerToFloat) equals int8-sq exact to float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from quant_oracle import first_ambiguous_token, rounding_margin, smoothquant_factors
from tiny_models import TinyBuilds, load_hf_oracle, tiny_config

from llamaforge.build.builder import BuildError, BuildOptions, build_engine
from llamaforge.graphs.quantization.recipes import CalibrationStats
from llamaforge.runtime.core.engine import Engine

pytestmark = pytest.mark.slow  # builds several tiny engines

PROMPT = np.array([[5, 77, 300, 12, 9, 410, 33, 2, 150, 600, 7, 88, 41, 19]], dtype=np.int64)
BLOCK = 32  # tiny_config: hidden 64, ffn 128 -> two or four blocks per output channel


@pytest.fixture(scope="module")
def engine(tiny_builds: TinyBuilds, ckpt: Path, calib_file: Path):  # type: ignore[no-untyped-def]
    def build(precision: str, kernels: str = "exact") -> Path:
        if precision == "fp32":
            return tiny_builds.engine(ckpt)
        return tiny_builds.engine(ckpt, precision=precision, calib=calib_file, int4_block_size=BLOCK, ort_kernels=kernels)
    return build


def logits(engine_dir: Path) -> np.ndarray:
    e = Engine(engine_dir)
    out, _ = e.step(PROMPT, np.zeros(1, np.int32), e.kv.empty(1, 32))
    return out[0]


def fake_int4(w: torch.Tensor, block: int) -> torch.Tensor:
    """HF weight [out, in]: blocks of `block` input channels per output channel, scale amax / 7,
    round half to even, clamp to [-8, 7] (the definition, written out)."""
    out, inputs = w.shape
    blocks = w.reshape(out, inputs // block, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    return (torch.clamp(torch.round(blocks / scale), -8, 7) * scale).reshape(out, inputs)


def fake_int8(w: torch.Tensor) -> torch.Tensor:
    """Per output channel (int8-wo): scale amax / 127."""
    amax = w.abs().amax(1, keepdim=True)
    return torch.clamp(torch.round(w / torch.where(amax > 0, amax / 127, torch.ones_like(amax))), -127, 127) * (amax / 127)


MIN_CHECKED = 4  # prompt tokens compared at least (every logit of each)


def int8_activation_blocks(x: torch.Tensor, block: int, margins: list[torch.Tensor] | None = None) -> torch.Tensor:
    """MatMulNBits accuracy level 4's input rounding: int8, one scale amax / 127 per token and block
    of `block` input channels (the last block zero-padded). `margins` gets, per token [batch, seq],
    the smallest distance of a code from a rounding boundary (half-way between two codes)."""
    k = x.shape[-1]
    padded = torch.nn.functional.pad(x, (0, -(-k // block) * block - k))
    blocks = padded.reshape(*x.shape[:-1], -1, block)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = blocks / scale
    if margins is not None:
        margins.append(rounding_margin(codes.flatten(-2)))
    return (torch.round(codes) * scale).reshape(padded.shape)[..., :k]


def group_scale(stats: CalibrationStats | None, keys: list[str], group: list[torch.nn.Linear],
                tie_heads: Any = None) -> torch.Tensor:
    """The per-input-channel s of a group of linears reading one input: AWQ's (int4-awq), SmoothQuant's
    from the searched alpha (int8-wo on the fast kernels; `tie_heads`: o_proj's, tied over query heads),
    or none."""
    ones = torch.ones(group[0].in_features)
    if stats is None:
        return ones
    if keys[0] in stats.awq_scale:
        return torch.from_numpy(stats.awq_scale[keys[0]])
    if keys[0] in stats.smoothquant_alpha:  # x W^T = (x / s) (W diag(s))^T, s over the group's weights
        alpha = stats.smoothquant_alpha[keys[0]]
        assert all(stats.smoothquant_alpha[k] == alpha for k in keys)  # one input, one alpha
        w_in = torch.stack([m.weight.abs().amax(0) for m in group]).amax(0)
        return smoothquant_factors(torch.from_numpy(stats.act_amax[keys[0]]), w_in, alpha, tie_heads)
    return ones


def oracle_logits(ckpt: Path, stats: CalibrationStats | None, weights: str | None, level4: int = 0,
                  head: bool = False, margins: list[torch.Tensor] | None = None) -> np.ndarray:
    """`weights` None | "int4" | "int8"; `level4`: the MatMulNBits block whose int8 activation rounding
    to emulate (0: none), each rounding's margins appended to `margins`; `head`: lm_head quantized
    too (round to nearest, no smoothing)."""
    model = load_hf_oracle(ckpt)
    hooks = []
    if head and weights is not None:
        with torch.no_grad():
            w = model.lm_head.weight
            w.copy_(fake_int4(w, BLOCK) if weights == "int4" else fake_int8(w))
        hooks.append(model.lm_head.register_forward_pre_hook(
            lambda m, args: (int8_activation_blocks(args[0], level4, margins) if level4 else args[0],)))
    for i, layer in enumerate(model.model.layers):
        names = {m: n for n, m in layer.named_modules()}
        for group in ([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], [layer.self_attn.o_proj],
                      [layer.mlp.gate_proj, layer.mlp.up_proj], [layer.mlp.down_proj]):
            keys = [f"model.layers.{i}.{names[m]}" for m in group]
            s = group_scale(stats, keys, group, model.config if group == [layer.self_attn.o_proj] else None)
            for module in group:
                if weights is None:
                    continue
                with torch.no_grad():
                    module.weight.copy_(fake_int4(module.weight * s, BLOCK) if weights == "int4" else fake_int8(module.weight * s))

                def pre(m, args, s=s):  # type: ignore[no-untyped-def]
                    x = args[0] / s
                    return (int8_activation_blocks(x, level4, margins) if level4 else x,)
                hooks.append(module.register_forward_pre_hook(pre))
    with torch.no_grad():
        out = model(torch.from_numpy(PROMPT)).logits[0].numpy()
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("precision", ["int4-rtn", "int4-awq"])
def test_exact_int4_engine_matches_the_fake_quant_oracle(engine, ckpt: Path, precision: str) -> None:  # type: ignore[no-untyped-def]
    built = engine(precision)
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["quantization"]["int4_block_size"] == BLOCK and manifest["quantization"]["ort_kernels"] == "exact"
    assert "lower-quant-ort" not in manifest["passes"] and not manifest["quantization"]["quantize_lm_head"]
    stats = CalibrationStats.load(built / "calibration.safetensors") if precision == "int4-awq" else None
    if stats is not None:
        assert len(stats.awq_scale) == 2 * 7 and not all(np.allclose(s, 1) for s in stats.awq_scale.values())
    fp32 = oracle_logits(ckpt, None, None)
    np.testing.assert_allclose(logits(engine("fp32")), fp32, atol=1e-4)  # the oracle itself
    want = oracle_logits(ckpt, stats, "int4")
    quant_error = np.abs(want - fp32).max()
    engine_error = np.abs(logits(built) - want).max()
    assert quant_error > 1e-2, "INT4 changed nothing: the test would prove nothing"
    # The same arithmetic up to summation order (and, for AWQ, 1/s folded into the RMSNorm weight).
    assert engine_error < 0.01 * quant_error, (engine_error, quant_error)


@pytest.mark.parametrize("precision", ["int4-rtn", "int4-awq", "int8-wo", "int8-sq"])
def test_fast_engine_matches_the_oracle_with_level4_activation_rounding(engine, ckpt: Path, precision: str) -> None:  # type: ignore[no-untyped-def]
    from llamaforge.graphs.passes.lower_quant_ort import INT8_BLOCK_SIZE

    fast = engine(precision, "fast")
    manifest = json.loads((fast / "manifest.json").read_text())
    assert "lower-quant-ort" in manifest["passes"] and manifest["quantization"]["ort_kernels"] == "fast"
    assert manifest["quantization"]["quantize_lm_head"]  # the default for an untied head on the fast kernels
    stats = CalibrationStats.load(fast / "calibration.safetensors") if precision != "int4-rtn" else None
    if precision.startswith("int8"):  # smoothed (int8-wo: for the kernel's activation rounding, smooths_int8_wo)
        assert stats is not None and len(stats.smoothquant_alpha) == 2 * 7
        assert manifest["quantization"]["scales"]["smoothquant"] == "searched per layer"
    # int8-sq runs the same kernel on its per-channel codes: the per-token rounding of x in its Q/DQ
    # graph becomes the kernel's finer per-token-and-block rounding (graphs/passes/lower_quant_ort.py).
    weights, block = ("int8", INT8_BLOCK_SIZE) if precision.startswith("int8") else ("int4", BLOCK)
    exact = oracle_logits(ckpt, stats, weights, head=True)  # the weights rounded, the activations not
    margins: list[torch.Tensor] = []
    want = oracle_logits(ckpt, stats, weights, level4=block, head=True, margins=margins)
    # From the first token where some activation sits on a rounding boundary (within float noise),
    # engine and oracle may round it differently (one code, seen on int4-awq's gate/up input at
    # 2e-5 of a step from half-way), and attention carries that to every later token: compare the
    # tokens before it, at least MIN_CHECKED of them.
    checked = first_ambiguous_token(margins, PROMPT.shape[1])
    assert checked >= MIN_CHECKED, f"rounding is ambiguous from token {checked}: choose another prompt"
    kernel_error = np.abs(want - exact)[:checked].max()
    engine_error = np.abs(logits(fast) - want)[:checked].max()
    assert kernel_error > 1e-3, "the activation rounding changed nothing: the test would prove nothing"
    # The same arithmetic up to summation order.
    assert engine_error < 0.05 * kernel_error, (engine_error, kernel_error, checked)


def test_int8_sq_integer_kernels_equal_the_qdq_engine(engine) -> None:  # type: ignore[no-untyped-def]
    exact, integer = logits(engine("int8-sq", "exact")), logits(engine("int8-sq", "integer"))
    np.testing.assert_allclose(integer, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())


def test_width_no_int4_block_divides_fails_before_export(tiny_builds: TinyBuilds, calib_file: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llamaforge.build import builder

    ckpt = tiny_builds.hf_checkpoint(tiny_config(intermediate_size=100), seed=1)
    monkeypatch.setattr(builder, "export_model", lambda *a, **k: pytest.fail("the export ran"))
    with pytest.raises(BuildError, match=r"model\.layers\.0\.mlp\.down_proj\.weight has 100 input channels, which no "
                                         r"INT4 block size 32 / 64 / 128 divides"):
        build_engine(BuildOptions(checkpoint=ckpt, out=tmp_path / "e", precision="int4-rtn", calib=calib_file))
    assert not (tmp_path / "e").exists()
