"""The all-reduce plugin op of tensor-parallel rank graphs: schema, reference, torch op, lowerings."""

from llamaforge.plugins.all_reduce.schema import DOMAIN, OP_TYPE, AllReduceAttrs, register_schema

__all__ = ["DOMAIN", "OP_TYPE", "AllReduceAttrs", "register_schema"]
