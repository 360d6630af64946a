"""The op as PyTorch sees it while tracing: a `torch.library` custom op plus its ONNX translation.

The exporter's model calls `attention(...)`; `torch.onnx.export` sees one opaque node per layer
and `TRANSLATION_TABLE` turns it into one `llamaforge::LlamaAttention` ONNX node.
"""

from __future__ import annotations

import dataclasses

import onnxscript
import torch

from llamaforge.plugins.attention import reference
from llamaforge.plugins.attention.schema import DOMAIN, OP_TYPE, OPSET_VERSION, AttentionAttrs, register_schema

register_schema()  # the exporter validates emitted nodes against registered schemas


@torch.library.custom_op("llamaforge::llama_attention", mutates_args=())
def _llama_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    past_lengths: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    rope_theta: float,
    rope_interleaved: int,
    rope_scaling_type: str,
    rope_scaling_factor: float,
    rope_low_freq_factor: float,
    rope_high_freq_factor: float,
    rope_original_max_positions: int,
    use_rope: int = 1,
    qk_norm: int = 0,
    qk_norm_eps: float = 1e-6,
    attn_chunk_size: int = 0,
    temperature_tuning: int = 0,
    temperature_floor: float = 8192.0,
    temperature_scale: float = 0.1,
    kv_cache_quant: str = "none",
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    attrs = AttentionAttrs(
        num_heads, num_kv_heads, head_dim, scale, rope_theta, rope_interleaved, rope_scaling_type,
        rope_scaling_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_positions,
        use_rope, qk_norm, qk_norm_eps, attn_chunk_size, temperature_tuning, temperature_floor, temperature_scale,
        kv_cache_quant, k_scale, v_scale,
    )
    return reference.llama_attention(query, key, value, past_key, past_value, past_lengths, attrs)


@_llama_attention.register_fake
def _(query, key, value, past_key, past_value, past_lengths, *attrs):  # type: ignore[no-untyped-def]
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    past_lengths: torch.Tensor,
    attrs: AttentionAttrs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The custom op's schema needs each attribute as its own typed argument, in field order.
    return _llama_attention(query, key, value, past_key, past_value, past_lengths, *dataclasses.astuple(attrs))


_opset = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)


def _to_onnx(query, key, value, past_key, past_value, past_lengths,  # type: ignore[no-untyped-def]
             num_heads: int, num_kv_heads: int, head_dim: int, scale: float, rope_theta: float,
             rope_interleaved: int, rope_scaling_type: str, rope_scaling_factor: float,
             rope_low_freq_factor: float, rope_high_freq_factor: float, rope_original_max_positions: int,
             use_rope: int = 1, qk_norm: int = 0, qk_norm_eps: float = 1e-6, attn_chunk_size: int = 0,
             temperature_tuning: int = 0, temperature_floor: float = 8192.0, temperature_scale: float = 0.1,
             kv_cache_quant: str = "none", k_scale: float = 1.0, v_scale: float = 1.0):
    attrs = AttentionAttrs(
        num_heads, num_kv_heads, head_dim, scale, rope_theta, rope_interleaved, rope_scaling_type,
        rope_scaling_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_positions,
        use_rope, qk_norm, qk_norm_eps, attn_chunk_size, temperature_tuning, temperature_floor, temperature_scale,
        kv_cache_quant, k_scale, v_scale,
    )
    op = getattr(_opset, OP_TYPE)
    return op(query, key, value, past_key, past_value, past_lengths, **attrs.onnx_attributes(), _outputs=3)


TRANSLATION_TABLE = {torch.ops.llamaforge.llama_attention.default: _to_onnx}
