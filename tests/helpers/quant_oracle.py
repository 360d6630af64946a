"""The fake-quant torch oracle of a quantized engine (a helper module, not a test file): transformers'
LlamaForCausalLM with the same quantize-dequantize arithmetic applied in torch (weights replaced by
their quantize-dequantize, inputs quantize-dequantized by forward hooks). Used by
tests/graphs/test_quantization.py and, with `tp`, tests/parallel/test_tp_activation_rounding.py.
"""

from __future__ import annotations

from pathlib import Path

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


def per_token_over_ranks(x: torch.Tensor, tp: int) -> torch.Tensor:
    """A row-parallel input's per-token int8 rounding at TP=`tp`: each rank holds `1/tp` of the input
    channels (contiguous, in rank order) and takes its own per-token scale over them."""
    return torch.cat([fq_int8_per_token(part) for part in x.chunk(tp, dim=-1)], dim=-1)


def oracle_logits(ckpt: Path, stats: CalibrationStats, precision: str | None, prompt: np.ndarray,
                  activation: str = "per-token", tp: int = 1) -> np.ndarray:
    """transformers with fake quantization of every linear but lm_head, from the same statistics;
    int8-sq smooths each group with the alpha calibration searched for it (recorded in the stats).
    `tp`: as a TP=`tp` engine rounds int8-sq's per-token activations: o_proj's and down_proj's
    (row-parallel) per rank's shard of the input (weights and their scales are TP=1's)."""
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
                s = (a.double() ** alpha / w_in.double() ** (1 - alpha)).float().clamp(1e-5, 1e5)
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
