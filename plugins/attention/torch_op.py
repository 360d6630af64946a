"""The op as PyTorch sees it while tracing: a `torch.library` custom op plus its ONNX translation.

The exporter's model calls `attention(...)`; `torch.onnx.export` sees one opaque node per layer
and `TRANSLATION_TABLE` turns it into one `llamaforge::LlamaAttention` ONNX node.

A torch.library schema takes each attribute as its own typed argument, so the custom op's schema
and the translation's signature are generated from `AttentionAttrs` (in field order), and
`attention` flattens the dataclass into that order: this module never lists the attributes.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import onnxscript
import torch

from llamaforge.plugins.attention import reference
from llamaforge.plugins.attention.schema import (
    DOMAIN,
    INPUTS,
    OP_TYPE,
    OPSET_VERSION,
    AttentionAttrs,
    attribute_types,
    flat_signature,
    register_schema,
)

register_schema()  # the exporter validates emitted nodes against registered schemas

_TORCH_SCHEMA_TYPES = {int: "int", float: "float", str: "str"}


def _torch_schema() -> str:
    """`(Tensor query, ..., Tensor past_lengths, int num_heads, ...) -> (Tensor, Tensor, Tensor)`."""
    tensors = [f"Tensor {name}" for name in INPUTS]
    attributes = [f"{_TORCH_SCHEMA_TYPES[kind]} {name}" for name, kind in attribute_types().items()]
    return f"({', '.join(tensors + attributes)}) -> (Tensor, Tensor, Tensor)"


def _run_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                   past_value: torch.Tensor, past_lengths: torch.Tensor,
                   *values: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eager implementation: the six tensors, then the attributes in field order."""
    attrs = AttentionAttrs.from_flat_values(dict(zip(attribute_types(), values, strict=True)))
    return reference.llama_attention(query, key, value, past_key, past_value, past_lengths, attrs)


_llama_attention = torch.library.custom_op("llamaforge::llama_attention", _run_reference, mutates_args=(),
                                           schema=_torch_schema())


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
    # The custom op's schema takes each attribute as its own typed argument, in field order.
    return _llama_attention(query, key, value, past_key, past_value, past_lengths, *dataclasses.astuple(attrs))


_opset = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)


def _emit_node(tensors: dict[str, Any], attrs: AttentionAttrs) -> Any:
    op = getattr(_opset, OP_TYPE)
    return op(*(tensors[name] for name in INPUTS), **attrs.onnx_attributes(), _outputs=3)


# onnxscript tells inputs (unannotated) from attributes (int, float, str) by the signature.
_to_onnx = flat_signature("llama_attention_to_onnx",
                          [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in INPUTS],
                          [], Any, _emit_node)

TRANSLATION_TABLE: dict[Callable[..., Any], Callable[..., Any]] = {torch.ops.llamaforge.llama_attention.default: _to_onnx}
