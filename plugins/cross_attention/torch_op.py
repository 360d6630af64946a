"""The cross-attention op as PyTorch sees it while tracing: a `torch.library` custom op plus its ONNX translation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnxscript
import torch

from llamaforge.plugins.cross_attention import reference
from llamaforge.plugins.cross_attention.schema import (
    DOMAIN,
    OP_TYPE,
    OPSET_VERSION,
    CrossAttentionAttrs,
    register_schema,
)

register_schema()


@torch.library.custom_op("llamaforge::cross_attention", mutates_args=())
def _cross_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                     past_value: torch.Tensor, cross_attention_mask: torch.Tensor, num_heads: int, num_kv_heads: int,
                     head_dim: int, tokens_per_tile: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    attrs = CrossAttentionAttrs(num_heads, num_kv_heads, head_dim, tokens_per_tile, scale)
    return reference.cross_attention(query, key, value, past_key, past_value, cross_attention_mask, attrs)


@_cross_attention.register_fake
def _(query, key, value, past_key, past_value, cross_attention_mask, *attrs):  # type: ignore[no-untyped-def]
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def cross_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                    past_value: torch.Tensor, cross_attention_mask: torch.Tensor,
                    attrs: CrossAttentionAttrs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cross_attention(query, key, value, past_key, past_value, cross_attention_mask, attrs.num_heads,
                            attrs.num_kv_heads, attrs.head_dim, attrs.tokens_per_tile, attrs.scale)


_opset = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)


def _to_onnx(query, key, value, past_key, past_value, cross_attention_mask, num_heads: int,  # type: ignore[no-untyped-def]
             num_kv_heads: int, head_dim: int, tokens_per_tile: int, scale: float):
    attrs = CrossAttentionAttrs(num_heads, num_kv_heads, head_dim, tokens_per_tile, scale)
    op = getattr(_opset, OP_TYPE)
    return op(query, key, value, past_key, past_value, cross_attention_mask, **attrs.onnx_attributes(), _outputs=3)


TRANSLATION_TABLE: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.ops.llamaforge.cross_attention.default: _to_onnx}
