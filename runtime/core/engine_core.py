"""The engine core: one step loop shared by every front end (the standalone gRPC server and the
Triton Python backend), in the layers of vLLM v1's engine core:

  * `EngineCore` (here): the request lifecycle and the step loop. Each step takes in new requests
    and cancellations (a cancelled sequence's KV blocks are freed here, within one step of the
    cancel), asks the `Scheduler` for this step's decodes and prefill chunks, has the model runner
    run them, and the output processor turn the logits into tokens; a request that finishes is
    freed, then sent its final output.
  * `ModelRunner` (model_runner.py): the engine calls, the decode batch and the KV gathers/scatters.
  * `OutputProcessor` (output_processor.py): sampling, stops, detokenizing, emitting.
  * `CoreStats` (stats.py): the counters, and the `stats()` snapshot.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import traceback
from collections.abc import Iterable

import numpy as np

from llamaforge.runtime.core.beam_search import BeamSearch, BeamStep
from llamaforge.runtime.core.config import CoreConfig
from llamaforge.runtime.core.cross_attention import CrossAttentionInputs, RequestImages
from llamaforge.runtime.core.engine import Engine, EngineError
from llamaforge.runtime.core.host_memory import retain_freed_memory
from llamaforge.runtime.core.kv_cache import KVCacheManager
from llamaforge.runtime.core.model_runner import ModelRunner, padding_groups
from llamaforge.runtime.core.output_processor import CoreObserver, OutputProcessor, RequestState
from llamaforge.runtime.core.requests import (
    EngineUnavailable,
    GenerationOutput,
    GenerationRequest,
    OutputSink,
    QueueFullError,
    RequestError,
    RequestHandle,
)
from llamaforge.runtime.core.scheduler import Scheduler, Sequence
from llamaforge.runtime.core.speculative import Speculator
from llamaforge.runtime.core.stats import CoreStats
from llamaforge.runtime.core.validation import RequestLimits, check_request
from llamaforge.runtime.parallel.rank_engine import open_engine
from llamaforge.runtime.parallel.runner import runner_class

__all__ = ["CoreConfig", "CoreObserver", "EngineCore", "padding_groups", "run_to_completion"]


@dataclasses.dataclass(eq=False)
class BeamGroup:
    """A beam search request: its beams (`members`, index = beam), each a sequence in the scheduler
    sharing KV blocks with the others, and the search that decides how they continue."""

    request: GenerationRequest
    handle: RequestHandle
    search: BeamSearch
    members: list[RequestState]
    beams_made: int = 0  # for fresh sequence ids


class EngineCore:
    def __init__(self, engine_dir: str | os.PathLike[str], config: CoreConfig | None = None,
                 observer: CoreObserver | None = None) -> None:
        self.config = config or CoreConfig()
        retain_freed_memory()  # the step loop's vocabulary-sized arrays: host_memory.py says why
        # A tensor-parallel engine opens its rank 0 here, and runs its steps on every rank (runtime/parallel/).
        self.engine: Engine = open_engine(engine_dir, threads=self.config.threads, providers=self.config.providers)
        self.manifest = self.engine.manifest
        self.model_name = self.manifest.variant
        self.tokenizer = self.engine.tokenizer
        self.context_length = self.engine.kv.max_capacity
        self.eos_ids = self.engine.eos_ids
        sched = self.config.scheduler
        self.kv = KVCacheManager.from_config(self.config.kv, self.engine.kv,
                                             default_tokens=min(self.context_length, 2048) * sched.max_num_seqs)
        self.scheduler = Scheduler(sched, self.kv)
        self.counters = CoreStats()
        self.runner: ModelRunner = runner_class(self.engine)(self.engine, self.kv, self.counters, max_num_seqs=sched.max_num_seqs,
                                  prefill_padding_tokens=self.config.prefill_padding_tokens,
                                  condense_decode_rows=self.config.condense_decode_rows)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_ids, self.context_length, self.counters,
                                                observer, vocab_size=self.engine.vocab_size)
        self.speculator = Speculator.from_config(self.config.speculative, self.context_length, self.engine.vocab_size,
                                                 self.tokenizer, self.config.threads)
        self.vision = self.engine.vision  # Llama 3.2 Vision: requests may carry images
        if self.vision is not None:
            if self.speculator is not None:
                raise EngineError(f"{engine_dir}: speculative decoding does not run Llama 3.2 Vision engines (its verify "
                                  "calls do not carry the cross-attention inputs)")
            self.runner.cross = CrossAttentionInputs(self.engine, self.config.threads, self.config.providers,
                                                     max_images=self.config.max_images)
        self._limits = RequestLimits(self.context_length, self.engine.vocab_size,
                                     kv_tokens=self.kv.num_blocks * self.kv.block_size,
                                     image_token_id=self.vision.image_token_id if self.vision is not None else None)
        self._lock = threading.Condition()
        self._inbox: list[RequestState] = []
        self._cancels: set[str] = set()
        self._live: dict[str, RequestState] = {}
        self._groups: dict[str, BeamGroup] = {}  # beam search requests, by request id
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def observer(self) -> CoreObserver | None:
        """Told of every token and finish, from the step loop's thread; may be replaced at any time."""
        return self.output_processor.observer

    @observer.setter
    def observer(self, observer: CoreObserver | None) -> None:
        self.output_processor.observer = observer

    @property
    def steps(self) -> int:
        return self.counters.steps

    @property
    def generated_tokens(self) -> int:
        return self.counters.generated_tokens

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
        self.runner.close()

    def submit(self, request: GenerationRequest, sink: OutputSink | None = None) -> RequestHandle:
        """Queue a request. Its outputs go to the returned handle, or to `sink` (see RequestHandle),
        called from the step loop's thread."""
        check_request(request, self._limits)
        self._check_logits(request)
        if not 1 <= request.n <= self.config.scheduler.max_num_seqs:
            raise RequestError("n", f"must be in [1, {self.config.scheduler.max_num_seqs}] (the sequences the server "
                                    f"runs at once), got {request.n}")
        handle = RequestHandle(request.request_id, self.cancel, sink, num_sequences=request.n)
        group = None
        if request.beam_width > 1:
            self._check_beam(request)
            state = self.output_processor.new_request(dataclasses.replace(request, n=1), handle)
            group = self._beam_group(request, handle, state)
        else:
            state = self.output_processor.new_request(request, handle)
        images = self._images(request)
        # Context logits need every prompt position computed: such a request never starts from
        # cached blocks (it still leaves its own for others).
        for s in (state, *state.siblings):
            s.seq.reuse_prefix = not request.return_context_logits
            if images is not None:  # the same tokens with other images have other KV
                s.seq.images, s.seq.cache_salt = images, images.digest
        with self._lock:
            if len(self.scheduler.waiting) + len(self._inbox) >= self.config.max_queue:
                raise QueueFullError(f"waiting queue is full ({self.config.max_queue} requests); retry later")
            if any(x.request.request_id == request.request_id for x in (*self._live.values(), *self._inbox)):
                raise RequestError("id", f"request id {request.request_id!r} is already in flight")
            if group is not None:
                self._groups[request.request_id] = group
            self._inbox.append(state)
            self._lock.notify_all()
        return handle

    def _images(self, request: GenerationRequest) -> RequestImages | None:
        """The request's images preprocessed (runtime/core/cross_attention.py); None for text only."""
        cross = self.runner.cross
        if not request.images:
            if cross is not None and cross.vision.image_token_id in request.prompt_ids:
                raise RequestError("images", f"the prompt has <|image|> tokens (id {cross.vision.image_token_id}) "
                                             "but the request carries no image")
            return None
        field = request.images[0].field
        if cross is None:
            raise RequestError(field, f"model {self.model_name!r} is a text-only model: it takes no images")
        if request.beam_width > 1:
            raise RequestError("beam_width", "beam search does not take images here (use beam_width 1)")
        return cross.prepare(request.request_id, request.prompt_ids, request.images, field, field)

    def _check_beam(self, request: GenerationRequest) -> None:
        """What beam search takes here: greedy scoring (no sampling, penalties or bans), whole outputs
        (no streaming), the best n <= beam_width beams, all of them running at once."""
        width, most = request.beam_width, self.config.scheduler.max_num_seqs
        if width > most:
            raise RequestError("beam_width", f"must be <= {most} (the sequences the server runs at once), got {width}")
        if not 1 <= request.n <= width:
            raise RequestError("num_return_sequences", f"must be in [1, beam_width={width}], got {request.n}")
        if request.early_stopping not in (True, False, "never"):
            raise RequestError("early_stopping", f"must be true, false or 'never', got {request.early_stopping!r}")
        s = request.sampling
        refused = {
            "stream": request.stream, "temperature": not s.greedy and s.temperature > 0,
            "repetition_penalty": s.repetition_penalty != 1.0, "presence_penalty": s.presence_penalty != 0.0,
            "frequency_penalty": s.frequency_penalty != 0.0, "logit_bias": bool(s.logit_bias),
            "min_tokens": request.min_tokens > 0, "top_logprobs": request.top_logprobs > 0,
            "guided_decoding_guide": request.guided is not None,
            "bad_words": bool(request.bad_words), "stop_words": bool(request.stop_words),
            "return_context_logits": request.return_context_logits,
            "return_generation_logits": request.return_generation_logits,
        }
        for name, bad in refused.items():
            if bad:
                raise RequestError(name, "is not supported with beam_width > 1 (beam search here scores greedily "
                                         "and returns whole beams)")

    def _beam_group(self, request: GenerationRequest, handle: RequestHandle, first: RequestState) -> BeamGroup:
        first.seq.group = request.request_id
        first.seq.reuse_prefix = True
        search = BeamSearch(request.beam_width, request.max_tokens, first.end_ids, request.length_penalty,
                            request.early_stopping)
        return BeamGroup(request, handle, search, [first])

    def _check_logits(self, request: GenerationRequest) -> None:
        """Returned logits are float32 rows of the vocabulary, held until the request ends: refuse a
        request whose rows would pass `CoreConfig.max_logits_bytes`, naming the flag."""
        row = 4 * self.engine.vocab_size
        limit = self.config.max_logits_bytes
        context = len(request.prompt_ids) * row if request.return_context_logits else 0
        generation = request.max_tokens * row if request.return_generation_logits else 0
        if context > limit:
            raise RequestError("return_context_logits", f"the prompt's logits ({len(request.prompt_ids)} tokens x "
                                                        f"{self.engine.vocab_size} x 4 bytes = {context} bytes) exceed "
                                                        f"the server's limit of {limit} bytes per request")
        if context + generation > limit:
            also = f" plus the context logits' {context}" if context else ""
            raise RequestError("return_generation_logits", f"max_tokens ({request.max_tokens}) x {self.engine.vocab_size} "
                                                           f"x 4 bytes = {generation} bytes{also} exceed the server's "
                                                           f"limit of {limit} bytes of logits per request; ask for "
                                                           "fewer max_tokens")

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancels.add(request_id)
            self._lock.notify_all()

    def stats(self) -> dict[str, float]:
        usage = self.kv.usage()
        with self._lock:
            waiting = len(self.scheduler.waiting) + len(self._inbox)
        stats = self.counters.snapshot(waiting, len(self.scheduler.running), usage, self.kv.prefix_stats)
        if self.speculator is not None:
            stats["spec_draft_tokens"] = self.speculator.stats.draft_tokens
            stats["spec_accepted_tokens"] = self.speculator.stats.accepted_tokens
        return stats

    def idle(self) -> bool:
        with self._lock:
            return not self._inbox and not self._live and not self._cancels

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
            for state in inbox:
                self._live[state.seq.seq_id] = state
                self.scheduler.add(state.seq)
                if state.context is not None:  # the model runner fills it as the prompt is computed
                    self.runner.context_logits[state.seq.seq_id] = state.context
            for request_id in cancels:
                self._finish_id(request_id, "cancelled")
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - one failed step must not take the server down
                traceback.print_exc()
                reason = "unavailable" if isinstance(e, EngineUnavailable) else "error"
                for request_id in {s.request.request_id for s in self._live.values()}:
                    self._finish_id(request_id, reason, error=f"engine step failed: {e}")
        for request_id in {s.request.request_id for s in self._live.values()}:
            self._finish_id(request_id, "cancelled")

    def step(self) -> None:
        """One step: schedule, run each engine call, and turn each call's logits into tokens before
        the next call runs (so a decode's tokens stream before the step's prefills)."""
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        out = self.scheduler.schedule()
        for gid in dict.fromkeys(s.group for s in out.preempted if s.group is not None):
            self._restart_group(self._groups[gid])
        if not out.empty:
            self.counters.steps += 1
        now = time.perf_counter()
        for chunk in out.prefill:  # a request's first chunk is its admission (its queue time ends)
            admitted = self._live.get(chunk.seq.seq_id)
            if admitted is not None and admitted.admitted is None:
                admitted.admitted = now
        for sampled in self.runner.execute(out):
            states = [(self._live[seq.seq_id], logits) for seq, logits in sampled if seq.seq_id in self._live]
            states += self._fork_siblings(states)
            beams = [(s, logits) for s, logits in states if s.seq.group is not None]
            if beams:
                states = [(s, logits) for s, logits in states if s.seq.group is None]
                self._step_beams(beams)
            for state, _ in states:  # for its perf metrics, before `update` may finish (and free) it
                state.kv_blocks = len(self.kv.tables.get(state.seq.seq_id, ()))
                state.kv_reused_blocks = state.seq.num_cached_tokens // self.kv.block_size
            verifying = [(s, rows) for s, rows in states if s.seq.draft and any(s.seq is v for v in out.verify)]
            plain = [(s, logits) for s, logits in states if not any(s is v for v, _ in verifying)]
            for state, reason in self.output_processor.update(plain):
                self._finish(state, reason)
            for state, rows in verifying:
                draft = state.seq.draft
                accepted, finished = self.output_processor.verify(state, rows, draft)
                assert self.speculator is not None
                self.speculator.record(state.seq, len(draft), accepted)
                if finished is not None:
                    self._finish(state, finished)
                else:
                    self.runner.accept(state.seq, accepted)

    def _fork_siblings(self, states: list[tuple[RequestState, np.ndarray]]) -> list[tuple[RequestState, np.ndarray]]:
        """n > 1: a sequence 0 that has just computed its prompt hands it to its siblings. Each shares
        its KV blocks (the partial last one copied) and samples its first token from the same logits
        row with its own RNG; one that finds no free row or block waits at the head of the queue and
        computes the prompt itself (prefix caching finds its full blocks)."""
        forked: list[tuple[RequestState, np.ndarray]] = []
        for state, logits in states:
            if not state.siblings:
                continue
            parent, queued = state.seq, []
            for sibling in state.siblings:
                self._live[sibling.seq.seq_id] = sibling
                sibling.admitted = state.admitted
                if self.scheduler.adopt(sibling.seq):
                    if self.kv.fork(parent.seq_id, sibling.seq.seq_id, parent.num_computed):
                        sibling.seq.num_computed = parent.num_computed
                        sibling.seq.num_cached_tokens = parent.num_computed // self.kv.block_size * self.kv.block_size
                        forked.append((sibling, logits))
                        continue
                    self.scheduler.running.remove(sibling.seq)
                queued.append(sibling.seq)
            self.scheduler.requeue(queued)
            state.siblings = []
        return forked

    # -- beam search --------------------------------------------------------------------------------
    def _step_beams(self, entries: list[tuple[RequestState, np.ndarray]]) -> None:
        """One step of each beam group whose beams computed this call (all of a group's beams decode
        in the same call; at its first step, its one sequence has computed the prompt)."""
        groups: dict[str, list[tuple[RequestState, np.ndarray]]] = {}
        for state, logits in entries:
            assert state.seq.group is not None
            groups.setdefault(state.seq.group, []).append((state, logits))
        for gid, rows in groups.items():
            group = self._groups[gid]
            beam = {id(m): i for i, m in enumerate(group.members)}
            rows.sort(key=lambda r: beam[id(r[0])])
            if len(rows) != len(group.members):
                raise RuntimeError(f"beam group {gid}: {len(rows)} of its {len(group.members)} beams computed")
            width = group.request.beam_width
            logits = np.stack([r for _, r in rows]) if len(rows) == width else np.repeat(rows[0][1][None], width, axis=0)
            step = group.search.step(logits)
            self.counters.generated_tokens += len(step.tokens)
            if step.done:
                self._end_group(group)
            else:
                self._advance_group(group, step)

    def _advance_group(self, group: BeamGroup, step: BeamStep) -> None:
        """The next beams: a parent that continues keeps its sequence; one with several continuations
        forks its KV (full blocks shared, the partial one copied) for the others; a parent nobody
        continues is freed, before the forks need its blocks."""
        old, parents = group.members, step.parents
        new: list[RequestState | None] = [None] * len(parents)
        kept: set[int] = set()
        for j, p in enumerate(parents):
            if p not in kept:
                kept.add(p)
                new[j] = old[p]
        for i, state in enumerate(old):
            if i not in kept:
                self._drop_beam(state)
        for j, p in enumerate(parents):
            if new[j] is None:
                parent = old[p].seq
                group.beams_made += 1
                seq = Sequence(f"{parent.group}#beam{group.beams_made}", list(parent.tokens), parent.num_prompt,
                               parent.max_total, group=parent.group)
                child = RequestState(group.request, group.handle, seq, old[p].rng, None, old[p].end_ids, old[p].arrived,
                                     admitted=old[p].admitted)
                if not self.scheduler.adopt(seq):
                    return self._restart_group(group, new)
                if not self.kv.fork(parent.seq_id, seq.seq_id, parent.num_computed):
                    self.scheduler.running.remove(seq)
                    return self._restart_group(group, new)
                seq.num_computed = parent.num_computed
                self._live[seq.seq_id] = child
                new[j] = child
        members = [m for m in new if m is not None]
        for state, token in zip(members, step.tokens):
            state.seq.tokens.append(token)
        group.members = members

    def _drop_beam(self, state: RequestState) -> None:
        self.scheduler.remove(state.seq.seq_id)
        self._live.pop(state.seq.seq_id, None)

    def _restart_group(self, group: BeamGroup, also: list[RequestState | None] | None = None) -> None:
        """Start the group's search again from its prompt (its beams were preempted, or a fork found
        no room): beam search is deterministic, so the result is the same, computed later."""
        for state in {id(m): m for m in [*group.members, *(also or [])] if m is not None}.values():
            self._drop_beam(state)
        first = group.members[0]
        seq = Sequence(group.request.request_id, list(group.request.prompt_ids), first.seq.num_prompt,
                       first.seq.max_total, group=first.seq.group)
        state = RequestState(group.request, group.handle, seq, first.rng, None, first.end_ids, first.arrived,
                             admitted=first.admitted)
        group.search = BeamSearch(group.search.num_beams, group.search.max_tokens, group.search.end_ids,
                                  group.search.length_penalty, group.search.early_stopping)
        group.members = [state]
        self._live[seq.seq_id] = state
        self.scheduler.requeue([seq])

    def _end_group(self, group: BeamGroup, reason: str | None = None, error: str | None = None) -> None:
        """Free every beam, then send the best n beams (or, with `reason`, n final outputs saying why
        the request ended early)."""
        request = group.request
        for state in group.members:
            self._drop_beam(state)
        self._groups.pop(request.request_id, None)
        end_ids = group.members[0].end_ids
        finals = []
        if reason is None:
            for i, hyp in enumerate(group.search.best(request.n)):
                ended = bool(hyp.tokens) and hyp.tokens[-1] in end_ids
                tokens = hyp.tokens[:-1] if ended else hyp.tokens
                text = self.tokenizer.decode(tokens) if request.detokenize and self.tokenizer is not None else ""
                log_probs = hyp.log_probs[: len(tokens)] if request.return_log_probs else []
                finals.append(GenerationOutput(request.request_id, tokens, text, log_probs, finished=True,
                                               finish_reason="stop" if ended else "length", sequence_index=i,
                                               num_input_tokens=len(request.prompt_ids), num_output_tokens=len(tokens),
                                               cum_log_prob=hyp.sum_log_probs))
        else:
            finals = [GenerationOutput(request.request_id, [], finished=True, finish_reason=reason, error=error,
                                       sequence_index=i, num_input_tokens=len(request.prompt_ids))
                      for i in range(request.n)]
        for out in finals:
            group.handle.put(out)
        if self.observer is not None:  # a request ends once, whatever its number of beams
            out = finals[0]
            self.observer.on_finished(request.request_id, out.finish_reason or "error", out.num_output_tokens)

    def _finish(self, state: RequestState, reason: str, error: str | None = None) -> None:
        """Free the request's sequence and KV blocks, then send its final output (and its siblings'
        that were never forked: a request cancelled or failed before its prompt was computed)."""
        state.kv_blocks = len(self.kv.tables.get(state.seq.seq_id, ())) or state.kv_blocks
        self.scheduler.finish(state.seq)
        self.runner.context_logits.pop(state.seq.seq_id, None)
        if self.speculator is not None:
            self.speculator.forget(state.seq.seq_id)
        self._live.pop(state.seq.seq_id, None)
        rid = state.request.request_id
        if self.runner.cross is not None and not any(s.request.request_id == rid for s in self._live.values()):
            self.runner.cross.free(rid)  # the request's last sequence: its cross-attention cache goes too
        self.output_processor.finish(state, reason, error)
        for sibling in state.siblings:
            self.output_processor.finish(sibling, reason, error)
        state.siblings = []

    def _finish_id(self, request_id: str, reason: str, error: str | None = None) -> None:
        group = self._groups.get(request_id)
        if group is not None:
            return self._end_group(group, reason, error)
        for state in [s for s in self._live.values() if s.request.request_id == request_id]:
            self.scheduler.remove(state.seq.seq_id)
            self._finish(state, reason, error)

    def drain(self, timeout: float = 60.0) -> None:
        """Wait until every submitted request has finished (for tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() > deadline:
                raise TimeoutError("engine core did not drain")
            time.sleep(0.005)


def run_to_completion(core: EngineCore, requests: Iterable[GenerationRequest]) -> list[GenerationOutput]:
    """Submit requests and collect each sequence's outputs merged into one (token ids, text, log
    probs, the context logits and the generation logits' rows): one per request, or its n in order
    of `sequence_index`. A core not started yet is started once all are queued, so its first step
    sees every one of them (a deterministic schedule, for tests)."""
    handles = [core.submit(r) for r in requests]
    core.start()  # idempotent
    merged = []
    for handle in handles:
        by_index: dict[int, list[GenerationOutput]] = {}
        for out in handle:
            by_index.setdefault(out.sequence_index, []).append(out)
        for _, parts in sorted(by_index.items()):
            last = parts[-1]
            merged.append(dataclasses.replace(  # the last output's fields, with every output's pieces joined
                last, token_ids=[t for p in parts for t in p.token_ids], text="".join(p.text for p in parts),
                log_probs=[x for p in parts for x in p.log_probs], top_log_probs=[t for p in parts for t in p.top_log_probs],
                generation_logits=None if last.generation_logits is None else np.concatenate(
                    [p.generation_logits for p in parts if p.generation_logits is not None]),
            ))
    return merged
