"""The KV-cache manager: a fixed budget of blocks, owned per sequence, gathered into the attention
op's `bhcd-slots` batch layout for each engine call.

Memory is a pool per layer of `[num_blocks, kv_heads, block_size, head_dim]` for keys and for
values, allocated once from the budget. A sequence holds a list of blocks (its block table); a
step's batch is assembled by gathering the batch's block tables into `[batch, kv_heads, capacity,
head_dim]` arrays, and after the call only the new tokens are written back. Block 0 is never
handed out: it is the zero block that pads short block tables.

Why blocks rather than a fixed slot per sequence: a slot must reserve the full context for every
sequence, so a budget holds `budget / max_len` sequences whatever their real lengths; blocks hold
`budget / mean_len`. `bench/kv_layout.py` measures both the capacity gain and the gather cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llamaforge.runtime.core.config import KVCacheConfig
from llamaforge.runtime.core.engine import KVSpec


class KVCacheFull(RuntimeError):
    pass


@dataclass(frozen=True)
class KVUsage:
    total_tokens: int
    used_tokens: int

    @property
    def free_tokens(self) -> int:
        return self.total_tokens - self.used_tokens

    @property
    def free_fraction(self) -> float:
        return self.free_tokens / self.total_tokens if self.total_tokens else 0.0


class KVCacheManager:
    def __init__(self, spec: KVSpec, budget_tokens: int, block_size: int = KVCacheConfig.block_size) -> None:
        if budget_tokens < block_size:
            raise ValueError(f"KV budget of {budget_tokens} tokens is smaller than one block ({block_size})")
        self.spec = spec
        self.block_size = block_size
        self.num_blocks = budget_tokens // block_size  # usable blocks; +1 for the zero block
        shape = (self.num_blocks + 1, spec.num_kv_heads, block_size, spec.head_dim)
        self.keys = [np.zeros(shape, spec.dtype) for _ in range(spec.num_layers)]
        self.values = [np.zeros(shape, spec.dtype) for _ in range(spec.num_layers)]
        self._free = list(range(self.num_blocks, 0, -1))  # pop() hands out low ids first
        self.tables: dict[str, list[int]] = {}

    @classmethod
    def from_config(cls, config: KVCacheConfig, spec: KVSpec, default_tokens: int) -> KVCacheManager:
        """The cache `config` asks for: its token budget, else its byte budget, else `default_tokens`."""
        if config.budget_tokens is not None:
            budget = config.budget_tokens
        elif config.budget_bytes is not None:
            budget = config.budget_bytes // cls.bytes_per_token(spec)
        else:
            budget = default_tokens
        return cls(spec, budget, config.block_size)

    @staticmethod
    def bytes_per_token(spec: KVSpec) -> int:
        return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * spec.dtype.itemsize

    # -- accounting ----------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def capacity_of(self, seq_id: str) -> int:
        return len(self.tables.get(seq_id, ())) * self.block_size

    def can_grow(self, seq_id: str, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(self.tables.get(seq_id, ())) <= len(self._free)

    def room_for(self, seq_id: str) -> int:
        """Tokens `seq_id` could hold if it took every free block."""
        return (len(self.tables.get(seq_id, ())) + len(self._free)) * self.block_size

    def grow(self, seq_id: str, num_tokens: int) -> None:
        """Make `seq_id` hold at least `num_tokens` tokens."""
        table = self.tables.setdefault(seq_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            raise KVCacheFull(f"{seq_id}: needs {need} more blocks, {len(self._free)} free")
        for _ in range(need):
            table.append(self._free.pop())

    def free(self, seq_id: str) -> None:
        for block in self.tables.pop(seq_id, ()):
            self._free.append(block)

    def usage(self) -> KVUsage:
        return KVUsage(self.num_blocks * self.block_size, (self.num_blocks - len(self._free)) * self.block_size)

    def all_free(self) -> bool:
        return len(self._free) == self.num_blocks and not self.tables

    # -- data movement --------------------------------------------------------------------------
    def gather(self, seq_ids: list[str], capacity: int) -> list[np.ndarray]:
        """Batch caches [len(seq_ids), kv_heads, capacity, head_dim] per layer (key.0, value.0, ...)."""
        batch = self.spec.empty(len(seq_ids), capacity)
        self.gather_into(batch, list(range(len(seq_ids))), seq_ids)
        return batch

    def gather_into(self, batch: list[np.ndarray], rows: list[int], seq_ids: list[str]) -> None:
        """Overwrite row rows[i] of the batch caches with seq_ids[i]'s cache, zero past its blocks."""
        capacity = batch[0].shape[2]
        if capacity % self.block_size:
            raise ValueError(f"capacity {capacity} must be a multiple of the block size {self.block_size}")
        width = capacity // self.block_size
        heads, dim = self.spec.num_kv_heads, self.spec.head_dim
        for row, seq_id in zip(rows, seq_ids):
            index = np.zeros(width, dtype=np.int64)  # the zero block pads
            table = self.tables.get(seq_id, [])[:width]
            index[: len(table)] = table
            for layer in range(self.spec.num_layers):
                for k, pool in enumerate((self.keys[layer], self.values[layer])):
                    # [width, H, bs, D] blocks into the row's [H, width * bs, D]: one copy
                    batch[2 * layer + k][row].reshape(heads, width, self.block_size, dim)[...] = pool[index].transpose(1, 0, 2, 3)

    def scatter(self, seq_ids: list[str], starts: list[int], counts: list[int], presents: list[np.ndarray],
                rows: list[int] | None = None) -> None:
        """Write positions [start, start + count) of each sequence's row of `presents` (row i, or
        `rows[i]`) back into its blocks: one fancy-indexed copy per layer array, whatever the number
        of sequences (a decode step writes one token for each)."""
        bs = self.block_size
        rows = rows if rows is not None else list(range(len(seq_ids)))
        src_rows, src_pos, dst_blocks = [], [], []
        for row, seq_id, start, count in zip(rows, seq_ids, starts, counts):
            if count <= 0:
                continue
            table = self.tables[seq_id]
            if start + count > len(table) * bs:
                raise KVCacheFull(f"{seq_id}: writing tokens {start}..{start + count} beyond its {len(table) * bs} slots")
            pos = np.arange(start, start + count)
            src_rows.append(np.full(count, row))
            src_pos.append(pos)
            dst_blocks.append(np.asarray(table)[pos // bs])
        if not src_rows:
            return
        row_idx, pos_idx, block_idx = np.concatenate(src_rows), np.concatenate(src_pos), np.concatenate(dst_blocks)
        offset_idx = pos_idx % bs
        for layer in range(self.spec.num_layers):
            # [tokens, H, D] on both sides: the advanced indices, split by a slice, lead.
            self.keys[layer][block_idx, :, offset_idx] = presents[2 * layer][row_idx, :, pos_idx]
            self.values[layer][block_idx, :, offset_idx] = presents[2 * layer + 1][row_idx, :, pos_idx]
