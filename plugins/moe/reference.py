"""Reference implementation of `llamaforge::MoE` (see `schema.py`), written for clarity.

It loops over the experts that received at least one token and runs each on its tokens only, so
it costs what the active experts cost. Arithmetic is in the activation dtype, except the routing
sigmoid (float32), as in transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamaforge.plugins.moe.schema import MoEAttrs


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


def expert_input_amax(hidden: torch.Tensor, router_weight: torch.Tensor, gate_up_proj: torch.Tensor,
                      down_proj: torch.Tensor, attrs: MoEAttrs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel max |input| of the experts' two matmuls over every routed token, all experts
    together: ([hidden] of the score-scaled hidden states, [intermediate] of the SwiGLU output).
    Calibration records these for fp8 W8A8 experts (one activation scale per MoE layer and matmul)."""
    x = hidden.reshape(-1, hidden.shape[-1])
    experts, scores = route(x, router_weight, attrs)
    gate_up_amax = x.new_zeros(x.shape[-1])
    down_amax = x.new_zeros(down_proj.shape[1])
    for e in torch.unique(experts).tolist():
        tokens, slots = torch.nonzero(experts == e, as_tuple=True)
        routed = x[tokens] * scores[tokens, slots, None]
        gate, up = (routed @ gate_up_proj[e]).chunk(2, dim=-1)
        gate_up_amax = torch.maximum(gate_up_amax, routed.abs().amax(dim=0))
        down_amax = torch.maximum(down_amax, (up * F.silu(gate)).abs().amax(dim=0))
    return gate_up_amax, down_amax
