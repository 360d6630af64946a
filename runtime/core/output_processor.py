"""The output processor: from a sequence's logits to what its caller receives. It samples each
sequence with the request's own RNG (so a seed's output does not depend on the batch; penalties,
biases and top log probs: runtime/core/sampling.py), bans what must not be generated yet (end ids
before `min_tokens`, bad words), holds a guided request to its grammar (runtime/core/guided.py: the
grammar's mask, and the output ends where the grammar does), applies the stops (end ids, stop
words, `max_tokens`, the context length), detokenizes incrementally, and emits each request's news
to its `RequestHandle`, telling the `CoreObserver` about every token and finish.

It decides when a request is finished but does not free it: the engine core frees the sequence
and only then calls `finish`, so a caller that sees the final output also sees the KV blocks free.

Logits (only for requests that ask): a request's `ContextLogits` is filled by the model runner (the
engine core registers it there) and every output carries it once complete; each returned token's
logits row is copied as the engine gave it (sampling reads the row, never writes it), so it is the
raw row (no penalty, ban or temperature), and goes out with the output that carries the token. An
end id is not returned, so neither is the row it was sampled from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from llamaforge.runtime.core.detokenizer import IncrementalDetokenizer
from llamaforge.runtime.core.guided import Guidance, GuidedState
from llamaforge.runtime.core.model_runner import ContextLogits
from llamaforge.runtime.core.requests import GenerationOutput, GenerationRequest, RequestHandle
from llamaforge.runtime.core.sampling import pick
from llamaforge.runtime.core.scheduler import Sequence
from llamaforge.runtime.core.stats import CoreStats


class CoreObserver(Protocol):
    def on_first_token(self, request_id: str, ttft_s: float) -> None: ...
    def on_token(self, request_id: str, itl_s: float) -> None: ...
    def on_finished(self, request_id: str, reason: str, num_output_tokens: int) -> None: ...


@dataclass(eq=False)
class RequestState:
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
    pending_top: list[tuple[tuple[int, float], ...]] = field(default_factory=list)  # top_logprobs > 0
    last_token_at: float = 0.0
    admitted: float | None = None  # perf_counter when the scheduler first admitted it
    first_token_at: float | None = None  # perf_counter when its first token was sampled
    kv_blocks: int = 0  # KV blocks its sequence holds, as of the last step (the core keeps it)
    kv_reused_blocks: int = 0  # of them, found in the prefix cache at its admission (the core keeps it)
    context: ContextLogits | None = None  # return_context_logits: the prompt's logits
    pending_logits: list[np.ndarray] | None = None  # return_generation_logits: rows of pending_ids
    guide: GuidedState | None = None  # guided decoding: the matcher and its next mask
    index: int = 0  # which of the request's n sequences (0: the one that computes the prompt)
    # n > 1: the request's other sequences, forked from this one once its prompt is computed.
    siblings: list[RequestState] = field(default_factory=list)


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_ids: tuple[int, ...], context_length: int, stats: CoreStats,
                 observer: CoreObserver | None = None, vocab_size: int = 0) -> None:
        """`tokenizer`: the engine's (None: requests are not detokenized). `eos_ids`: the end ids of
        a request that names none. `vocab_size`: the width of a logits row (for returned logits)."""
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.context_length = context_length
        self.stats = stats
        self.observer = observer
        self.guidance = Guidance(tokenizer, vocab_size, eos_ids)

    def new_request(self, request: GenerationRequest, handle: RequestHandle) -> RequestState:
        """The state of the request's sequence 0, holding those of its other n - 1 (`siblings`)."""
        state = self._sequence(request, handle, 0)
        state.siblings = [self._sequence(request, handle, i) for i in range(1, request.n)]
        for sibling in state.siblings:
            sibling.context = state.context  # one prompt: its logits are shared
        return state

    def _sequence(self, request: GenerationRequest, handle: RequestHandle, index: int) -> RequestState:
        end_ids = frozenset(request.end_ids if request.end_ids is not None else self.eos_ids)
        detok = None
        if request.detokenize and self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, request.stop_words)
        seq_id = request.request_id if index == 0 else f"{request.request_id}#{index}"
        seq = Sequence(seq_id, list(request.prompt_ids), len(request.prompt_ids), len(request.prompt_ids) + request.max_tokens)
        # Sequence i's RNG stream: the seed's for the first (as with n = 1), [seed, i] for the others.
        seed = request.sampling.seed
        rng = np.random.default_rng(seed if index == 0 or seed is None else [seed, index])
        state = RequestState(request, handle, seq, rng, detok, end_ids, time.perf_counter(), index=index)
        if request.return_context_logits and index == 0:  # zeros: pages untouched until the prompt's rows land
            state.context = ContextLogits(np.zeros((seq.num_prompt, self.vocab_size), np.float32))
        if request.return_generation_logits:
            state.pending_logits = []
        if request.guided is not None:  # compiled here, on the submitting thread (a bad guide raises)
            state.guide = self.guidance.start(request.guided, end_ids)
        return state

    def update(self, sampled: list[tuple[RequestState, np.ndarray]]) -> list[tuple[RequestState, str]]:
        """Sample each request's next token from its logits row, append it to its sequence unless it
        stops the request, and stream what is new. Returns the requests that have finished, with
        their reason ('stop' or 'length'); their final output waits for `finish`."""
        finished = []
        guided = []
        for state, logits in sampled:
            reason = self._add_token(state, logits)
            if reason is not None:
                finished.append((state, reason))
            elif state.guide is not None:
                guided.append(state.guide)
        self.guidance.prefetch(guided)  # their next masks, while the engine runs its next call
        return finished

    def verify(self, state: RequestState, rows: np.ndarray, draft: list[int]) -> tuple[int, str | None]:
        """A verify row (speculative decoding): draw the target's token from each row of logits
        [1 + len(draft), vocab] in turn, exactly as `update` draws one, while each drawn token is the
        draft's (runtime/core/speculative.py says why that is exact). Returns how many draft tokens
        were accepted, and the finish reason if the request finished."""
        accepted, reason = 0, None
        for i, row in enumerate(rows):
            before = len(state.generated)
            reason = self._add_token(state, row, stream=False)  # the step's tokens go out together
            hit = i < len(draft) and len(state.generated) > before and state.generated[-1] == draft[i]
            accepted += hit
            if reason is not None or not hit:
                break
        if reason is None and state.request.stream and (state.detok is None or state.text):
            self._emit(state)
        return accepted, reason

    def _add_token(self, state: RequestState, logits: np.ndarray, stream: bool = True) -> str | None:
        req, seq = state.request, state.seq
        picked = pick(logits, req.sampling, state.rng, seen=seq.tokens, generated=state.generated,
                      banned=self._banned(state), allowed=state.guide.allowed() if state.guide else None,
                      want_log_prob=req.return_log_probs, top_logprobs=req.top_logprobs)
        token, log_prob = picked.token, picked.log_prob
        now = time.perf_counter()
        if self.observer:
            if not state.generated:
                if state.index == 0:  # a request's time to first token, once (its n siblings fork after it)
                    self.observer.on_first_token(req.request_id, now - state.arrived)
            else:
                self.observer.on_token(req.request_id, now - state.last_token_at)
        state.last_token_at = now
        if state.first_token_at is None:
            state.first_token_at = now
        self.stats.generated_tokens += 1
        if token in state.end_ids:
            return "stop"
        seq.tokens.append(token)
        state.generated.append(token)
        state.log_probs.append(log_prob)
        state.pending_ids.append(token)
        state.pending_log_probs.append(log_prob)
        if req.top_logprobs:
            state.pending_top.append(picked.top)
        if state.pending_logits is not None:  # a copy: the row is a view of the engine call's output
            state.pending_logits.append(np.array(logits, dtype=np.float32))
        if state.detok is not None:
            piece = state.detok.add([token])
            if piece:
                state.text.append(piece)
            if state.detok.stopped:
                return "stop"
        if state.guide is not None and state.guide.advance(token):
            return "stop"
        if len(state.generated) >= req.max_tokens or len(seq.tokens) >= self.context_length:
            return "length"
        if stream and req.stream and (state.detok is None or state.text):
            self._emit(state)
        return None

    def _banned(self, state: RequestState) -> list[int]:
        banned: list[int] = []
        if len(state.generated) < state.request.min_tokens:
            banned.extend(state.end_ids)
        for words in state.request.bad_words:
            # Ban the last token of a sequence whose other tokens were just generated.
            if len(words) == 1 or state.generated[-(len(words) - 1):] == list(words[:-1]):
                banned.append(words[-1])
        return banned

    def finish(self, state: RequestState, reason: str, error: str | None = None) -> None:
        """Emit the request's final output ('stop', 'length', 'cancelled' or 'error'); the core has
        freed its sequence."""
        if state.guide is not None:
            state.guide.close()
        if state.detok is not None and reason != "cancelled":
            tail = state.detok.finish()
            if tail:
                state.text.append(tail)
        self._emit(state, finished=True, reason=reason, error=error)
        if self.observer and state.handle.done.is_set():  # a request ends once, with its last sequence
            self.observer.on_finished(state.request.request_id, reason, len(state.generated))

    def _emit(self, state: RequestState, finished: bool = False, reason: str | None = None,
              error: str | None = None) -> None:
        out = GenerationOutput(
            request_id=state.request.request_id, token_ids=state.pending_ids, text="".join(state.text),
            sequence_index=state.index,
            log_probs=state.pending_log_probs, finished=finished, finish_reason=reason, error=error,
            num_input_tokens=state.seq.num_prompt, num_output_tokens=len(state.generated),
            cum_log_prob=float(sum(state.log_probs)), top_log_probs=state.pending_top,
            queue_s=None if state.admitted is None else state.admitted - state.arrived,
            arrival_ns=_ns(state.arrived), first_scheduled_ns=_ns(state.admitted),
            first_token_ns=_ns(state.first_token_at), last_token_ns=None if state.first_token_at is None else _ns(state.last_token_at),
            kv_blocks=state.kv_blocks, kv_reused_blocks=state.kv_reused_blocks,
            num_cached_tokens=state.seq.num_cached_tokens, num_draft_tokens=state.seq.num_draft_tokens,
            num_accepted_draft_tokens=state.seq.num_accepted_tokens,
        )
        if state.context is not None and state.context.complete:
            state.context.rows.flags.writeable = False  # shared by every output of the request
            out.context_logits = state.context.rows
        if state.pending_logits is not None:
            out.generation_logits = (np.stack(state.pending_logits) if state.pending_logits
                                     else np.zeros((0, self.vocab_size), np.float32))
            state.pending_logits = []
        state.pending_ids, state.pending_log_probs, state.pending_top, state.text = [], [], [], []
        state.handle.put(out)


def _ns(perf_counter_s: float | None) -> int | None:
    """A `time.perf_counter()` reading in nanoseconds of the same clock (`perf_counter_ns`)."""
    return None if perf_counter_s is None else int(perf_counter_s * 1e9)
