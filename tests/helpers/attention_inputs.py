"""Random inputs of the attention op, shared by the ORT lowering and the Triton kernel tests."""

from __future__ import annotations

import torch

from llamaforge.plugins.attention.schema import AttentionAttrs


def random_inputs(attrs: AttentionAttrs, batch: int, seq: int, capacity: int, past: list[int], seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    return {
        "query": torch.randn(batch, seq, h * d, generator=g).to(dtype),
        "key": torch.randn(batch, seq, kvh * d, generator=g).to(dtype),
        "value": torch.randn(batch, seq, kvh * d, generator=g).to(dtype),
        "past_key": torch.randn(batch, kvh, capacity, d, generator=g).to(dtype),
        "past_value": torch.randn(batch, kvh, capacity, d, generator=g).to(dtype),
        "past_lengths": torch.tensor(past, dtype=torch.int32),
    }
