"""Llama 4's decoder pieces: the mixture-of-experts feed-forward block and its checkpoint names.

Module and parameter names follow transformers' `Llama4ForCausalLM`, so checkpoint tensors bind to
graph initializers by name:

    model.layers.{i}.feed_forward.router.weight                  [E, hidden]
    model.layers.{i}.feed_forward.experts.gate_up_proj           [E, hidden, 2 * intermediate_size]
    model.layers.{i}.feed_forward.experts.down_proj              [E, intermediate_size, hidden]
    model.layers.{i}.feed_forward.shared_expert.{gate,up,down}_proj.weight
    model.layers.{i}.feed_forward.{gate,up,down}_proj.weight     dense layers (intermediate_size_mlp)

The published checkpoints are multimodal (`Llama4ForConditionalGeneration`): their text weights
carry a `language_model.` prefix, which `strip_multimodal_prefix` removes; the vision tower's
tensors are not part of the text model.
"""

from __future__ import annotations

import torch
from torch import nn

from llamaforge.export.config import ModelConfig
from llamaforge.export.tensor_parallel import RankShard
from llamaforge.plugins.all_reduce.schema import AllReduceAttrs
from llamaforge.plugins.all_reduce.torch_op import all_reduce
from llamaforge.plugins.moe.schema import MoEAttrs
from llamaforge.plugins.moe.torch_op import moe

MULTIMODAL_TEXT_PREFIX = "language_model."


class Experts(nn.Module):
    """On a rank of a TP engine, every expert with its share of the intermediate columns (TP inside
    each expert: the MoE op is unchanged and the layer needs one all-reduce, docs/tensor_parallel.md)."""

    def __init__(self, config: ModelConfig, shard: RankShard | None = None) -> None:
        super().__init__()
        e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size // (shard.size if shard else 1)
        self.gate_up_proj = nn.Parameter(torch.empty(e, h, 2 * i))
        self.down_proj = nn.Parameter(torch.empty(e, i, h))


class MoEFeedForward(nn.Module):
    """Routed experts (one `llamaforge::MoE` node) plus the shared expert (a plain SwiGLU MLP,
    passed in by the decoder that owns the MLP class). On a rank both are partial sums over its
    columns, added before the layer's one all-reduce (the router is replicated: every rank routes
    every token the same way)."""

    def __init__(self, config: ModelConfig, shared_expert: nn.Module, shard: RankShard | None = None) -> None:
        super().__init__()
        self.attrs = MoEAttrs(config.num_local_experts, config.num_experts_per_tok)
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = Experts(config, shard)
        self.shared_expert = shared_expert
        self.world_size = shard.size if shard else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routed = moe(x, self.router.weight, self.experts.gate_up_proj, self.experts.down_proj, self.attrs)
        out = self.shared_expert(x) + routed
        return all_reduce(out, AllReduceAttrs(self.world_size)) if self.world_size > 1 else out


def ffn_tensor_shapes(config: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """The feed-forward weights of one Llama 4 layer: name suffix (after `model.layers.{i}.`) -> shape."""
    h = config.hidden_size
    if layer in config.moe_layer_indices():
        e, i = config.num_local_experts, config.intermediate_size
        return {
            "feed_forward.router.weight": (e, h),
            "feed_forward.experts.gate_up_proj": (e, h, 2 * i),
            "feed_forward.experts.down_proj": (e, i, h),
            "feed_forward.shared_expert.gate_proj.weight": (i, h),
            "feed_forward.shared_expert.up_proj.weight": (i, h),
            "feed_forward.shared_expert.down_proj.weight": (h, i),
        }
    i = config.dense_intermediate_size
    return {"feed_forward.gate_proj.weight": (i, h), "feed_forward.up_proj.weight": (i, h),
            "feed_forward.down_proj.weight": (h, i)}


def strip_multimodal_prefix(stored: list[str]) -> tuple[dict[str, str], list[str]]:
    """For a `Llama4ForConditionalGeneration` checkpoint: (text-model name -> stored name, stored
    names that are not the text model's). Names without the prefix map to themselves."""
    if not any(n.startswith(MULTIMODAL_TEXT_PREFIX) for n in stored):
        return {n: n for n in stored}, []
    text = {n[len(MULTIMODAL_TEXT_PREFIX):]: n for n in stored if n.startswith(MULTIMODAL_TEXT_PREFIX)}
    return text, [n for n in stored if not n.startswith(MULTIMODAL_TEXT_PREFIX)]
