"""Reference implementation of `llamaforge::MoE` (see `schema.py`), written for clarity.

It loops over the experts that received at least one token and runs each on its tokens only, so
it costs what the active experts cost. Arithmetic is in the activation dtype, except the routing
sigmoid (float32), as in transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .schema import MoEAttrs


def route(x: torch.Tensor, router_weight: torch.Tensor, attrs: MoEAttrs) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids [N, k], scores [N, k]) for tokens x [N, hidden]."""
    logits = F.linear(x, router_weight)
    top_logits, experts = torch.topk(logits, attrs.top_k, dim=-1)
    return experts, torch.sigmoid(top_logits.float()).to(x.dtype)


def moe(hidden: torch.Tensor, router_weight: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
        attrs: MoEAttrs) -> torch.Tensor:
    x = hidden.reshape(-1, hidden.shape[-1])
    experts, scores = route(x, router_weight, attrs)
    out = torch.zeros_like(x)
    for e in torch.unique(experts).tolist():  # ascending, as transformers sums its expert outputs
        tokens, slots = torch.nonzero(experts == e, as_tuple=True)  # each token picks an expert at most once
        routed = x[tokens] * scores[tokens, slots, None]  # the score scales the expert's input
        gate, up = (routed @ gate_up_proj[e]).chunk(2, dim=-1)
        out.index_add_(0, tokens, (up * F.silu(gate)) @ down_proj[e])
    return out.reshape(hidden.shape)
