"""Token sampling on logits rows, in NumPy (float64 for a stable softmax).

Each sequence owns its `numpy.random.Generator`, so a seed gives the same tokens whatever else is
in the batch.

One row goes through these steps, in vLLM v1's order (its sampler, then its logits processors):

  1. the repetition penalty (CTRL's, as transformers: every token so far, prompt included);
  2. the presence and frequency penalties (OpenAI's formula, over the *generated* tokens only, as
     vLLM and OpenAI count them): logit[j] -= count[j] * frequency + (count[j] > 0) * presence;
  3. `logit_bias` (OpenAI's: added to the logits);
  4. bans (end ids before min_tokens, bad words) and a guided-decoding mask (runtime/core/guided.py):
     -inf;
  5. greedy: the argmax. Sampling: temperature, then `min_p` (vLLM's: drop the tokens whose
     probability is below min_p times the most likely one's), `top_k`, `top_p`, and a draw.

Log probabilities are those of the distribution the token was drawn from: after steps 1-4, and for
sampling after temperature and the truncations (a truncated token's is -inf). The top log probs of
a step are that distribution's k most likely tokens, so the sampled token's log prob is among them
whenever it is one of the k most likely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# OpenAI's bound on top_logprobs (vLLM's default max_logprobs is 20 too); every front end reads it here.
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's range, [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI's range, [-2, 2]
    # (token id, bias in [-100, 100]) pairs, OpenAI's logit_bias; a tuple so the params stay immutable.
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0  # in [0, 1]; 0 means off

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name}={value} must be in [-2, 2]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1]")
        for token, bias in self.logit_bias:
            if token < 0:
                raise ValueError(f"logit_bias: token id {token} must be >= 0")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias: the bias of token {token} is {bias}; it must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def adjusts_logits(self) -> bool:
        """Whether steps 1-3 change the row at all."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias))


