"""The all-reduce as PyTorch sees it while tracing: a `torch.library` custom op plus its ONNX
translation, so a rank graph gets one opaque `llamaforge::AllReduce` node per row-parallel layer.

The eager op runs in one process, outside any process group: with world_size 1 it is the identity
(the reference on one input); a larger world_size has no other ranks to sum with, so it refuses.
Tracing happens on PyTorch's meta device, where only the fake (shape) implementation runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnxscript
import torch

from llamaforge.plugins.all_reduce import reference
from llamaforge.plugins.all_reduce.schema import DOMAIN, OP_TYPE, OPSET_VERSION, AllReduceAttrs, register_schema

register_schema()


@torch.library.custom_op("llamaforge::all_reduce", mutates_args=())
def _all_reduce(x: torch.Tensor, world_size: int, reduce: str) -> torch.Tensor:
    attrs = AllReduceAttrs(world_size, reduce)
    if world_size != 1:
        raise RuntimeError(f"llamaforge::all_reduce with world_size={world_size} runs only inside a rank graph; "
                           "eagerly there are no other ranks to sum with")
    return reference.all_reduce([x], attrs)


@_all_reduce.register_fake
def _(x, world_size, reduce):  # type: ignore[no-untyped-def]
    return torch.empty_like(x)


def all_reduce(x: torch.Tensor, attrs: AllReduceAttrs) -> torch.Tensor:
    return _all_reduce(x, attrs.world_size, attrs.reduce)


_opset = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)


def _to_onnx(x, world_size: int, reduce: str):  # type: ignore[no-untyped-def]
    return getattr(_opset, OP_TYPE)(x, **AllReduceAttrs(world_size, reduce).onnx_attributes())


TRANSLATION_TABLE: dict[Callable[..., Any], Callable[..., Any]] = {torch.ops.llamaforge.all_reduce.default: _to_onnx}
