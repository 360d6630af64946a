"""The model runner: turns one step of the scheduler's output into engine calls and hands back the
logits each sequence samples from. It owns everything about running the model: the decode batch's
cache arrays and their rows, the KV gathers from blocks and scatters back into them, and the
prefill calls.

  * The decodes run as one batched call (S=1: ORT's GQA kernel path) on the last call's cache
    arrays, updated in place where the engine allows it. A sequence keeps its row from one step to
    the next; a newcomer takes a dead row or a new one, gathering only its own KV from blocks. Only
    a capacity change or a preemption rebuilds the arrays from blocks.
  * A finished sequence leaves a dead row. Condensing (in flight, by default) moves the last live
    row into it, so the call computes live rows only; otherwise (a static batch, by default) it
    stays in the batch, fed past length 0, until the whole batch has finished. The scheduler's
    output says which: `SchedulerOutput.static_batch`.
  * Each prefill chunk of a prompt under way is its own call; fresh prompts share calls as
    `padding_groups` groups them. Both are paths the attention op's fast `If` branch takes.
  * A prefill call asks the engine for each row's last position only (`logits_index`), except for
    a sequence registered in `context_logits` (its request returns context logits): its chunks ask
    for every position, and the prompt positions' rows are kept. Such chunks never share a call
    with other sequences', so only the requests that ask pay for the wider LM head.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from llamaforge.runtime.core.cross_attention import CrossAttentionInputs
from llamaforge.runtime.core.engine import Engine
from llamaforge.runtime.core.kv_cache import KVCacheManager
from llamaforge.runtime.core.scheduler import Chunk, SchedulerOutput, Sequence
from llamaforge.runtime.core.stats import CoreStats

# The sequences of one engine call that sample now, each with its logits row [vocab].
Sampled = list[tuple[Sequence, np.ndarray]]


@dataclass(eq=False)
class ContextLogits:
    """The raw logits of every prompt position of one sequence ([num_prompt, vocab] float32),
    filled chunk by chunk; `filled` rows are done. A preempted sequence recomputes its prompt, but
    rows already kept are not gathered again."""

    rows: np.ndarray
    filled: int = 0

    @property
    def complete(self) -> bool:
        return self.filled == len(self.rows)


@dataclass(eq=False)
class DecodeBatch:
    """The decode call's cache arrays (key.0, value.0, ...) [allocated rows, kv_heads, capacity,
    head_dim]; a call sees the first len(rows) rows, a contiguous view. rows[i] owns row i (None:
    dead). Rows are allocated for the whole running set up front so that a newcomer's row, or a
    view that shrinks and grows again, never copies the batch."""

    capacity: int
    rows: list[str | None]
    arrays: list[np.ndarray]
    static_batch: int | None = None  # the scheduler's static batch these rows belong to

    # The last views() result, while the arrays and the row count are the same: the same view objects
    # step after step let the engine keep its in-place binding (Engine.decode_in_place_step).
    _views: tuple[int, list[np.ndarray], list[np.ndarray]] | None = field(default=None, repr=False)

    def views(self) -> list[np.ndarray]:
        n, cached = len(self.rows), self._views
        if cached is None or cached[0] != n or cached[1] is not self.arrays:
            cached = self._views = (n, self.arrays, [a[:n] for a in self.arrays])
        return cached[2]

    def reserve(self, num_rows: int, headroom: int) -> None:
        if num_rows > self.arrays[0].shape[0]:
            grow = max(num_rows, headroom) - self.arrays[0].shape[0]
            self.arrays = [np.concatenate([a, np.zeros((grow, *a.shape[1:]), a.dtype)]) for a in self.arrays]

    def condense(self, lengths: dict[str, int]) -> None:
        """Move the last live rows into dead ones and drop the dead tail. Only a moved row's first
        `lengths[sid]` positions are copied: attention never reads past a row's length."""
        rows = self.rows
        while rows and rows[-1] is None:
            rows.pop()
        while None in rows:  # the last row is live: move it into the first hole
            hole, sid = rows.index(None), rows.pop()
            assert sid is not None
            n = lengths[sid]
            for a in self.arrays:
                a[hole, :, :n] = a[len(rows), :, :n]
            rows[hole] = sid
            while rows[-1] is None:
                rows.pop()


