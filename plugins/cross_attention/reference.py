"""Reference implementation of `llamaforge::CrossAttention` (see `schema.py`), written for clarity."""

from __future__ import annotations

import torch

from llamaforge.plugins.cross_attention.schema import CrossAttentionAttrs


def visible_cache_positions(cross_attention_mask: torch.Tensor, capacity: int, attrs: CrossAttentionAttrs) -> torch.Tensor:
    """bool [batch, seq, capacity]: which cache positions each token attends to (a row that may
    see no tile sees every position)."""
    tile = torch.arange(capacity) // attrs.tokens_per_tile
    allowed = cross_attention_mask[:, :, tile] == 1
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def cross_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                    past_value: torch.Tensor, cross_attention_mask: torch.Tensor,
                    attrs: CrossAttentionAttrs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq, _ = query.shape
    new, capacity = key.shape[1], past_key.shape[2]
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    if new > capacity:
        raise ValueError(f"CrossAttention: {new} new keys do not fit a cache of capacity {capacity}")
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, :, :new] = key.view(batch, new, kvh, d).transpose(1, 2).to(past_key.dtype)
    present_value[:, :, :new] = value.view(batch, new, kvh, d).transpose(1, 2).to(past_value.dtype)

    q = query.float().view(batch, seq, kvh, attrs.group_size, d).permute(0, 2, 3, 1, 4)  # [B, KVH, G, S, D]
    scores = q @ present_key.float()[:, :, None].transpose(-1, -2) * attrs.scale  # [B, KVH, G, S, C]
    visible = visible_cache_positions(cross_attention_mask, capacity, attrs)
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    out = scores.softmax(dim=-1) @ present_value.float()[:, :, None]  # [B, KVH, G, S, D]
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, seq, h * d)
    return out.to(query.dtype), present_key, present_value
