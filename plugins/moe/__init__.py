"""The mixture-of-experts plugin op (Llama 4): schema, reference implementation, ORT lowering."""

from llamaforge.plugins.moe.schema import DOMAIN, OP_TYPE, MoEAttrs, register_schema

__all__ = ["DOMAIN", "OP_TYPE", "MoEAttrs", "register_schema"]