class ModelRunner:
    def __init__(self, engine: Engine, kv: KVCacheManager, stats: CoreStats, *, max_num_seqs: int,
                 prefill_padding_tokens: int, condense_decode_rows: bool | None) -> None:
        """`max_num_seqs`: rows the decode arrays are allocated for up front. `condense_decode_rows`:
        None condenses in flight and keeps a static batch's rows (see CoreConfig)."""
        self.engine = engine
        self.kv = kv
        self.stats = stats
        self.context_length = engine.kv.max_capacity
        self.max_num_seqs = max_num_seqs
        self.prefill_padding_tokens = prefill_padding_tokens
        self.condense_decode_rows = condense_decode_rows
        self.decode_batch: DecodeBatch | None = None
        # Sequences whose prompt logits are kept (the engine core registers and drops them).
        self.context_logits: dict[str, ContextLogits] = {}
        # A Llama 3.2 Vision engine's image side: every call's cross-attention inputs (the engine core sets it).
        self.cross: CrossAttentionInputs | None = None

    def close(self) -> None:
        """The core has stopped: release what runs beside this process (a tensor-parallel runner's
        other ranks; the single-process runner has nothing to release)."""

    def execute(self, out: SchedulerOutput) -> Iterator[Sampled]:
        """Run the step's engine calls: the decodes, then the prefill calls. After each call, yield
        the sequences that sample now (each decode; each chunk that completes its prompt) with
        their logits, their `num_computed` already advanced past the computed tokens. A call's
        tokens can thus be sampled and streamed before the next call runs; the caller must drain
        the iterator for the step to run in full."""
        if out.preempted:
            self.decode_batch = None  # a preempted row's KV is gone: rebuild from blocks
        if out.decode:
            logits = self.run_decode(out.decode, out.static_batch)
            yield list(zip(out.decode, logits))
        if out.verify:
            yield self.run_verify(out.verify, alone=not out.decode, static_batch=out.static_batch)
        # A fresh chunk that keeps its context logits asks for every position: it shares a call only
        # with others that do, so the rest still compute one LM-head row each.
        plain: list[Chunk] = []
        keeping: list[Chunk] = []
        for c in out.prefill:
            if c.start == 0:
                (keeping if self._keeps_context(c) else plain).append(c)
        pad = self.prefill_padding_tokens
        groups = padding_groups(plain, pad) + padding_groups(keeping, pad)
        if self.cross is not None:  # a chunk with images runs alone (cross_attention.py says why)
            groups = self.cross.split_groups(groups)
        for group in groups:
            yield self.run_prefill(group)
        for chunk in out.prefill:
            if chunk.start != 0:
                yield self.run_prefill([chunk])

    def _capacity(self, needed: int) -> int:
        """Double the decode batch's capacity as its longest row grows, so the arrays are rebuilt from
        blocks a handful of times per batch, not every few dozen tokens. Spare capacity costs no
        compute (attention reads each row's own length) and little memory (zero pages untouched)."""
        bs = self.kv.block_size
        capacity = -(-64 // bs) * bs
        while capacity < needed:
            capacity *= 2
        return min(capacity, -(-self.context_length // bs) * bs)

    def run_decode(self, seqs: list[Sequence], static_batch: int | None) -> list[np.ndarray]:
        """One decode call for `seqs` (each computes its next token); returns each one's logits row,
        in the order of `seqs`. `static_batch`: the scheduler's static batch (None in flight)."""
        t0 = time.perf_counter()
        self.stats.decode_steps += 1
        batch, row_of = self._decode_rows(seqs, static_batch, max(s.num_computed for s in seqs) + 1)
        by_id = {s.seq_id: s for s in seqs}
        input_ids = np.zeros((len(batch.rows), 1), dtype=np.int64)
        past_lengths = np.zeros(len(batch.rows), dtype=np.int32)
        for sid, row in row_of.items():
            input_ids[row, 0] = by_id[sid].tokens[by_id[sid].num_computed]
            past_lengths[row] = by_id[sid].num_computed
        t1 = time.perf_counter()
        arrays = batch.views()  # leading-axis slices of C-contiguous arrays: contiguous, no copy
        # A vision model's decode rows also take their cross caches.
        extra = self.cross.decode_feeds([by_id.get(sid) if sid else None for sid in batch.rows]) if self.cross else None
        if self.engine.decode_in_place:  # the new token lands in `arrays` itself: no cache copy
            if extra is None:
                logits = self.engine.decode_in_place_step(input_ids, past_lengths, arrays)
            else:
                logits = self.engine.decode_in_place_step(input_ids, past_lengths, arrays, extra_feeds=extra)
            present = arrays
        elif extra is None:
            logits, present = self.engine.step(input_ids, past_lengths, arrays)
        else:
            logits, present = self.engine.step(input_ids, past_lengths, arrays, extra_feeds=extra)
        t2 = time.perf_counter()
        ids = list(row_of)
        self.kv.scatter(ids, [by_id[sid].num_computed for sid in ids], [1] * len(ids), present,
                        rows=[row_of[sid] for sid in ids])
        for seq in seqs:
            seq.num_computed += 1
            self.kv.commit(seq.seq_id, seq.tokens, seq.num_computed, seq.cache_salt)
        t3 = time.perf_counter()
        self.stats.decode_gather_s += t1 - t0
        self.stats.decode_engine_s += t2 - t1
        self.stats.decode_scatter_s += t3 - t2
        if present is not arrays:  # the copying path returned new arrays
            batch.arrays = present
        return [logits[row_of[seq.seq_id], 0] for seq in seqs]

    def _decode_rows(self, seqs: list[Sequence], static_batch: int | None, needed: int) -> tuple[DecodeBatch, dict[str, int]]:
        """The decode batch holding exactly `seqs` (rows of others are dead), with capacity for
        `needed` positions; and each sequence's row."""
        by_id = {s.seq_id: s for s in seqs}
        batch = self.decode_batch
        if batch is None or batch.capacity < needed:  # rebuilt from blocks, every row where it was
            kept: list[str | None] = batch.rows if batch else []  # finished rows are dropped below
            capacity = self._capacity(needed)
            arrays = self.kv.spec.empty(max(len(kept), self.max_num_seqs), capacity)
            placed = [(row, sid) for row, sid in enumerate(kept) if sid in by_id]
            self.kv.gather_into(arrays, [row for row, _ in placed], [sid for _, sid in placed])
            batch = DecodeBatch(capacity, kept, arrays, batch.static_batch if batch else static_batch)
            self.stats.decode_gathers += 1
        rows = [sid if sid in by_id else None for sid in batch.rows]
        if batch.static_batch != static_batch:
            rows, batch.static_batch = [], static_batch  # a new static batch starts at row 0
        taken = set(rows)
        newcomers = [s.seq_id for s in seqs if s.seq_id not in taken]
        if newcomers:
            self.stats.decode_gathers += 1
            holes = [row for row, sid in enumerate(rows) if sid is None][: len(newcomers)]
            slots = holes + list(range(len(rows), len(rows) + len(newcomers) - len(holes)))
            rows += [None] * (len(newcomers) - len(holes))
            batch.reserve(len(rows), self.max_num_seqs)
            self.kv.gather_into(batch.arrays, slots, newcomers)
            for sid, row in zip(newcomers, slots):
                rows[row] = sid
        batch.rows = rows
        condense = self.condense_decode_rows
        if static_batch is None if condense is None else condense:  # by default: in flight only
            batch.condense({sid: by_id[sid].num_computed for sid in by_id})
        self.decode_batch = batch
        return batch, {sid: row for row, sid in enumerate(batch.rows) if sid is not None}

    def run_verify(self, seqs: list[Sequence], alone: bool, static_batch: int | None) -> Sampled:
        """One call for the decode rows with a draft: each computes its last sampled token and its
        draft (rows padded to the widest), with logits at every position; returns each one's rows
        [1 + len(draft), vocab]. Only the sampled token counts as computed here: the draft tokens'
        KV is written too, and `accept` counts the ones the output processor kept.

        A row that verifies `alone` (the step's only decode-phase sequence: single-stream serving)
        runs on its decode-batch row, updated in place as a decode step is (ORT's GQA kernel takes
        one row of several tokens). Rows that verify together run on caches gathered from blocks,
        one engine call per row where the engine's attention is the GQA kernel alone (`Engine.step`;
        the kernel refuses several rows continuing in one call); their decode rows are dropped."""
        if alone and len(seqs) == 1 and self.engine.decode_in_place:
            return self._verify_in_place(seqs[0], static_batch)
        counts = [1 + len(s.draft) for s in seqs]
        width = max(counts)
        bs = self.kv.block_size
        capacity = -(-max(s.num_computed + n for s, n in zip(seqs, counts)) // bs) * bs
        input_ids = np.zeros((len(seqs), width), dtype=np.int64)
        for row, s in enumerate(seqs):
            input_ids[row, : counts[row]] = [s.tokens[s.num_computed], *s.draft]
        index = np.array([[min(i, n - 1) for i in range(width)] for n in counts], np.int64)
        ids = [s.seq_id for s in seqs]
        starts = [s.num_computed for s in seqs]
        if self.decode_batch is not None:  # their decode rows miss what this call writes: gathered again later
            self.decode_batch.rows = [None if sid in ids else sid for sid in self.decode_batch.rows]
        logits, present = self.engine.step(input_ids, np.array(starts, np.int32), self.kv.gather(ids, capacity), index)
        self.kv.scatter(ids, starts, counts, present)
        self.stats.verify_steps += 1
        for s in seqs:
            s.num_computed += 1
            self.kv.commit(s.seq_id, s.tokens, s.num_computed, s.cache_salt)
        return [(s, logits[row, :n]) for row, (s, n) in enumerate(zip(seqs, counts))]

    def _verify_in_place(self, seq: Sequence, static_batch: int | None) -> Sampled:
        count = 1 + len(seq.draft)
        batch, row_of = self._decode_rows([seq], static_batch, seq.num_computed + count)
        row = row_of[seq.seq_id]
        # One row of C-contiguous arrays: contiguous. The batch's own views when it is that one row,
        # so decode and verify calls alternating on one stream keep the engine's in-place binding.
        arrays = batch.views() if len(batch.rows) == 1 else [a[row : row + 1] for a in batch.arrays]
        ids = np.array([[seq.tokens[seq.num_computed], *seq.draft]], np.int64)
        logits = self.engine.decode_in_place_step(ids, np.array([seq.num_computed], np.int32), arrays)
        self.kv.scatter([seq.seq_id], [seq.num_computed], [count], arrays)
        self.stats.verify_steps += 1
        seq.num_computed += 1
        self.kv.commit(seq.seq_id, seq.tokens, seq.num_computed, seq.cache_salt)
        return [(seq, logits[0])]

    def accept(self, seq: Sequence, accepted: int) -> None:
        """`accepted` draft tokens of the last verify call are now the sequence's tokens: their KV,
        already written, counts as computed."""
        seq.num_computed += accepted
        self.kv.commit(seq.seq_id, seq.tokens, seq.num_computed, seq.cache_salt)

    def _keeps_context(self, chunk: Chunk) -> bool:
        """Whether `chunk` computes prompt positions whose logits its sequence keeps."""
        kept = self.context_logits.get(chunk.seq.seq_id)
        return kept is not None and chunk.start + chunk.count > kept.filled and chunk.start < len(kept.rows)

    def run_prefill(self, chunks: list[Chunk]) -> Sampled:
        """One prefill call for `chunks` (rows padded to the widest); returns the chunks that
        complete their prompt with the logits of their last token. A chunk that keeps context logits
        (`context_logits`) asks for all its positions and stores its prompt positions' rows."""
        width = max(c.count for c in chunks)
        capacity = -(-max(c.start + c.count for c in chunks) // self.kv.block_size) * self.kv.block_size
        input_ids = np.zeros((len(chunks), width), dtype=np.int64)
        for row, c in enumerate(chunks):
            input_ids[row, : c.count] = c.seq.tokens[c.start : c.start + c.count]
        ids = [c.seq.seq_id for c in chunks]
        past = self.kv.gather(ids, capacity)
        keeps = [self._keeps_context(c) for c in chunks]
        # Each row's positions whose logits are computed: its last token (all it samples from), or
        # every position for a row that keeps them, padded with its last to the call's widest.
        positions = max(c.count for c, keep in zip(chunks, keeps) if keep) if any(keeps) else 1
        index = np.array([[min(i, c.count - 1) if keep else c.count - 1 for i in range(positions)]
                          for c, keep in zip(chunks, keeps)], np.int64)
        starts = np.array([c.start for c in chunks], np.int32)
        if self.cross is not None:  # a vision model: its cross inputs, and the cross K/V its first call computes
            extra, fetch = self.cross.prefill_feeds(chunks, width)
            logits, present, cross = self.engine.step_with(input_ids, starts, past, index, extra, fetch)
            self.cross.store(chunks, cross)
        else:
            logits, present = self.engine.step(input_ids, starts, past, index)
        self.kv.scatter(ids, [c.start for c in chunks], [c.count for c in chunks], present)
        sampled: Sampled = []
        for row, (c, keep) in enumerate(zip(chunks, keeps)):
            c.seq.num_computed += c.count
            self.kv.commit(c.seq.seq_id, c.seq.tokens, c.seq.num_computed, c.seq.cache_salt)
            if keep:
                self._keep_context(c, logits[row])
            if c.completes_prompt:
                sampled.append((c.seq, logits[row, c.count - 1 if keep else 0]))
        return sampled

    def _keep_context(self, chunk: Chunk, logits: np.ndarray) -> None:
        """Store the prompt positions of `chunk` not kept yet; `logits` [>= count, vocab] holds its
        positions from `chunk.start` on."""
        kept = self.context_logits[chunk.seq.seq_id]
        assert chunk.start <= kept.filled, "prompt chunks run in order, from 0"
        first, end = max(kept.filled, chunk.start), min(chunk.start + chunk.count, len(kept.rows))
        kept.rows[first:end] = logits[first - chunk.start : end - chunk.start]
        kept.filled = max(kept.filled, end)


def padding_groups(chunks: list[Chunk], max_padding: int) -> list[list[Chunk]]:
    """Fresh prompt chunks grouped into prefill calls. A call pads every row to its widest chunk
    and padded tokens cost as much as real ones, so chunks share a call only while the padding
    adds up to at most `max_padding` tokens (about what a separate call's fixed cost is worth)."""
    groups: list[list[Chunk]] = []
    for chunk in sorted(chunks, key=lambda c: c.count):
        group = groups[-1] if groups else None
        # Sorted by width, so `chunk` is the group's new widest row: every other row pads up to it.
        if group is not None and sum(chunk.count - c.count for c in group) <= max_padding:
            group.append(chunk)
        else:
            groups.append([chunk])
    return groups
