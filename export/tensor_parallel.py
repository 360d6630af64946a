"""Megatron-style tensor parallelism: what one rank of a TP=N engine holds (docs/tensor_parallel.md).

  q/k/v, gate/up (and each expert's gate|up)   column-parallel: the rank's heads / FFN columns
  o_proj, down_proj (and each expert's down)   row-parallel: the matching input rows, then an all-reduce
  KV heads                                     split when num_kv_heads % N == 0; when num_kv_heads < N
                                               (N a multiple of it) each rank keeps the one KV head its
                                               query heads read, replicated as TensorRT-LLM does
  embedding, norms, MoE router                 replicated
  lm_head                                      vocab-parallel: the rank's rows [start, end) of the vocab;
                                               the rank's `logits` is that shard (tied: a slice of the table)

`RankShard` says which slice of every checkpoint tensor a rank holds; `shard_tensor` cuts it from
the whole tensor (the exporter's lazy weights load one checkpoint tensor and slice it, so memory
stays about the largest tensor). Everything here is pure arithmetic on the config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from llamaforge.export.config import ModelConfig

# MoE expert weights [E, in, out] (x @ W; gate_up_proj is [gate | up] along `out`), by name suffix
EXPERT_WEIGHTS = (".feed_forward.experts.gate_up_proj", ".feed_forward.experts.down_proj")


class ShardingError(ValueError):
    """The model cannot be split over this many ranks; the message names the field."""


def vocab_shards(vocab_size: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of each rank's vocabulary rows: equal parts, the first `vocab % size` ranks one
    row more (no padding: the runtime concatenates the shards in rank order)."""
    base, extra = divmod(vocab_size, size)
    bounds, start = [], 0
    for rank in range(size):
        end = start + base + (1 if rank < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def check_shardable(config: ModelConfig, size: int) -> None:
    """ShardingError naming the first field that `size` ranks cannot split."""
    if size < 1:
        raise ShardingError(f"TP={size}: the number of ranks must be >= 1")
    if size == 1:
        return
    where = f"{config.name}: TP={size}"
    if config.num_heads % size:
        raise ShardingError(f"{where} does not divide num_heads={config.num_heads}")
    kv = config.num_kv_heads
    if kv % size and size % kv:
        raise ShardingError(f"{where}: num_kv_heads={kv} is neither a multiple of TP nor a divisor of it, so the "
                            "ranks' query heads cannot each read whole KV heads")
    widths = {"intermediate_size": config.intermediate_size, "intermediate_size_mlp": config.dense_intermediate_size}
    for name, width in widths.items():
        if width % size:
            raise ShardingError(f"{where} does not divide {name}={width}")
    if config.vocab_size < size:
        raise ShardingError(f"{where}: vocab_size={config.vocab_size} has fewer rows than ranks")


@dataclass(frozen=True)
class RankShard:
    """Rank `rank` of `size` for `config`."""

    config: ModelConfig
    size: int
    rank: int

    def __post_init__(self) -> None:
        check_shardable(self.config, self.size)
        if not 0 <= self.rank < self.size:
            raise ShardingError(f"rank {self.rank} is not in 0..{self.size - 1}")

    # -- heads ---------------------------------------------------------------------------------
    @property
    def q_heads(self) -> int:
        return self.config.num_heads // self.size

    @property
    def kv_heads(self) -> int:
        kv = self.config.num_kv_heads
        return kv // self.size if kv % self.size == 0 else 1

    @property
    def kv_replicated(self) -> bool:
        return self.config.num_kv_heads % self.size != 0

    def q_rows(self) -> tuple[int, int]:
        d = self.config.head_dim
        return self.rank * self.q_heads * d, (self.rank + 1) * self.q_heads * d

    def kv_rows(self) -> tuple[int, int]:
        """The rank's KV heads as rows of k_proj / v_proj: its own share, or (replicated) the one
        head its first query head reads (all its query heads read the same one: size % kv == 0)."""
        d = self.config.head_dim
        if self.kv_replicated:
            group = self.config.num_heads // self.config.num_kv_heads
            head = self.rank * self.q_heads // group
            return head * d, (head + 1) * d
        return self.rank * self.kv_heads * d, (self.rank + 1) * self.kv_heads * d

    # -- FFN and vocabulary --------------------------------------------------------------------
    def ffn_columns(self, width: int) -> tuple[int, int]:
        part = width // self.size
        return self.rank * part, (self.rank + 1) * part

    def vocab_rows(self) -> tuple[int, int]:
        return vocab_shards(self.config.vocab_size, self.size)[self.rank]

    def linear_channels(self, linear: str) -> tuple[str, tuple[int, int]] | None:
        """How the rank holds linear `linear` (checkpoint module name, e.g. model.layers.0.mlp.up_proj):
        ("out", [a, b)) for a column-parallel one (its output channels a..b-1), ("in", [a, b)) for a
        row-parallel one, None for a replicated one (the router)."""
        if self.size == 1 or linear.endswith(EXPERT_WEIGHTS):  # experts: `expert_out_columns`
            return None
        name = linear + ".weight"
        if linear.endswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "gate_proj", "up_proj")):
            return "out", self.q_rows() if linear.endswith("q_proj") else \
                self.kv_rows() if linear.endswith(("k_proj", "v_proj")) else self.ffn_columns(self._ffn_width(name))
        if linear.endswith("self_attn.o_proj"):
            return "in", self.q_rows()
        if linear.endswith("down_proj"):
            return "in", self.ffn_columns(self._ffn_width(name))
        if linear == "lm_head":
            return "out", self.vocab_rows()
        return None

    def expert_out_columns(self, linear: str) -> np.ndarray | None:
        """The output channels the rank holds of MoE expert weight `linear` ([E, in, out], x @ W):
        gate_up_proj (column-parallel) its gate columns then the same up columns, as `shard_tensor`
        cuts them; None for down_proj (row-parallel: every output channel) and at TP=1."""
        if self.size == 1 or not linear.endswith(EXPERT_WEIGHTS[0]):
            return None
        width = self.config.intermediate_size
        a, b = self.ffn_columns(width)
        return np.concatenate([np.arange(a, b), np.arange(width + a, width + b)])

    # -- checkpoint tensors --------------------------------------------------------------------
    def _ffn_width(self, name: str) -> int:
        layer = int(name.split(".")[2])
        if ".shared_expert." in name or ".experts." in name or layer in self.config.moe_layer_indices():
            return self.config.intermediate_size
        return self.config.dense_intermediate_size

    def shard_tensor(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of checkpoint tensor `name` (HF name, whole tensor), contiguous."""
        return _slice(self, name, full).contiguous()

    def shard_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(_slice(self, name, torch.empty(shape, device="meta")).shape)


_COLUMN = re.compile(r"\.(mlp|feed_forward|shared_expert)\.(gate_proj|up_proj)\.weight$")
_ROW = re.compile(r"\.(mlp|feed_forward|shared_expert)\.down_proj\.weight$")


def _slice(shard: RankShard, name: str, t: torch.Tensor) -> torch.Tensor:
    if shard.size == 1:
        return t
    if name.endswith("self_attn.q_proj.weight"):
        a, b = shard.q_rows()
        return t[a:b]
    if name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
        a, b = shard.kv_rows()
        return t[a:b]
    if name.endswith("self_attn.o_proj.weight"):
        a, b = shard.q_rows()
        return t[:, a:b]
    if _COLUMN.search(name):
        a, b = shard.ffn_columns(shard._ffn_width(name))
        return t[a:b]
    if _ROW.search(name):
        a, b = shard.ffn_columns(shard._ffn_width(name))
        return t[:, a:b]
    if name.endswith(EXPERT_WEIGHTS[0]):  # [E, hidden, gate | up]: the same columns of each
        width = shard.config.intermediate_size
        a, b = shard.ffn_columns(width)
        return torch.cat([t[..., a:b], t[..., width + a:width + b]], dim=-1)
    if name.endswith(EXPERT_WEIGHTS[1]):  # [E, intermediate, hidden]
        a, b = shard.ffn_columns(shard.config.intermediate_size)
        return t[:, a:b]
    if name == "lm_head.weight":
        a, b = shard.vocab_rows()
        return t[a:b]
    return t  # embedding, norms, router: replicated
