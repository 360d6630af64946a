"""The engine core: one step loop that owns the scheduler, the KV cache and the ONNX Runtime
engine, shared by every front end (the standalone gRPC server and the Triton Python backend).

Each step:
  1. takes in new requests and cancellations (a cancelled sequence's KV blocks are freed here,
     within one step of the cancel);
  2. asks the scheduler for this step's decodes and prefill chunks;
  3. runs the decodes as one batched engine call (S=1: ORT's GQA kernel path) on the last call's
     cache arrays, updated in place where the engine allows it; a sequence keeps its row, and in
     flight a finished sequence's row is refilled by moving the last row into it, so the call
     computes live rows only (see `_run_decode`). Each prefill chunk is its own call (fresh
     prompts batched together); both are paths the attention op's fast `If` branch takes;
  4. samples per sequence with the sequence's own RNG (so a seed's output does not depend on the
     batch), applies stops, and hands each request's news to its `RequestHandle`.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from llamaforge.runtime.core.detokenizer import IncrementalDetokenizer
from llamaforge.runtime.core.engine import Engine
from llamaforge.runtime.core.kv_cache import KVCacheManager
from llamaforge.runtime.core.requests import (
    GenerationOutput,
    GenerationRequest,
    OutputSink,
    QueueFullError,
    RequestError,
    RequestHandle,
)
from llamaforge.runtime.core.sampling import sample
from llamaforge.runtime.core.scheduler import Chunk, Scheduler, SchedulerConfig, Sequence


@dataclass
class CoreConfig:
    kv_budget_tokens: int | None = None  # one of the two budgets; default: 16 full-context sequences
    kv_budget_bytes: int | None = None
    block_size: int = 16
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    max_queue: int = 64
    # Padding a fresh prompt chunk may receive to share a prefill call with others. On a 2-core CPU
    # a call's fixed cost (reading the weights, ~16 ms for 125M fp32 params) is worth about 8
    # prefill tokens (~2 ms each, compute-bound); an accelerator would afford far more.
    prefill_padding_tokens: int = 8
    threads: int | None = None
    policy: str = "inflight"  # or "static": a batch drains before the next starts (benchmark baseline)
    # What happens to a finished sequence's row of the decode batch. True: the last live row moves
    # into it (a copy of one row's cache, vLLM v1's InputBatch.condense), so every decode call
    # computes live rows only. False: the batch keeps its shape until all of it has finished, the
    # way static batching engines run a batch (FasterTransformer, TensorRT-LLM's V1 GptSession);
    # a finished row is fed past length 0, so it skips attention but not the matmuls.
    # None: True for "inflight", False for "static".
    condense_decode_rows: bool | None = None
    providers: tuple[Any, ...] | None = None  # ONNX Runtime execution providers (None: CPU)


class CoreObserver(Protocol):
    def on_first_token(self, request_id: str, ttft_s: float) -> None: ...
    def on_token(self, request_id: str, itl_s: float) -> None: ...
    def on_finished(self, request_id: str, reason: str, num_output_tokens: int) -> None: ...


@dataclass(eq=False)
class _DecodeBatch:
    """The decode call's cache arrays (key.0, value.0, ...) [allocated rows, kv_heads, capacity,
    head_dim]; a call sees the first len(rows) rows, a contiguous view. rows[i] owns row i (None:
    dead). Rows are allocated for the whole running set up front so that a newcomer's row, or a
    view that shrinks and grows again, never copies the batch."""

    capacity: int
    rows: list[str | None]
    arrays: list[np.ndarray]
    static_batch: int = 0  # policy "static": the scheduler's batch these rows belong to

    def views(self) -> list[np.ndarray]:
        return [a[: len(self.rows)] for a in self.arrays]

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


@dataclass(eq=False)
class _Live:
    """Everything about a request beyond its scheduling state."""

    request: GenerationRequest
    handle: RequestHandle
    seq: Sequence
    rng: np.random.Generator
    detok: IncrementalDetokenizer | None
    end_ids: frozenset[int]
    arrived: float
    generated: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)  # pieces not yet sent (unary: everything)
    pending_ids: list[int] = field(default_factory=list)
    pending_log_probs: list[float] = field(default_factory=list)
    last_token_at: float = 0.0


class EngineCore:
    def __init__(self, engine_dir: str | os.PathLike[str], config: CoreConfig | None = None,
                 observer: CoreObserver | None = None) -> None:
        self.config = config or CoreConfig()
        self.engine = Engine(engine_dir, threads=self.config.threads, providers=self.config.providers)
        self.manifest = self.engine.manifest
        self.model_name = str(self.manifest.get("variant", "llama"))
        self.tokenizer = self.engine.tokenizer
        self.context_length = self.engine.kv.max_capacity
        self.eos_ids = self.engine.eos_ids
        spec = self.engine.kv
        if self.config.kv_budget_tokens is not None:
            budget = self.config.kv_budget_tokens
        elif self.config.kv_budget_bytes is not None:
            budget = self.config.kv_budget_bytes // KVCacheManager.bytes_per_token(spec)
        else:
            budget = min(self.context_length, 2048) * self.config.max_num_seqs
        self.kv = KVCacheManager(spec, budget, self.config.block_size)
        self.scheduler = Scheduler(SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                                   self.config.max_queue, self.config.policy), self.kv)
        self.observer = observer
        self._lock = threading.Condition()
        self._inbox: list[_Live] = []
        self._cancels: set[str] = set()
        self._live: dict[str, _Live] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._batch: _DecodeBatch | None = None
        condense = self.config.condense_decode_rows
        self._condense = self.config.policy == "inflight" if condense is None else condense
        self.generated_tokens = 0
        self.steps = 0
        # Where decode time goes; bench/kv_layout.py reads these to weigh the block gathers.
        self.timings = {"gather": 0.0, "engine": 0.0, "scatter": 0.0}
        self.decode_steps = 0
        self.decode_gathers = 0

    # -- front-end API --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="engine-core", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, request: GenerationRequest, sink: OutputSink | None = None) -> RequestHandle:
        """Queue a request. Its outputs go to the returned handle, or to `sink` (see RequestHandle),
        called from the step loop's thread."""
        self._validate(request)
        handle = RequestHandle(request.request_id, self.cancel, sink)
        end_ids = frozenset(request.end_ids if request.end_ids is not None else self.eos_ids)
        detok = None
        if request.detokenize and self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, request.stop_words)
        seq = Sequence(request.request_id, list(request.prompt_ids), len(request.prompt_ids),
                       len(request.prompt_ids) + request.max_tokens)
        live = _Live(request, handle, seq, np.random.default_rng(request.sampling.seed), detok, end_ids,
                     time.perf_counter())
        with self._lock:
            if len(self.scheduler.waiting) + len(self._inbox) >= self.config.max_queue:
                raise QueueFullError(f"waiting queue is full ({self.config.max_queue} requests); retry later")
            if request.request_id in self._live or any(x.request.request_id == request.request_id for x in self._inbox):
                raise RequestError("id", f"request id {request.request_id!r} is already in flight")
            self._inbox.append(live)
            self._lock.notify_all()
        return handle

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancels.add(request_id)
            self._lock.notify_all()

    def stats(self) -> dict[str, float]:
        usage = self.kv.usage()
        with self._lock:
            waiting = len(self.scheduler.waiting) + len(self._inbox)
        return {
            "waiting": waiting,
            "running": len(self.scheduler.running),
            "kv_total_tokens": usage.total_tokens,
            "kv_used_tokens": usage.used_tokens,
            "kv_free_tokens": usage.free_tokens,
            "kv_free_fraction": usage.free_fraction,
            "generated_tokens": self.generated_tokens,
        }

    def idle(self) -> bool:
        with self._lock:
            return not self._inbox and not self._live and not self._cancels

    def _validate(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise RequestError("text_input", "the prompt is empty")
        if request.max_tokens <= 0:
            raise RequestError("max_tokens", f"must be > 0, got {request.max_tokens}")
        total = len(request.prompt_ids) + request.max_tokens
        if total > self.context_length:
            raise RequestError("max_tokens", f"prompt ({len(request.prompt_ids)} tokens) + max_tokens "
                                             f"({request.max_tokens}) = {total} exceeds the context length {self.context_length}")
        if self.kv.blocks_for(total) > self.kv.num_blocks:
            raise RequestError("max_tokens", f"prompt + max_tokens = {total} tokens exceeds the whole KV cache budget "
                                             f"({self.kv.num_blocks * self.kv.block_size} tokens)")
        bad = [i for i in request.prompt_ids if not 0 <= i < self.engine.vocab_size]
        if bad:
            raise RequestError("input_ids", f"token id {bad[0]} is outside the vocabulary [0, {self.engine.vocab_size})")

    # -- the step loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._inbox and not self._cancels and not self.scheduler.has_work():
                    self._lock.wait()
                if self._stopping:
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, set()
            for live in inbox:
                self._live[live.request.request_id] = live
                self.scheduler.add(live.seq)
            for request_id in cancels:
                self._finish_id(request_id, "cancelled")
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - one failed step must not take the server down
                traceback.print_exc()
                for request_id in list(self._live):
                    self._finish_id(request_id, "error", error=f"engine step failed: {e}")
        for request_id in list(self._live):
            self._finish_id(request_id, "cancelled")

    def step(self) -> None:
        out = self.scheduler.schedule()
        if out.preempted:
            self._batch = None
        if out.empty:
            return
        self.steps += 1
        if out.decode:
            self._run_decode(out.decode)
        for group in padding_groups([c for c in out.prefill if c.start == 0], self.config.prefill_padding_tokens):
            self._run_prefill(group)
        for chunk in out.prefill:
            if chunk.start != 0:
                self._run_prefill([chunk])

    def _capacity(self, needed: int) -> int:
        """Double the decode batch's capacity as its longest row grows, so the arrays are rebuilt from
        blocks a handful of times per batch, not every few dozen tokens. Spare capacity costs no
        compute (attention reads each row's own length) and little memory (zero pages untouched)."""
        bs = self.kv.block_size
        capacity = -(-64 // bs) * bs
        while capacity < needed:
            capacity *= 2
        return min(capacity, -(-self.context_length // bs) * bs)

    def _run_decode(self, seqs: list[Sequence]) -> None:
        """One decode call. Each sequence keeps a row in the batch cache arrays (the last call's
        outputs) from one step to the next. A newcomer takes a dead row, or a new one, gathering
        only its own KV from blocks. A finished sequence leaves a dead row: with condensing (in-
        flight), the last live row moves into it; without (static), it stays in the batch, fed past
        length 0, until the whole batch has finished. Only a capacity change or a preemption
        rebuilds the arrays from blocks."""
        t0 = time.perf_counter()
        self.decode_steps += 1
        needed = max(s.num_computed for s in seqs) + 1
        by_id = {s.seq_id: s for s in seqs}
        batch = self._batch
        if batch is None or batch.capacity < needed:  # rebuilt from blocks, every row where it was
            kept: list[str | None] = batch.rows if batch else []  # finished rows are dropped below
            capacity = self._capacity(needed)
            arrays = self.kv.spec.empty(max(len(kept), self.config.max_num_seqs), capacity)
            placed = [(row, sid) for row, sid in enumerate(kept) if sid in by_id]
            self.kv.gather_into(arrays, [row for row, _ in placed], [sid for _, sid in placed])
            batch = _DecodeBatch(capacity, kept, arrays, batch.static_batch if batch else self.scheduler.static_batches)
            self.decode_gathers += 1
        rows = [sid if sid in by_id else None for sid in batch.rows]
        if batch.static_batch != self.scheduler.static_batches:
            rows, batch.static_batch = [], self.scheduler.static_batches  # a new static batch starts at row 0
        taken = set(rows)
        newcomers = [s.seq_id for s in seqs if s.seq_id not in taken]
        if newcomers:
            self.decode_gathers += 1
            holes = [row for row, sid in enumerate(rows) if sid is None][: len(newcomers)]
            slots = holes + list(range(len(rows), len(rows) + len(newcomers) - len(holes)))
            rows += [None] * (len(newcomers) - len(holes))
            batch.reserve(len(rows), self.config.max_num_seqs)
            self.kv.gather_into(batch.arrays, slots, newcomers)
            for sid, row in zip(newcomers, slots):
                rows[row] = sid
        batch.rows = rows
        if self._condense:
            batch.condense({sid: by_id[sid].num_computed for sid in by_id})
        row_of = {sid: row for row, sid in enumerate(batch.rows) if sid is not None}
        input_ids = np.zeros((len(batch.rows), 1), dtype=np.int64)
        past_lengths = np.zeros(len(batch.rows), dtype=np.int32)
        for sid, row in row_of.items():
            input_ids[row, 0] = by_id[sid].tokens[by_id[sid].num_computed]
            past_lengths[row] = by_id[sid].num_computed
        t1 = time.perf_counter()
        arrays = batch.views()  # leading-axis slices of C-contiguous arrays: contiguous, no copy
        if self.engine.decode_in_place:  # the new token lands in `arrays` itself: no cache copy
            logits, present = self.engine.decode_in_place_step(input_ids, past_lengths, arrays), arrays
        else:
            logits, present = self.engine.step(input_ids, past_lengths, arrays)
        t2 = time.perf_counter()
        ids = list(row_of)
        self.kv.scatter(ids, [by_id[sid].num_computed for sid in ids], [1] * len(ids), present,
                        rows=[row_of[sid] for sid in ids])
        t3 = time.perf_counter()
        self.timings["gather"] += t1 - t0
        self.timings["engine"] += t2 - t1
        self.timings["scatter"] += t3 - t2
        if present is not arrays:  # the copying path returned new arrays
            batch.arrays = present
        self._batch = batch
        for seq in seqs:
            seq.num_computed += 1
            self._sample(seq, logits[row_of[seq.seq_id], 0])

    def _run_prefill(self, chunks: list[Chunk]) -> None:
        width = max(c.count for c in chunks)
        capacity = -(-max(c.start + c.count for c in chunks) // self.kv.block_size) * self.kv.block_size
        input_ids = np.zeros((len(chunks), width), dtype=np.int64)
        for row, c in enumerate(chunks):
            input_ids[row, : c.count] = c.seq.tokens[c.start : c.start + c.count]
        ids = [c.seq.seq_id for c in chunks]
        past = self.kv.gather(ids, capacity)
        last = np.array([[c.count - 1] for c in chunks], np.int64)  # each row's last token: all it samples from
        logits, present = self.engine.step(input_ids, np.array([c.start for c in chunks], np.int32), past, last)
        self.kv.scatter(ids, [c.start for c in chunks], [c.count for c in chunks], present)
        for row, c in enumerate(chunks):
            c.seq.num_computed += c.count
            if c.completes_prompt:
                self._sample(c.seq, logits[row, 0])

    # -- per-request token handling -----------------------------------------------------------------
    def _sample(self, seq: Sequence, logits: np.ndarray) -> None:
        live = self._live.get(seq.seq_id)
        if live is None:
            return
        req = live.request
        banned = self._banned(live)
        token, log_prob = sample(logits, req.sampling, live.rng, seq.tokens, banned,
                                 want_log_prob=req.return_log_probs)
        now = time.perf_counter()
        if self.observer:
            if not live.generated:
                self.observer.on_first_token(req.request_id, now - live.arrived)
            else:
                self.observer.on_token(req.request_id, now - live.last_token_at)
        live.last_token_at = now
        self.generated_tokens += 1
        if token in live.end_ids:
            self._finish(live, "stop")
            return
        seq.tokens.append(token)
        live.generated.append(token)
        live.log_probs.append(log_prob)
        live.pending_ids.append(token)
        live.pending_log_probs.append(log_prob)
        if live.detok is not None:
            piece = live.detok.add([token])
            if piece:
                live.text.append(piece)
            if live.detok.stopped:
                self._finish(live, "stop")
                return
        if len(live.generated) >= req.max_tokens or len(seq.tokens) >= self.context_length:
            self._finish(live, "length")
        elif req.stream and (live.detok is None or live.text):
            self._emit(live)

    def _banned(self, live: _Live) -> list[int]:
        banned: list[int] = []
        if len(live.generated) < live.request.min_tokens:
            banned.extend(live.end_ids)
        for words in live.request.bad_words:
            # Ban the last token of a sequence whose other tokens were just generated.
            if len(words) == 1 or live.generated[-(len(words) - 1):] == list(words[:-1]):
                banned.append(words[-1])
        return banned

    def _emit(self, live: _Live, finished: bool = False, reason: str | None = None, error: str | None = None) -> None:
        out = GenerationOutput(
            request_id=live.request.request_id, token_ids=live.pending_ids, text="".join(live.text),
            log_probs=live.pending_log_probs, finished=finished, finish_reason=reason, error=error,
            num_input_tokens=live.seq.num_prompt, num_output_tokens=len(live.generated),
            cum_log_prob=float(sum(live.log_probs)),
        )
        live.pending_ids, live.pending_log_probs, live.text = [], [], []
        live.handle.put(out)

    def _finish(self, live: _Live, reason: str, error: str | None = None) -> None:
        if live.detok is not None and reason != "cancelled":
            tail = live.detok.finish()
            if tail:
                live.text.append(tail)
        self.scheduler.finish(live.seq)
        self._live.pop(live.request.request_id, None)
        self._emit(live, finished=True, reason=reason, error=error)
        if self.observer:
            self.observer.on_finished(live.request.request_id, reason, len(live.generated))

    def _finish_id(self, request_id: str, reason: str, error: str | None = None) -> None:
        live = self._live.get(request_id)
        if live is not None:
            self.scheduler.remove(request_id)
            self._finish(live, reason, error)

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until every submitted request has finished (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() > deadline:
                raise TimeoutError("engine core did not drain")
            time.sleep(0.005)


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


def run_to_completion(core: EngineCore, requests: Iterable[GenerationRequest]) -> list[GenerationOutput]:
    """Submit requests and collect each one's outputs merged into one (token ids, text, log probs)."""
    handles = [core.submit(r) for r in requests]
    merged = []
    for handle in handles:
        parts = list(handle)
        last = parts[-1]
        merged.append(GenerationOutput(
            request_id=last.request_id, token_ids=[t for p in parts for t in p.token_ids],
            text="".join(p.text for p in parts), log_probs=[x for p in parts for x in p.log_probs],
            finished=True, finish_reason=last.finish_reason, error=last.error,
            num_input_tokens=last.num_input_tokens, num_output_tokens=last.num_output_tokens,
            cum_log_prob=last.cum_log_prob,
        ))
    return merged
