"""Beam search, the way transformers' `generate(num_beams=..., length_penalty=..., early_stopping=...)`
runs it (its vectorized `_beam_search`), for one request: which beams continue after each step,
which finish, and when the search is over. The engine core runs the beams as sequences that share
KV blocks (runtime/core/engine_core.py); this module only does the arithmetic, in float32 as
transformers does, so the same logits give the same beams.

Each step, with W beams and running scores s_b (the sum of the beam's token log probs):
  1. every continuation (b, t) scores s_b + log_softmax(logits_b)[t]; the 2W best (max(2, 1 + number
     of end ids) x W) are the candidates, best first (at the first step only beam 0 is live: the
     others score -1e9);
  2. a candidate that ends with an end id, or reaches max_tokens, is finished; one of the first W
     candidates that finished enters the finished set with score / (generated length **
     length_penalty) (its end id counted), and the set keeps its W best;
  3. the W best unfinished candidates are the next beams (each forks the KV of its parent beam);
  4. the search ends when every candidate finished, or no running beam can beat the finished set's
     worst (transformers' heuristic: `early_stopping` False, or "never"), or, with early_stopping
     True, once W beams have finished.
The result is the finished set, best first (the best `n` of it are returned).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

NEG = np.float32(-1.0e9)


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, the end id included if it ended with one
    score: float  # length-penalized
    sum_log_probs: float
    log_probs: list[float] = field(default_factory=list)  # each token's (the beam's output_log_probs)


@dataclass
class BeamStep:
    """What one step decided: for each next beam, the index of the beam it continues and its new
    token (`parents`, `tokens`), and whether the search is over."""

    parents: list[int]
    tokens: list[int]
    done: bool


@dataclass
class BeamSearch:
    num_beams: int
    max_tokens: int
    end_ids: frozenset[int]
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    generated: list[list[int]] = field(default_factory=list)  # each running beam's tokens
    token_log_probs: list[list[float]] = field(default_factory=list)  # and their log probabilities
    running: np.ndarray = field(init=False)  # running beams' scores, float32
    finished: list[Hypothesis] = field(default_factory=list)
    heuristic_unsatisfied: bool = True

    def __post_init__(self) -> None:
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        self.running = np.full(self.num_beams, NEG, np.float32)
        self.running[0] = 0.0
        self.generated = [[] for _ in range(self.num_beams)]
        self.token_log_probs = [[] for _ in range(self.num_beams)]

    @property
    def steps(self) -> int:
        return len(self.generated[0])

    def step(self, logits: np.ndarray) -> BeamStep:
        """`logits` [num_beams, vocab] (row b: the running beam b's next-token logits; at the first
        step every row may be the prompt's)."""
        w = self.num_beams
        x = logits.astype(np.float32)
        m = x.max(axis=1, keepdims=True)
        log_probs = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True), dtype=np.float32)
        vocab = log_probs.shape[1]
        accumulated = (log_probs + self.running[:, None]).reshape(-1)
        keep = max(2, 1 + len(self.end_ids)) * w
        # torch.topk's order: by value, ties by the lower index first.
        top = np.lexsort((np.arange(accumulated.size), -accumulated))[:keep]
        top_scores = accumulated[top]
        parents, tokens = (top // vocab).tolist(), (top % vocab).tolist()
        chosen = log_probs.reshape(-1)[top].tolist()
        length = self.steps + 1
        hits = np.array([t in self.end_ids or length >= self.max_tokens for t in tokens])

        # 3. the next running beams: the best unfinished candidates (finished ones sink by -1e9).
        running_scores = top_scores + hits.astype(np.float32) * NEG
        order = np.lexsort((np.arange(keep), -running_scores))[:w]
        # 2. the finished set, before the running beams are replaced (it reads the parents' tokens).
        penalized = top_scores / np.float32(length ** self.length_penalty)
        full = len(self.finished) == w and self.early_stopping is True
        new = [Hypothesis(self.generated[parents[i]] + [tokens[i]], float(penalized[i]), float(top_scores[i]),
                          self.token_log_probs[parents[i]] + [chosen[i]])
               for i in range(w) if hits[i] and not full and self.heuristic_unsatisfied]
        if new:
            merged = self.finished + new
            # Stable: among equal scores the earlier (already finished) one stays first, as
            # transformers' topk over [finished, new] does.
            merged.sort(key=lambda h: -np.float32(h.score))
            self.finished = merged[:w]
        self.generated = [self.generated[parents[i]] + [tokens[i]] for i in order]
        self.token_log_probs = [self.token_log_probs[parents[i]] + [chosen[i]] for i in order]
        self.running = running_scores[order].astype(np.float32)
        step = BeamStep([parents[i] for i in order], [tokens[i] for i in order], False)

        # 4. is it over?
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            hypothetical = self.max_tokens
        else:
            hypothetical = length
        best_possible = np.float32(self.running[0] / np.float32(hypothetical ** self.length_penalty))
        if len(self.finished) == w:
            worst = min(np.float32(h.score) for h in self.finished)
            self.heuristic_unsatisfied = self.heuristic_unsatisfied and bool(best_possible > worst)
        all_finished = len(self.finished) == w
        step.done = (not self.heuristic_unsatisfied or (all_finished and self.early_stopping is True)
                     or bool(hits.all()))
        return step

    def best(self, n: int) -> list[Hypothesis]:
        """The `n` best finished hypotheses (running beams fill in if fewer finished, as transformers'
        finished set starts with -1e9 placeholders that never win)."""
        return self.finished[:n]
