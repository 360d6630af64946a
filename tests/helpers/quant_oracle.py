"""The fake-quant torch oracle of a quantized engine (a helper module, not a test file): transformers'
LlamaForCausalLM with the same quantize-dequantize arithmetic applied in torch (weights replaced by
their quantize-dequantize, inputs quantize-dequantized by forward hooks). Used by
tests/graphs/test_quantization.py and, with `tp`, tests/parallel/test_tp_activation_rounding.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tiny_models import load_hf_oracle

from llamaforge.graphs.quantization.recipes import CalibrationStats


def fq_int8(x: torch.Tensor, scale: torch.Tensor, low: float = -127) -> torch.Tensor:
    """Weights are stored in -127..127 (recipes.quantize_int8); an activation's QuantizeLinear
    saturates to int8's -128..127 (low=-128), which a static scale reaches on values beyond the
    calibration range."""
    return torch.clamp(torch.round(x / scale), low, 127) * scale


def fq_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x / scale, -448, 448).to(torch.float8_e4m3fn).float() * scale


def fq_int8_per_token(x: torch.Tensor) -> torch.Tensor:
    """int8-sq's per-token activation scale, max(max|x_token| / 127, float32 tiny), as the graph computes it."""
    return fq_int8(x, torch.clamp(x.abs().amax(-1, keepdim=True) / 127, min=torch.finfo(torch.float32).tiny))


# A code this close to half-way between two int8 codes can round either way: an engine computes the
# rounded value in another float order than the oracle (RMSNorm with 1/s folded into its weight, ORT's
# attention kernel, a TP all-reduce), a difference of about an ulp of the token's (block's) largest
# value, whose code is 127: one float32 ulp is up to 127 * 2^-23 = 1.5e-5 of a code step. Two ulps.
# (Flips seen: at 8e-6 and 2e-5 of a step from half-way; none at 3.8e-5 to 7.6e-5.)
AMBIGUOUS_CODE = 2 * 127 * 2.0**-23


def rounding_margin(codes: torch.Tensor) -> torch.Tensor:
    """[..., seq, channels] codes before rounding -> [..., seq]: each token's smallest distance of a
    code from a rounding boundary (half-way between two integers)."""
    return (codes - torch.floor(codes) - 0.5).abs().amin(-1)


def first_ambiguous_token(margins: list[torch.Tensor], tokens: int) -> int:
    """The first token (of batch row 0) where some rounding the oracle did was within AMBIGUOUS_CODE
    of a boundary, or `tokens`. From there on an engine may have rounded one code the other way, and
    attention carries that to every later token, so a comparison stops before it."""
    if not margins:
        return tokens
    ambiguous = torch.nonzero(torch.stack([m.reshape(-1, m.shape[-1])[0] for m in margins]).amin(0) < AMBIGUOUS_CODE)
    return int(ambiguous[0, 0]) if len(ambiguous) else tokens


def per_token_over_ranks(x: torch.Tensor, tp: int) -> torch.Tensor:
    """A row-parallel input's per-token int8 rounding at TP=`tp`: each rank holds `1/tp` of the input
    channels (contiguous, in rank order) and takes its own per-token scale over them."""
    return torch.cat([fq_int8_per_token(part) for part in x.chunk(tp, dim=-1)], dim=-1)


def smoothquant_factors(a: torch.Tensor, w_in: torch.Tensor, alpha: float, tie_heads: Any = None) -> torch.Tensor:
    """SmoothQuant's s = a^alpha / w_in^(1 - alpha) per input channel, clamped to [1e-5, 1e5]. With
    `tie_heads` (the HF config; o_proj's input), a and w_in are first tied (max) over the query heads
    that read one value head (head h reads value head h // group), so 1/s can go into the value
    projection's columns."""
    if tie_heads is not None:
        head_dim = getattr(tie_heads, "head_dim", None) or tie_heads.hidden_size // tie_heads.num_attention_heads
        group = tie_heads.num_attention_heads // tie_heads.num_key_value_heads

        def tie(v: torch.Tensor) -> torch.Tensor:
            grouped = v.reshape(-1, group, head_dim)
            return grouped.amax(dim=1, keepdim=True).expand_as(grouped).reshape(v.shape)

        a, w_in = tie(a), tie(w_in)
    return (a.double() ** alpha / w_in.double() ** (1 - alpha)).float().clamp(1e-5, 1e5)


