"""What every plugin op's schema does the same way: read its attribute dataclass from a node, and
infer output types from input types."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["attrs_from_node", "copy_input_types"]


def attrs_from_node(cls: type[T], attrs: Mapping[str, Any], op_type: str, plugin_version: str) -> T:
    """`cls` (a plugin's attribute dataclass) from a node's attributes: the node's plugin_version
    must be this build's (absent: assumed), and keys that are not fields (the plugin's identity)
    are dropped."""
    version = attrs.get("plugin_version", plugin_version)
    if version != plugin_version:
        raise ValueError(f"{op_type}: plugin_version {version!r} is not supported (this build has {plugin_version!r})")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in attrs.items() if k in names})


def copy_input_types(ctx: Any, pairs: Iterable[tuple[int, int]]) -> None:
    """ONNX type inference: each (output, input) pair's output takes the input's type and shape,
    where both are present (optional ones may not be)."""
    for out_index, in_index in pairs:
        if ctx.has_output(out_index) and ctx.has_input(in_index):
            ctx.set_output_type(out_index, ctx.get_input_type(in_index))
