"""The KV-cache manager: a fixed budget of blocks, held by sequences through refcounts, reused
across sequences by their content (automatic prefix caching), and gathered into the attention
op's `bhcd-slots` batch layout for each engine call.

Memory is a pool per layer of `[num_blocks, kv_heads, block_size, head_dim]` for keys and for
values, allocated once from the budget. A sequence holds a list of blocks (its block table); a
step's batch is assembled by gathering the batch's block tables into `[batch, kv_heads, capacity,
head_dim]` arrays, and after the call only the new tokens are written back. Block 0 is never
handed out: it is the zero block that pads short block tables.

Why blocks rather than a fixed slot per sequence: a slot must reserve the full context for every
sequence, so a budget holds `budget / max_len` sequences whatever their real lengths; blocks hold
`budget / mean_len`. `bench/kv_layout.py` measures both the capacity gain and the gather cost.

Prefix caching (vLLM's automatic prefix caching, TensorRT-LLM's KV block reuse). Once every
position of a block is computed, the block is registered under a hash chain: the hash of its
parent block, its tokens, and the sequence's salt (what else would change its KV). A sequence
admitted later looks its full blocks up along the chain and shares the blocks found (their
refcount goes up), so it prefills only the rest. Shared blocks are never written: a sequence writes
only at positions it has not computed, and the lookup stops short of the last prompt token, which
must be computed to sample from. A block nobody holds stays cached in the free queue until it is
taken for new tokens, least recently freed first (a sequence's tail before its head, as a later
prompt is likelier to share the head); blocks that hold no cached content are taken before any
cached one.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llamaforge.runtime.core.config import KVCacheConfig
from llamaforge.runtime.core.engine import KVSpec


class KVCacheFull(RuntimeError):
    pass


@dataclass(frozen=True)
class KVUsage:
    """`used_tokens`: positions in blocks some sequence holds. `cached_tokens`: positions in blocks
    nobody holds that keep reusable content (free: taken for new tokens when needed)."""

    total_tokens: int
    used_tokens: int
    cached_tokens: int = 0

    @property
    def free_tokens(self) -> int:
        return self.total_tokens - self.used_tokens

    @property
    def free_fraction(self) -> float:
        return self.free_tokens / self.total_tokens if self.total_tokens else 0.0


@dataclass
class PrefixCacheStats:
    """Counted at each admission that looks the cache up: prompt tokens asked for, tokens found."""

    queries_tokens: int = 0
    hit_tokens: int = 0


def block_hash(parent: bytes, tokens: Sequence[int], salt: bytes = b"") -> bytes:
    """The key of a full block: its parent's key, its tokens and the sequence's salt. A
    cryptographic hash, so that two different prefixes never share KV (vLLM's `sha256` option)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, np.int64).tobytes())
    h.update(salt)
    return h.digest()


class KVCacheManager:
    def __init__(self, spec: KVSpec, budget_tokens: int, block_size: int = KVCacheConfig.block_size,
                 prefix_caching: bool = KVCacheConfig.prefix_caching) -> None:
        if budget_tokens < block_size:
            raise ValueError(f"KV budget of {budget_tokens} tokens is smaller than one block ({block_size})")
        self.spec = spec
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.num_blocks = budget_tokens // block_size  # usable blocks; +1 for the zero block
        shape = (self.num_blocks + 1, spec.num_kv_heads, block_size, spec.head_dim)
        self.keys = [np.zeros(shape, spec.dtype) for _ in range(spec.num_layers)]
        self.values = [np.zeros(shape, spec.dtype) for _ in range(spec.num_layers)]
        # Blocks nobody holds, in the order they are taken (first: next). Low ids first at the start.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, self.num_blocks + 1))
        self._refs = [0] * (self.num_blocks + 1)
        self.tables: dict[str, list[int]] = {}
        # Prefix cache: hash -> block, and back; and each sequence's chain of full-block hashes.
        self._cached: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._chains: dict[str, list[bytes]] = {}
        self.prefix_stats = PrefixCacheStats()
        # Tensor parallelism: rank 0 records the block copies `fork` makes, (source, copy) in order, so
        # that the other ranks make them in their own pools (runtime/parallel/runner.py). None: off.
        self.block_copies: list[tuple[int, int]] | None = None

    @classmethod
    def from_config(cls, config: KVCacheConfig, spec: KVSpec, default_tokens: int) -> KVCacheManager:
        """The cache `config` asks for: its token budget, else its byte budget, else `default_tokens`."""
        if config.budget_tokens is not None:
            budget = config.budget_tokens
        elif config.budget_bytes is not None:
            budget = config.budget_bytes // cls.bytes_per_token(spec)
        else:
            budget = default_tokens
        return cls(spec, budget, config.block_size, config.prefix_caching)

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

    @property
    def free_blocks(self) -> int:
        """Blocks nobody holds (cached ones included: they are taken when needed)."""
        return len(self._free)

    def room_for(self, seq_id: str) -> int:
        """Tokens `seq_id` could hold if it took every free block (cached ones included)."""
        return (len(self.tables.get(seq_id, ())) + len(self._free)) * self.block_size

    def grow(self, seq_id: str, num_tokens: int) -> None:
        """Make `seq_id` hold at least `num_tokens` tokens."""
        table = self.tables.setdefault(seq_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            raise KVCacheFull(f"{seq_id}: needs {need} more blocks, {len(self._free)} free")
        for _ in range(need):
            table.append(self._take())

    def _take(self) -> int:
        """The next free block, its cached content (if any) evicted."""
        block, _ = self._free.popitem(last=False)
        key = self._hash_of.pop(block, None)
        if key is not None and self._cached.get(key) == block:
            del self._cached[key]
        self._refs[block] = 1
        return block

    def free(self, seq_id: str) -> None:
        """Release the sequence's blocks. Those nobody else holds become free; cached ones keep their
        content (taken last, the sequence's head last of all), the others are taken first."""
        self._chains.pop(seq_id, None)
        for block in reversed(self.tables.pop(seq_id, ())):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if block not in self._hash_of:
                    self._free.move_to_end(block, last=False)

    def usage(self) -> KVUsage:
        cached = sum(1 for block in self._hash_of if self._refs[block] == 0)
        bs = self.block_size
        return KVUsage(self.num_blocks * bs, (self.num_blocks - len(self._free)) * bs, cached * bs)

    def all_free(self) -> bool:
        """No block is held by a sequence (cached content in free blocks does not count)."""
        return len(self._free) == self.num_blocks and not self.tables

    # -- prefix caching ----------------------------------------------------------------------------
    def lookup(self, seq_id: str, tokens: Sequence[int], salt: bytes = b"") -> int:
        """Share the cached blocks that start `tokens` with `seq_id`, which holds none yet; returns
        how many tokens they hold (a multiple of the block size, short of the last token, which
        must be computed to sample from). 0 when prefix caching is off."""
        if not self.prefix_caching:
            return 0
        if self.tables.get(seq_id):
            raise ValueError(f"{seq_id}: looks up the prefix cache while holding blocks")
        bs = self.block_size
        chain: list[bytes] = []
        table: list[int] = []
        parent = b""
        for i in range((len(tokens) - 1) // bs):
            key = block_hash(parent, tokens[i * bs : (i + 1) * bs], salt)
            block = self._cached.get(key)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            chain.append(key)
            table.append(block)
            parent = key
        if table:
            self.tables[seq_id] = table
            self._chains[seq_id] = chain
        return len(table) * bs

    def commit(self, seq_id: str, tokens: Sequence[int], num_computed: int, salt: bytes = b"") -> None:
        """Register the blocks of `seq_id` whose every position is now computed (`num_computed` of
        `tokens`), so that later sequences can share them."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        chain = self._chains.setdefault(seq_id, [])
        table = self.tables[seq_id]
        for i in range(len(chain), min(num_computed // bs, len(table))):
            key = block_hash(chain[-1] if chain else b"", tokens[i * bs : (i + 1) * bs], salt)
            chain.append(key)
            block = table[i]
            if key not in self._cached and block not in self._hash_of:  # else: computed twice, cached once
                self._cached[key] = block
                self._hash_of[block] = key

    def fork(self, parent_id: str, child_id: str, num_tokens: int) -> bool:
        """Give `child_id` the KV of the first `num_tokens` positions of `parent_id`: its full blocks
        shared, and a partly filled last block copied into a new one (copy on write: it is the first
        block the two write differently). False, and nothing changed, if no block is free for the
        copy."""
        bs = self.block_size
        full, partial = divmod(num_tokens, bs)
        parent = self.tables[parent_id]
        if partial and not self._free:
            return False
        table = parent[:full]
        for block in table:
            self._refs[block] += 1
        if partial:
            copy = self._take()
            for pool in (*self.keys, *self.values):
                pool[copy] = pool[parent[full]]
            if self.block_copies is not None:
                self.block_copies.append((parent[full], copy))
            table = [*table, copy]
        self.tables[child_id] = table
        chain = self._chains.get(parent_id)
        if chain:
            self._chains[child_id] = chain[:full]
        return True

    def record_lookup(self, num_tokens: int, hit_tokens: int) -> None:
        self.prefix_stats.queries_tokens += num_tokens
        self.prefix_stats.hit_tokens += hit_tokens

    def reset_prefix_cache(self) -> None:
        """Forget every cached block's content (blocks in use keep theirs, uncached)."""
        self._cached.clear()
        self._hash_of.clear()
        self._chains.clear()

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
        if len(seq_ids) == 1 and counts[0] == 1:  # a single stream's decode token
            self._scatter_one(seq_ids[0], starts[0], presents, rows[0])
            return
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

    def _scatter_one(self, seq_id: str, pos: int, presents: list[np.ndarray], row: int) -> None:
        """`scatter` of one position: plain indexing, about 4x cheaper a layer than the fancy-indexed
        copy, which at batch 1 on a small model is a few percent of a decode step."""
        table = self.tables[seq_id]
        if pos >= len(table) * self.block_size:
            raise KVCacheFull(f"{seq_id}: writing tokens {pos}..{pos + 1} beyond its {len(table) * self.block_size} slots")
        block, offset = table[pos // self.block_size], pos % self.block_size
        for layer in range(self.spec.num_layers):
            self.keys[layer][block, :, offset] = presents[2 * layer][row, :, pos]
            self.values[layer][block, :, offset] = presents[2 * layer + 1][row, :, pos]
