"""What every plugin op's attribute dataclass does with its ONNX node's attributes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["attrs_from_node"]


def attrs_from_node(cls: type[T], attrs: Mapping[str, Any], op_type: str, plugin_version: str) -> T:
    """`cls` (a plugin's attribute dataclass) from a node's attributes: the node's plugin_version
    must be this build's (absent: assumed), and keys that are not fields (the plugin's identity)
    are dropped."""
    version = attrs.get("plugin_version", plugin_version)
    if version != plugin_version:
        raise ValueError(f"{op_type}: plugin_version {version!r} is not supported (this build has {plugin_version!r})")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in attrs.items() if k in names})
