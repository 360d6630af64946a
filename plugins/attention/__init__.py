"""The attention plugin op: schema, reference implementation, and per-backend lowerings."""

from llamaforge.plugins.attention.schema import (
    DOMAIN,
    KV_LAYOUT,
    OP_TYPE,
    PLUGIN_VERSION,
    AttentionAttrs,
    register_schema,
)

__all__ = ["DOMAIN", "KV_LAYOUT", "OP_TYPE", "PLUGIN_VERSION", "AttentionAttrs", "register_schema"]
