"""Speculative decoding: cheap proposals of a sequence's next tokens, verified by the target engine in
one call for all of them (vLLM's and TensorRT-LLM's speculative decoding, llama.cpp's lookup and
draft decoding).

Each step, before scheduling, every running sequence past its prompt may get a draft of up to
`num_speculative_tokens` tokens (`Sequence.draft`). The scheduler runs such a sequence as a verify
row: its last sampled token and the draft, one call, logits at every position. The output
processor then draws the target's token at each position in turn, as it would without a draft, and
keeps going while the token drawn equals the draft's (`OutputProcessor.verify`).

Why that is exact: the proposals here are deterministic (the n-gram's continuation, the draft
engine's greedy tokens), so the proposal distribution q is one-hot at the draft token d. Rejection
sampling accepts d with probability min(1, p(d) / q(d)) = p(d) and otherwise draws from
max(p - q, 0) renormalized, which is p without d; drawing x ~ p and accepting iff x == d has the
same law, and the emitted token is x either way. So every emitted token follows the target's
distribution (the same one `sampling.pick` draws from, penalties, bans and guides included), and a
greedy request emits exactly the tokens it emits without speculation. A seeded sampled request is
distributed the same but draws from its RNG in another order, so its tokens differ.

Proposers:
  * `NgramProposer` (prompt lookup): the tokens that followed the most recent earlier occurrence of
    the sequence's last n tokens, for n from `prompt_lookup_max` down to `prompt_lookup_min`. No
    second model; it pays off where outputs repeat their input (editing, extraction, code).
  * `DraftProposer`: the greedy continuation of a smaller engine with the same tokenizer, which
    keeps its own KV cache per sequence and recomputes only what the target did not accept.
`Speculator` wraps either: it caps the draft by what the request may still generate, and stands
back from a sequence whose drafts keep missing (after m >= 3 drafts in a row with nothing
accepted, it proposes nothing for 2^(m-2) steps, at most 64), so a workload without repeats costs
almost nothing; and it proposes nothing in a step where `disable_by_batch_size` sequences or more
are decoding (where verifying several rows at once costs more than it saves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from llamaforge.runtime.core.config import SpeculativeConfig, SpeculativeError, check_prompt_lookup
from llamaforge.runtime.core.scheduler import Sequence

MAX_BACKOFF_STEPS = 64


class Proposer(Protocol):
    def propose(self, seq: Sequence, k: int) -> list[int]: ...
    def forget(self, seq_id: str) -> None: ...


@dataclass
class _NgramIndex:
    tokens: list[int]  # the sequence's token list (the object: it only ever grows)
    # Each min_n-gram of the tokens before the last one -> the positions where it ends, ascending.
    ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    upto: int = 0  # the n-grams ending before this position are in `ends`


class NgramProposer:
    """Prompt lookup over the sequence's own tokens (prompt and generated). Each sequence keeps an
    index of where its min_n-grams end, extended by the tokens added since its last proposal, so a
    step visits only the earlier places of its last min_n-gram, not the whole sequence."""

    def __init__(self, min_n: int, max_n: int) -> None:
        check_prompt_lookup(min_n, max_n)
        self.min_n, self.max_n = min_n, max_n
        self.indexes: dict[str, _NgramIndex] = {}

    def propose(self, seq: Sequence, k: int) -> list[int]:
        tokens = seq.tokens
        last = len(tokens) - 1
        if last < self.min_n:
            return []
        index = self.indexes.get(seq.seq_id)
        if index is None or index.tokens is not tokens or index.upto > last:  # a new sequence under a reused id
            index = self.indexes[seq.seq_id] = _NgramIndex(tokens, upto=self.min_n - 1)
        m = self.min_n
        for end in range(index.upto, last):
            index.ends.setdefault(tuple(tokens[end - m + 1 : end + 1]), []).append(end)
        index.upto = last
        # Every earlier place of the last min_n-gram ends a candidate match; extend each backwards.
        # The longest match wins, and the most recent among equals (the likeliest to continue alike).
        best_n, best_end = 0, -1
        for end in reversed(index.ends.get(tuple(tokens[last - m + 1 :]), ())):
            n = m
            while n < self.max_n and end - n >= 0 and tokens[end - n] == tokens[last - n]:
                n += 1
            if n > best_n:
                best_n, best_end = n, end
                if n == self.max_n:
                    break
        if best_n < m:
            return []
        return tokens[best_end + 1 : best_end + 1 + k]

    def forget(self, seq_id: str) -> None:
        self.indexes.pop(seq_id, None)


@dataclass
class _DraftState:
    caches: list[np.ndarray]  # [1, kv_heads, capacity, head_dim] per layer (key.0, value.0, ...)
    tokens: list[int] = field(default_factory=list)  # the tokens whose KV the caches hold, in order


class DraftProposer:
    """The greedy tokens of a draft engine, one sequence at a time (batch 1: ONNX Runtime's fast
    attention path for any chunk, and no padding)."""

    def __init__(self, engine_dir: str, target_vocab: int, threads: int | None = None,
                 target_tokenizer: Any = None) -> None:
        from llamaforge.runtime.core.engine import Engine

        self.engine = Engine(engine_dir, threads=threads)
        if self.engine.vocab_size != target_vocab:
            raise SpeculativeError(f"draft_engine {engine_dir}: vocabulary of {self.engine.vocab_size} tokens, the "
                                   f"target's has {target_vocab}; a draft must share the target's tokenizer")
        if target_tokenizer is not None and self.engine.tokenizer is not None:
            mine, theirs = self.engine.tokenizer, target_tokenizer
            differ = next((i for i in range(target_vocab) if mine.id_to_bytes(i) != theirs.id_to_bytes(i)), None)
            if differ is not None:
                raise SpeculativeError(f"draft_engine {engine_dir}: its tokenizer's token {differ} is "
                                       f"{mine.id_to_bytes(differ)!r}, the target's is {theirs.id_to_bytes(differ)!r}; "
                                       "a draft must share the target's tokenizer")
        self.states: dict[str, _DraftState] = {}

    def propose(self, seq: Sequence, k: int) -> list[int]:
        spec = self.engine.kv
        if len(seq.tokens) + k > spec.max_capacity:
            return []
        state = self.states.get(seq.seq_id)
        if state is None:
            state = self.states[seq.seq_id] = _DraftState(spec.empty(1, self._capacity(len(seq.tokens) + k)))
        # Keep the KV of the longest prefix the draft computed that the sequence still has (what the
        # target accepted); recompute from there.
        keep = 0
        limit = min(len(state.tokens), len(seq.tokens))
        while keep < limit and state.tokens[keep] == seq.tokens[keep]:
            keep += 1
        del state.tokens[keep:]
        if state.caches[0].shape[2] < len(seq.tokens) + k:
            grown = spec.empty(1, self._capacity(len(seq.tokens) + k))
            for old, new in zip(state.caches, grown):
                new[:, :, : keep] = old[:, :, : keep]
            state.caches = grown
        pending = seq.tokens[keep:]  # at least the last token: nothing computed it yet
        draft: list[int] = []
        while len(draft) < k:
            ids = np.asarray([pending], dtype=np.int64)
            logits, present = self.engine.step(ids, np.array([len(state.tokens)], np.int32), state.caches,
                                               np.array([[len(pending) - 1]], np.int64))
            # present: [1, H, capacity, D] with the new positions written; the engine returns fresh arrays.
            state.caches = [np.ascontiguousarray(p) for p in present]
            state.tokens += pending
            token = int(np.argmax(logits[0, -1]))
            draft.append(token)
            pending = [token]
        return draft

    def _capacity(self, needed: int) -> int:
        capacity = 64
        while capacity < needed:
            capacity *= 2
        return min(capacity, self.engine.kv.max_capacity)

    def forget(self, seq_id: str) -> None:
        self.states.pop(seq_id, None)


@dataclass
class _Backoff:
    misses: int = 0  # drafts in a row with nothing accepted
    idle: int = 0  # steps left without proposals


@dataclass
class SpeculativeStats:
    draft_tokens: int = 0  # proposed and verified
    accepted_tokens: int = 0


class Speculator:
    """Proposals for the running sequences, capped and backed off; `record` tells it what was accepted."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer, context_length: int) -> None:
        config.check()
        self.k = config.num_speculative_tokens
        self.disable_by_batch_size = config.disable_by_batch_size
        self.proposer = proposer
        self.context_length = context_length
        self.stats = SpeculativeStats()
        self._backoff: dict[str, _Backoff] = {}

    @classmethod
    def from_config(cls, config: SpeculativeConfig, context_length: int, vocab_size: int,
                    tokenizer: Any = None, threads: int | None = None) -> Speculator | None:
        if config.method is None:
            return None
        config.check()  # before a draft engine is opened
        proposer: Proposer
        if config.method == "ngram":
            proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        else:
            assert config.draft_engine is not None  # checked
            proposer = DraftProposer(config.draft_engine, vocab_size, threads, tokenizer)
        return cls(config, proposer, context_length)

    def propose(self, seqs: list[Sequence]) -> None:
        """Set each sequence's draft: those past their prompt may get one, the rest get none (all of
        them when `disable_by_batch_size` sequences or more are decoding)."""
        decoding = sum(not seq.in_prefill for seq in seqs)
        off = 0 < self.disable_by_batch_size <= decoding
        for seq in seqs:
            seq.draft = []
            if off or seq.in_prefill or seq.group is not None:  # beams advance together, one token a step
                continue
            back = self._backoff.get(seq.seq_id)
            if back is None:  # (not setdefault: that would build a _Backoff every step)
                back = self._backoff[seq.seq_id] = _Backoff()
            if back.idle:
                back.idle -= 1
                continue
            # Room: what the request may still generate after the token the verify call samples.
            room = min(self.k, seq.max_total - len(seq.tokens) - 1, self.context_length - len(seq.tokens) - 1)
            if room > 0:
                seq.draft = self.proposer.propose(seq, room)[:room]

    def record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        self.stats.draft_tokens += proposed
        self.stats.accepted_tokens += accepted
        seq.num_draft_tokens += proposed
        seq.num_accepted_tokens += accepted
        back = self._backoff.setdefault(seq.seq_id, _Backoff())
        if accepted:
            back.misses = 0
        else:
            back.misses += 1
            back.idle = min(2 ** (back.misses - 2), MAX_BACKOFF_STEPS) if back.misses >= 3 else 0

    def forget(self, seq_id: str) -> None:
        self._backoff.pop(seq_id, None)
        self.proposer.forget(seq_id)
