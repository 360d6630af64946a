"""Reference implementation of `llamaforge::LlamaAttention`, written for clarity, not speed.

Every backend lowering and kernel is tested against this. The RoPE frequencies reproduce the
float32 arithmetic of the original implementations exactly (HF's `_compute_llama3_parameters` and
Meta's `apply_scaling`): at long positions the angle `position * inv_freq` is large enough that a
different rounding of `inv_freq` would move logits by more than our 1e-4 parity budget.
"""

from __future__ import annotations

import math

import torch

from llamaforge.plugins.attention.schema import AttentionAttrs


def rope_inv_freq(attrs: AttentionAttrs) -> torch.Tensor:
    """Per-pair rotation frequencies [head_dim // 2], float32."""
    d = attrs.head_dim
    inv_freq = 1.0 / (attrs.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(torch.float32) / d))
    if attrs.rope_scaling_type == "llama3":
        factor = attrs.rope_scaling_factor
        low, high = attrs.rope_low_freq_factor, attrs.rope_high_freq_factor
        old_ctx = attrs.rope_original_max_positions
        low_freq_wavelen = old_ctx / low
        high_freq_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(positions: torch.Tensor, attrs: AttentionAttrs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of `positions[...] * inv_freq`, shape positions.shape + [head_dim // 2], float32."""
    angles = positions.to(torch.float32)[..., None] * rope_inv_freq(attrs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [..., head_dim] by cos/sin [..., head_dim // 2] (broadcast over heads by the caller)."""
    if interleaved:  # Meta: pairs are adjacent elements (x0, x1), (x2, x3), ...
        pairs = x.unflatten(-1, (-1, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    half = x.shape[-1] // 2  # HF: pairs are (x[i], x[i + half])
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) over the last axis (Llama 4's weightless QK norm)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def query_temperature(positions: torch.Tensor, attrs: AttentionAttrs) -> torch.Tensor:
    """Llama 4's per-position query scale on NoPE layers, float32, shaped like `positions`."""
    floor = torch.floor((positions.to(torch.float32) + 1.0) / attrs.temperature_floor)
    return torch.log1p(floor) * attrs.temperature_scale + 1.0


FP8_E4M3_MAX = 448.0


def fake_quant_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """ONNX QuantizeLinear(float8e4m3fn, saturate) then DequantizeLinear, in float32: x / scale
    saturated to +-448, rounded to e4m3fn (nearest even), times scale; back in x's dtype."""
    q = (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


def llama_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    past_lengths: torch.Tensor,
    attrs: AttentionAttrs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See `schema.py` for the contract. Arithmetic is float32 whatever the input dtype."""
    batch, seq, _ = query.shape
    capacity = past_key.shape[2]
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    dtype = query.dtype

    positions = past_lengths.to(torch.int64)[:, None] + torch.arange(seq)[None, :]  # [B, S]
    cos, sin = rope_cos_sin(positions, attrs)
    cos, sin = cos[:, None].to(dtype).float(), sin[:, None].to(dtype).float()  # [B, 1, S, D/2]
    q = query.view(batch, seq, h, d).transpose(1, 2).float()
    k = key.view(batch, seq, kvh, d).transpose(1, 2).float()
    v = value.view(batch, seq, kvh, d).transpose(1, 2)
    if attrs.use_rope:
        q = apply_rope(q, cos, sin, bool(attrs.rope_interleaved))
        k = apply_rope(k, cos, sin, bool(attrs.rope_interleaved))
    q, k = q.to(dtype), k.to(dtype)
    if attrs.qk_norm:  # float32 statistics, rounded back to the activation dtype (as HF's L2Norm)
        q, k = rms_normalize(q.float(), attrs.qk_norm_eps).to(dtype), rms_normalize(k.float(), attrs.qk_norm_eps).to(dtype)
    if attrs.temperature_tuning:
        q = (q.float() * query_temperature(positions, attrs)[:, None, :, None]).to(dtype)
    if attrs.kv_cache_quant == "fp8":  # the cache holds what an fp8 cache would
        k, v = fake_quant_fp8(k, attrs.k_scale), fake_quant_fp8(v, attrs.v_scale)

    present_key, present_value = past_key.clone(), past_value.clone()
    for b in range(batch):
        start = int(past_lengths[b])
        n = max(0, min(seq, capacity - start))
        present_key[b, :, start : start + n] = k[b, :, :n]
        present_value[b, :, start : start + n] = v[b, :, :n]

    # Grouped-query attention: query head j reads KV head j // group_size.
    qg = q.float().view(batch, kvh, attrs.group_size, seq, d)
    scores = qg @ present_key.float()[:, :, None].transpose(-1, -2) * attrs.scale  # [B, KVH, G, S, C]
    key_pos = torch.arange(capacity)
    visible = key_pos[None, None, :] <= positions[:, :, None]  # [B, S, C] causal over the cache
    if attrs.attn_chunk_size:
        chunk = attrs.attn_chunk_size
        visible &= (key_pos[None, None, :] // chunk) == (positions[:, :, None] // chunk)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = scores.softmax(dim=-1)
    out = probs @ present_value.float()[:, :, None]  # [B, KVH, G, S, D]
    out = out.reshape(batch, h, seq, d).transpose(1, 2).reshape(batch, seq, h * d)
    return out.to(dtype), present_key, present_value
