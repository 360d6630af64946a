"""The cross-attention plugin op (Llama 3.2 Vision): schema, reference implementation, ORT lowering."""

from llamaforge.plugins.cross_attention.schema import DOMAIN, OP_TYPE, CrossAttentionAttrs, register_schema

__all__ = ["DOMAIN", "OP_TYPE", "CrossAttentionAttrs", "register_schema"]
