"""One scheduler: decides, every step, which sequences run and how many tokens each computes.

Policy (in the spirit of vLLM v1's scheduler), under a per-step token budget
(`max_num_batched_tokens`) and a running-set bound (`max_num_seqs`):

1. Decode first. Every running sequence whose prompt is fully computed gets one token, plus its
   draft (speculative decoding) as far as the token budget and free blocks allow. If the KV cache
   cannot hold that one token, the most recently admitted running sequence is preempted
   (recompute: its blocks are freed and it goes back to the head of the queue, prompt and
   generated tokens together, so no request ever fails for lack of KV memory).
2. Then prefill chunks for running sequences whose prompt is not yet computed (chunked prefill:
   a long prompt is spread over several steps, so decodes never stall behind it).
3. Then admission, first come first served: the head of the waiting queue joins the running
   batch if a sequence slot, token budget and KV blocks for its first chunk are available; if the
   head cannot join, nobody behind it does (strict FCFS). A sequence that starts from scratch (new,
   or preempted) first takes the cached blocks its tokens begin with (prefix caching,
   `KVCacheManager.lookup`), so its first chunk starts after them and the token budget pays only
   for what is computed.

New requests therefore join the running batch at the very next step (in-flight batching).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamaforge.runtime.core.config import SchedulerConfig
from llamaforge.runtime.core.kv_cache import KVCacheManager

if TYPE_CHECKING:
    from llamaforge.runtime.core.cross_attention import RequestImages

__all__ = ["Chunk", "Scheduler", "SchedulerConfig", "SchedulerOutput", "Sequence"]


@dataclass(eq=False)
class Sequence:
    """Scheduling state of one request. `tokens` is prompt + generated; the KV cache holds the
    first `num_computed` of them."""

    seq_id: str
    tokens: list[int]
    num_prompt: int
    max_total: int  # prompt + max_tokens: the KV the sequence may need
    num_computed: int = 0
    admitted_at: int = -1
    # Prefix caching: False for a sequence that must compute every prompt position (its request
    # returns context logits); its blocks are still registered for others. `cache_salt` keys its
    # blocks apart from other sequences' with the same tokens (what else changes the KV).
    reuse_prefix: bool = True
    cache_salt: bytes = b""
    num_cached_tokens: int = 0  # the tokens its last admission found cached
    # Speculative decoding: this step's proposed tokens (the speculator sets them before scheduling),
    # and the request's totals of draft tokens verified and accepted.
    draft: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # Beam search: the id of the beam group this sequence is a beam of. A group's beams decode in
    # the same step or not at all, and are preempted together (the engine core restarts the search).
    group: str | None = None
    # Llama 3.2 Vision: the request's images (shared by its n sequences); None: text only.
    images: RequestImages | None = None

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.tokens) - 1

    @property
    def remaining_prefill(self) -> int:
        """Tokens to compute before the next sample: all uncomputed ones."""
        return len(self.tokens) - self.num_computed


@dataclass
class Chunk:
    seq: Sequence
    start: int
    count: int

    @property
    def completes_prompt(self) -> bool:
        return self.start + self.count == len(self.seq.tokens)


@dataclass
class SchedulerOutput:
    decode: list[Sequence] = field(default_factory=list)
    # Decode rows with a draft: each computes its last sampled token and `seq.draft` in one call.
    verify: list[Sequence] = field(default_factory=list)
    prefill: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Policy "static": the number of the batch this step serves (from 1). A static batch keeps its
    # finished sequences' decode rows until all of it has finished, and the next batch starts again
    # from row 0. None in flight: a finished sequence's row is free at once.
    static_batch: int | None = None

    @property
    def empty(self) -> bool:
        return not self.decode and not self.verify and not self.prefill

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(1 + len(s.draft) for s in self.verify) + sum(c.count for c in self.prefill)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._admissions = 0
        self._static_batch: set[str] = set()  # policy "static": the batch being served
        self._static_batches = 0  # how many static batches have started

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq_id: str) -> Sequence | None:
        """Take a sequence out wherever it is and free its KV blocks."""
        for seq in list(self.waiting):
            if seq.seq_id == seq_id:
                self.waiting.remove(seq)
                self.kv.free(seq_id)
                return seq
        for seq in self.running:
            if seq.seq_id == seq_id:
                self.running.remove(seq)
                self.kv.free(seq_id)
                return seq
        return None

    def _can_grow_all(self, seqs: list[Sequence]) -> bool:
        need = sum(max(0, self.kv.blocks_for(len(s.tokens)) - len(self.kv.tables.get(s.seq_id, ()))) for s in seqs)
        return need <= self.kv.free_blocks

    def adopt(self, seq: Sequence) -> bool:
        """Run `seq`, forked from a running sequence (its KV already held), from the next step; False
        if the running batch is full."""
        if len(self.running) >= self.config.max_num_seqs:
            return False
        seq.admitted_at = self._admissions
        self._admissions += 1
        self.running.append(seq)
        return True

    def requeue(self, seqs: list[Sequence]) -> None:
        """Put sequences that could not be forked at the head of the queue, in order: they compute
        their prompt themselves (prefix caching finds its full blocks)."""
        self.waiting.extendleft(reversed(seqs))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt_last(self, out: SchedulerOutput, protect: str | None = None) -> Sequence:
        """Send the most recently admitted running sequence back to the head of the queue (not one of
        the beam group `protect` while anything else runs). A beam is preempted with its whole group,
        whose sequences leave the scheduler: the engine core restarts the group's search."""
        unscheduled = [s for s in self.running if s not in out.decode]  # a row already given its token stays
        others = [s for s in unscheduled if protect is None or s.group != protect]
        victim = max(others or unscheduled, key=lambda s: s.admitted_at)
        for seq in [s for s in self.running if s.group == victim.group] if victim.group else [victim]:
            self.running.remove(seq)
            self.kv.free(seq.seq_id)
            seq.draft = []
            seq.num_computed = 0  # recompute prompt + generated tokens when it is readmitted
            if seq.group is None:
                self.waiting.appendleft(seq)
            out.preempted.append(seq)
        return victim

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        # 1. decode: oldest admissions first, so preemption takes from the newest. A beam group's
        #    beams decode together or not at all.
        for seq in sorted(self.running, key=lambda s: s.admitted_at):
            if seq.in_prefill or seq not in self.running or budget <= 0 or seq in out.decode:
                continue
            gang = [s for s in self.running if s.group == seq.group] if seq.group else [seq]
            if len(gang) > budget:
                continue
            while not self._can_grow_all(gang):
                victim = self._preempt_last(out, protect=seq.group)
                if victim is seq or victim.group is not None and victim.group == seq.group:
                    break
            if seq in self.running:
                for s in gang:
                    self.kv.grow(s.seq_id, len(s.tokens))
                    out.decode.append(s)
                budget -= len(gang)
        # Drafts (speculative decoding) take what the budget and the free blocks leave once every
        # decode has its token, oldest first: a draft never preempts anyone.
        for seq in list(out.decode):
            room = min(budget, self.kv.room_for(seq.seq_id) - len(seq.tokens))
            del seq.draft[max(room, 0):]
            if seq.draft:
                self.kv.grow(seq.seq_id, len(seq.tokens) + len(seq.draft))
                out.decode.remove(seq)
                out.verify.append(seq)
                budget -= len(seq.draft)

        # 2. continue chunked prefills of running sequences.
        for seq in sorted(self.running, key=lambda s: s.admitted_at):
            if budget <= 0:
                break
            if seq.in_prefill:
                chunk = self._chunk(seq, budget)
                if chunk is None:
                    break
                out.prefill.append(chunk)
                budget -= chunk.count

        # 3. admit from the queue, strictly first come first served; not in a step that had to
        #    preempt (memory is short, and the victim would be readmitted at once: thrashing).
        #    Static batching: when the previous batch has drained, the next is the first
        #    `max_num_seqs` waiting requests; they are admitted (and prefilled) over as many steps as
        #    the token budget needs, and nobody else joins until all of them have finished.
        static = self.config.policy == "static"
        if static and not self.running and not (self._static_batch & {s.seq_id for s in self.waiting}):
            self._static_batch = {s.seq_id for s in list(self.waiting)[: self.config.max_num_seqs]}
            self._static_batches += 1
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if static and seq.seq_id not in self._static_batch:
                break
            cached = 0
            if seq.num_computed == 0 and seq.reuse_prefix:
                cached = seq.num_computed = self.kv.lookup(seq.seq_id, seq.tokens, seq.cache_salt)
            chunk = self._chunk(seq, budget)
            if chunk is None:
                if cached:  # not admitted: hand the shared blocks back until it is
                    self.kv.free(seq.seq_id)
                    seq.num_computed = 0
                break
            if seq.reuse_prefix and self.kv.prefix_caching:
                self.kv.record_lookup(len(seq.tokens), cached)
            seq.num_cached_tokens = cached
            self.waiting.popleft()
            seq.admitted_at = self._admissions
            self._admissions += 1
            self.running.append(seq)
            out.prefill.append(chunk)
            budget -= chunk.count

        # Running prefills can exhaust the blocks with no decode left to trigger preemption:
        # free the newest sequence so the older ones can progress.
        if out.empty and self.running:
            self._preempt_last(out)
            more = self.schedule()
            more.preempted[:0] = out.preempted
            return more
        if static:
            out.static_batch = self._static_batches
        return out

    def _chunk(self, seq: Sequence, budget: int) -> Chunk | None:
        """The next prefill chunk of `seq` within `budget` tokens, with its KV blocks reserved."""
        # Trim the chunk to what its blocks plus the free blocks can hold; zero waits for memory.
        count = min(seq.remaining_prefill, budget, self.kv.room_for(seq.seq_id) - seq.num_computed)
        if count <= 0:
            return None
        self.kv.grow(seq.seq_id, seq.num_computed + count)
        return Chunk(seq, seq.num_computed, count)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.kv.free(seq.seq_id)
