"""The MoE op as PyTorch sees it while tracing: a `torch.library` custom op plus its ONNX translation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnxscript
import torch

from llamaforge.plugins.moe import reference
from llamaforge.plugins.moe.schema import DOMAIN, OP_TYPE, OPSET_VERSION, MoEAttrs, register_schema

register_schema()


@torch.library.custom_op("llamaforge::moe", mutates_args=())
def _moe(hidden: torch.Tensor, router_weight: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
         num_experts: int, top_k: int) -> torch.Tensor:
    return reference.moe(hidden, router_weight, gate_up_proj, down_proj, MoEAttrs(num_experts, top_k))


@_moe.register_fake
def _(hidden, router_weight, gate_up_proj, down_proj, num_experts, top_k):  # type: ignore[no-untyped-def]
    return torch.empty_like(hidden)


def moe(hidden: torch.Tensor, router_weight: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
        attrs: MoEAttrs) -> torch.Tensor:
    return _moe(hidden, router_weight, gate_up_proj, down_proj, attrs.num_experts, attrs.top_k)


_opset = onnxscript.values.Opset(DOMAIN, OPSET_VERSION)


def _to_onnx(hidden, router_weight, gate_up_proj, down_proj, num_experts: int, top_k: int):  # type: ignore[no-untyped-def]
    op = getattr(_opset, OP_TYPE)
    return op(hidden, router_weight, gate_up_proj, down_proj, **MoEAttrs(num_experts, top_k).onnx_attributes())


TRANSLATION_TABLE: dict[Callable[..., Any], Callable[..., Any]] = {torch.ops.llamaforge.moe.default: _to_onnx}