def oracle_logits(ckpt: Path, stats: CalibrationStats, precision: str | None, prompt: np.ndarray,
                  activation: str = "per-token", tp: int = 1, margins: list[torch.Tensor] | None = None) -> np.ndarray:
    """transformers with fake quantization of every linear but lm_head, from the same statistics;
    int8-sq smooths each group with the alpha calibration searched for it (recorded in the stats);
    o_proj's amax statistics are first tied (max) over the query heads that share a value head.
    `tp`: as a TP=`tp` engine rounds int8-sq's per-token activations: o_proj's and down_proj's
    (row-parallel) per rank's shard of the input (weights and their scales are TP=1's). `margins`:
    each per-token activation rounding's `rounding_margin` is appended to it."""
    model = load_hf_oracle(ckpt)
    hooks = []
    for i, layer in enumerate(model.model.layers):
        groups = [[layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], [layer.self_attn.o_proj],
                  [layer.mlp.gate_proj, layer.mlp.up_proj], [layer.mlp.down_proj]]
        names = {m: n for n, m in layer.named_modules()}
        for group in groups:
            keys = [f"model.layers.{i}.{names[m]}" for m in group]
            a = torch.from_numpy(stats.act_amax[keys[0]])
            s = torch.ones_like(a)
            if precision == "int8-sq":  # SmoothQuant: x W^T = (x / s) (W diag(s))^T, s over the group's weights
                alpha = stats.smoothquant_alpha[keys[0]]
                assert all(stats.smoothquant_alpha[k] == alpha for k in keys)  # one input, one alpha
                w_in = torch.stack([m.weight.abs().amax(0) for m in group]).amax(0)
                s = smoothquant_factors(a, w_in, alpha, model.config if group == [layer.self_attn.o_proj] else None)
            # q/k/v are one packed MatMul in the engine: one per-tensor fp8 scale for the three.
            packed_amax = torch.stack([m.weight.abs().amax() for m in group]).amax()
            for m in group:
                with torch.no_grad():
                    w = m.weight * s  # HF weight [out, in]: column j scaled by s_j
                    if precision == "fp8":
                        m.weight.copy_(fq_fp8(w, (packed_amax if len(group) == 3 else w.abs().amax()) / 448))
                    elif precision in ("int8-sq", "int8-wo"):
                        m.weight.copy_(fq_int8(w, w.abs().amax(1, keepdim=True) / 127))
                act_scale = (a / s).amax() / (448 if precision == "fp8" else 127)
                fq = fq_fp8 if precision == "fp8" else fq_int8

                row_parallel = m in (layer.self_attn.o_proj, layer.mlp.down_proj)

                def pre(module, args, s=s, act_scale=act_scale, fq=fq, row_parallel=row_parallel):  # type: ignore[no-untyped-def]
                    x = args[0] / s
                    if precision == "int8-sq" and activation == "per-token" and margins is not None:
                        for part in x.chunk(tp if row_parallel else 1, dim=-1):
                            scale = torch.clamp(part.abs().amax(-1, keepdim=True) / 127, min=torch.finfo(torch.float32).tiny)
                            margins.append(rounding_margin(part / scale))
                    if precision == "int8-sq" and activation == "per-token":
                        return (per_token_over_ranks(x, tp) if row_parallel else fq_int8_per_token(x),)
                    if precision == "int8-sq":
                        return (fq_int8(x, act_scale, low=-128),)
                    return (fq(x, act_scale) if precision == "fp8" else x,)

                hooks.append(m.register_forward_pre_hook(pre))
    with torch.no_grad():
        logits = model(torch.from_numpy(prompt)).logits[0].numpy()
    for h in hooks:
        h.remove()
    return logits