@dataclass(frozen=True)
class Pick:
    """One sampled token: its log prob (0.0 unless asked) and its step's top log probs, most likely
    first (empty unless asked)."""

    token: int
    log_prob: float = 0.0
    top: tuple[tuple[int, float], ...] = ()


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style penalty as in transformers: positive logits divided, negative multiplied."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    logits = logits.copy()
    ids = np.unique(seen)
    vals = logits[ids]
    logits[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def apply_presence_frequency(logits: np.ndarray, generated: np.ndarray, presence: float,
                             frequency: float) -> np.ndarray:
    """OpenAI's presence / frequency penalties on `logits` (float64, changed in place), counting
    the generated tokens only. np.unique, not a bincount: it costs the tokens, not the vocabulary."""
    if (presence == 0.0 and frequency == 0.0) or generated.size == 0:
        return logits
    ids, counts = np.unique(generated, return_counts=True)
    logits[ids] -= counts * frequency + presence
    return logits


def adjusted_logits(logits: np.ndarray, params: SamplingParams, seen: np.ndarray | Sequence[int] | None = None,
                    generated: np.ndarray | Sequence[int] | None = None, banned: Sequence[int] | None = None,
                    allowed: np.ndarray | None = None) -> np.ndarray:
    """Steps 1-4 on a float64 copy of `logits` [V]: what greedy argmaxes and what temperature scales.
    `allowed`: a boolean mask [V] (guided decoding); a ban that would leave nothing allowed is not
    applied (the grammar wins: it may only allow the end of the output before min_tokens)."""
    x = logits.astype(np.float64)
    if seen is not None and params.repetition_penalty != 1.0:
        x = apply_repetition_penalty(x, np.asarray(seen, np.int64), params.repetition_penalty)
    if generated is not None and (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0):
        apply_presence_frequency(x, np.asarray(generated, np.int64), params.presence_penalty,
                                 params.frequency_penalty)
    if params.logit_bias:
        ids = np.fromiter((t for t, _ in params.logit_bias), np.int64)
        x[ids] += np.fromiter((b for _, b in params.logit_bias), np.float64)
    if allowed is not None:
        np.putmask(x, ~allowed, -np.inf)
        if banned:
            kept = x[banned].copy()
            x[banned] = -np.inf
            if not np.isfinite(x).any():
                x[banned] = kept
    elif banned:
        x[banned] = -np.inf
    return x


def sampling_distribution(x: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Step 5 for sampling: the probabilities [V] a token is drawn from, given `adjusted_logits`."""
    # One new array, then every step in place: a fresh temporary of the vocabulary's size is new
    # memory each time, and its page faults cost more than the arithmetic (1.7 -> 0.25 ms at vocab
    # 128256 on a 2-core VM, the same values).
    x = x / params.temperature
    if params.min_p > 0.0:  # p < min_p * p_max  <=>  x < x_max + log(min_p)
        x[x < x.max() + np.log(params.min_p)] = -np.inf
    if 0 < params.top_k < x.size:
        kth = np.partition(x, -params.top_k)[-params.top_k]
        x[x < kth] = -np.inf
    x -= x.max()
    probs = np.exp(x, out=x)
    probs /= probs.sum()
    if params.top_p < 1.0:
        mask = np.ones(probs.size, dtype=bool)
        mask[top_p_kept(probs, params.top_p)] = False
        probs[mask] = 0.0
        probs /= probs.sum()
    return probs


# The float64 rounding of a prefix sum taken back off (cumulative - p) is within 2 eps of the sum
# before it for values up to 1; a margin of 4 eps keeps the candidates' decision the full sort's.
_TOP_P_MARGIN = 4 * float(np.finfo(np.float64).eps)


def top_p_kept(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The ids top-p (nucleus) sampling keeps: the most likely tokens, in order (ties: the lower id
    first), while the mass before each is under `top_p`; the most likely is always kept.

    Sorting the vocabulary costs 14 ms at vocab 128256 (4 ms at 32000) a token. The kept tokens
    are a descending prefix, so they are among any candidates {p >= cut} whose mass reaches top_p:
    every token at least a thousandth as likely as the most likely one (a few hundred for a trained
    model), widened a thousandfold twice while their mass may fall short, then everything. The
    candidates' order and prefix sums are the full sort's (a stable sort, a sequential cumsum), so
    the result is exactly that of sorting everything."""
    top = float(probs.max())
    for cut in (top * 1e-3, top * 1e-6, top * 1e-9, 0.0):
        candidates = np.flatnonzero(probs >= cut)
        order = candidates[np.argsort(-probs[candidates], kind="stable")]
        cumulative = np.cumsum(probs[order])
        if cumulative[-1] >= top_p + _TOP_P_MARGIN or candidates.size == probs.size:
            break
    return order[cumulative - probs[order] < top_p]


def pick(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, *,
         seen: np.ndarray | Sequence[int] | None = None, generated: np.ndarray | Sequence[int] | None = None,
         banned: Sequence[int] | None = None, allowed: np.ndarray | None = None, want_log_prob: bool = True,
         top_logprobs: int = 0) -> Pick:
    """Pick the next token from one row of logits [V] (see the module docstring for the steps).
    `seen`: the tokens so far (read only for the repetition penalty); `generated`: the generated
    tokens (for the presence and frequency penalties); `allowed`: guided decoding's mask [V] (the
    tokens the grammar lets come next); `top_logprobs`: how many of the step's most likely tokens
    `Pick.top` lists (0: none). Unless `want_log_prob` or `top_logprobs`,
    the log prob is 0.0 (what TensorRT-LLM's Triton models report when return_log_probs is false),
    and a plain greedy pick skips the log-sum-exp over the vocabulary (half a millisecond at vocab
    32000, as long as the rest of a token's host work)."""
    want = want_log_prob or top_logprobs > 0
    if params.greedy and not want and not params.adjusts_logits and allowed is None:
        # The pick alone: the argmax of the row as it comes is the float64 row's (widening is exact),
        # so the float64 copy of the vocabulary row is skipped (about 70 of 90 us at vocab 32000).
        # Bans (min_tokens' end ids) rarely hit the argmax: when they miss it, it is the banned row's
        # too (a banned tie further on cannot win, argmax takes the first), so the copy is only made
        # when the argmax is banned.
        k = int(np.argmax(logits))
        if banned and k in banned:
            logits = logits.copy()
            logits[banned] = -np.inf
            k = int(np.argmax(logits))
        return Pick(k)
    support = None
    if allowed is not None:
        # A mask that allows few tokens (a grammar outside a string): work on those alone, not the
        # vocabulary. Exact, since every other token is -inf; the top log probs need k of them.
        support = np.flatnonzero(allowed)
        if 2 * support.size > allowed.size or top_logprobs > support.size:
            support = None
    if support is None:
        x = adjusted_logits(logits, params, seen, generated, banned, allowed)
    else:
        x = adjusted_logits(logits, params, seen, generated)[support]
        if banned:  # as adjusted_logits bans: unless nothing would be left
            ban = np.isin(support, banned)
            if not ban.all():
                x[ban] = -np.inf
    if params.greedy:
        k = int(np.argmax(x))
        if not want:
            return Pick(_token(k, support))
        x -= _logsumexp(x)  # x is adjusted_logits' copy: the log probs in place
        log_probs = x
    else:
        probs = sampling_distribution(x, params)
        k = draw(probs, rng)
        if not want:
            return Pick(_token(k, support))
        with np.errstate(divide="ignore"):  # a truncated token's log prob is -inf
            log_probs = np.log(probs, out=probs)  # probs is sampling_distribution's own array
    top = top_log_probs(log_probs, top_logprobs)
    if support is not None:
        top = tuple((int(support[i]), lp) for i, lp in top)
    return Pick(_token(k, support), float(log_probs[k]), top)


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn from `probs` [V]: what `rng.choice(V, p=probs)` draws (the inverse CDF of one
    uniform, so the same token from the same generator state), without choice's checks of `p`,
    which cost as much as the draw (at vocab 128256, 930 -> 480 us a sampled token)."""
    cdf = np.cumsum(probs)
    cdf /= cdf[-1]
    return int(np.searchsorted(cdf, rng.random(), side="right"))


def _token(k: int, support: np.ndarray | None) -> int:
    return k if support is None else int(support[k])


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           seen: np.ndarray | Sequence[int] | None = None, banned: list[int] | None = None,
           want_log_prob: bool = True) -> tuple[int, float]:
    """`pick` as (token, log prob), for callers without generated-token penalties or top log probs."""
    p = pick(logits, params, rng, seen=seen, banned=banned, want_log_prob=want_log_prob)
    return p.token, p.log_prob


def top_log_probs(log_probs: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    """The `k` largest entries of `log_probs` as (token, log prob), most likely first (ties: the
    lower id first)."""
    if k <= 0:
        return ()
    k = min(k, log_probs.size)
    kth = np.partition(log_probs, -k)[-k]
    above = np.flatnonzero(log_probs > kth)
    ids = np.concatenate([above, np.flatnonzero(log_probs == kth)[: k - above.size]])  # ties: the lower ids
    ids = ids[np.lexsort((ids, -log_probs[ids]))]
    return tuple((int(i), float(log_probs[i])) for i in ids)


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    e = x - m
    return m + float(np.log(np.sum(np.exp(e, out=e))))
