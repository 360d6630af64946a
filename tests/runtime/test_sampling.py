"""Penalties, biases, min_p and top log probs (runtime/core/sampling.py), each checked against a
reference: transformers' logits processors where one exists (SequenceBiasLogitsProcessor for
logit_bias, MinPLogitsWarper after TemperatureLogitsWarper for min_p), OpenAI's formula written out
here for the presence and frequency penalties; then through the engine core, where the penalties
count the generated tokens only, a seed gives the same tokens whatever else is in the batch, and
the top log probs are those of the distribution each token was drawn from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
)

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
from llamaforge.runtime.core.engine_core import EngineCore
from llamaforge.runtime.core.requests import GenerationOutput, GenerationRequest, RequestError
from llamaforge.runtime.core.sampling import (
    SamplingParams,
    adjusted_logits,
    draw,
    pick,
    sampling_distribution,
    top_log_probs,
    top_p_kept,
)

V = 640


def _row(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(V) * 3).astype(np.float32)


def _openai_penalties(logits: np.ndarray, generated: list[int], presence: float, frequency: float) -> np.ndarray:
    """OpenAI's formula: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    counts = np.zeros(logits.size)
    for t in generated:
        counts[t] += 1
    return logits.astype(np.float64) - counts * frequency - (counts > 0) * presence


@pytest.mark.parametrize(("presence", "frequency"), [(0.5, 0.0), (0.0, 0.7), (1.5, -0.4), (-2.0, 2.0)])
def test_presence_and_frequency_penalties_are_openais_formula(presence: float, frequency: float) -> None:
    rng = np.random.default_rng(1)
    for trial in range(20):
        logits = _row(trial)
        generated = rng.integers(0, V, int(rng.integers(0, 40))).tolist()
        prompt = rng.integers(0, V, 10).tolist()
        params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
        got = adjusted_logits(logits, params, seen=prompt + generated, generated=generated)
        np.testing.assert_allclose(got, _openai_penalties(logits, generated, presence, frequency), rtol=0, atol=1e-12)
        # Greedy picks the reference's argmax; its log prob is the reference's log-softmax.
        want = _openai_penalties(logits, generated, presence, frequency)
        p = pick(logits, params, np.random.default_rng(0), seen=prompt + generated, generated=generated)
        assert p.token == int(np.argmax(want))
        assert p.log_prob == pytest.approx(float(torch.log_softmax(torch.from_numpy(want), -1)[p.token]), abs=1e-9)


def test_logit_bias_is_transformers_sequence_bias() -> None:
    bias = ((5, 100.0), (17, -100.0), (300, 2.5), (639, -0.25))
    processor = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias])
    for trial in range(10):
        logits = _row(trial)
        want = processor(torch.tensor([[1, 2, 3]]), torch.from_numpy(logits.astype(np.float64))[None])[0].numpy()
        got = adjusted_logits(logits, SamplingParams(logit_bias=bias))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    # +100 makes the token the greedy pick; -100 takes it out of a sample in practice.
    logits = _row(0)
    assert pick(logits, SamplingParams(logit_bias=((5, 100.0),)), np.random.default_rng(0)).token == 5
    sampled = SamplingParams(temperature=1.0, logit_bias=((int(np.argmax(logits)), -100.0),))
    assert all(pick(logits, sampled, np.random.default_rng(s)).token != int(np.argmax(logits)) for s in range(200))


@pytest.mark.parametrize(("temperature", "min_p"), [(1.0, 0.05), (0.7, 0.1), (1.5, 0.3), (1.0, 1.0)])
def test_min_p_is_transformers_min_p_after_temperature(temperature: float, min_p: float) -> None:
    warpers = (TemperatureLogitsWarper(temperature), MinPLogitsWarper(min_p))
    for trial in range(10):
        logits = _row(trial)
        scores = torch.from_numpy(logits.astype(np.float64))[None]
        for w in warpers:
            scores = w(torch.tensor([[1]]), scores)
        want = torch.softmax(scores, -1)[0].numpy()
        got = sampling_distribution(adjusted_logits(logits, SamplingParams()), SamplingParams(temperature=temperature,
                                                                                              min_p=min_p))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        assert (got > 0).sum() < V  # it does truncate


def test_min_p_draws_only_kept_tokens() -> None:
    logits = _row(3)
    params = SamplingParams(temperature=1.0, min_p=0.2)
    x = logits.astype(np.float64)
    kept = set(np.flatnonzero(np.exp(x - x.max()) >= 0.2).tolist())
    drawn = {pick(logits, params, np.random.default_rng(s)).token for s in range(300)}
    assert drawn <= kept and len(drawn) > 1


def test_top_log_probs_are_the_drawn_distributions() -> None:
    logits = _row(7)
    # Greedy: the log-softmax of the row after penalties, its k largest, most likely first.
    params = SamplingParams(frequency_penalty=0.5, logit_bias=((3, 1.0),))
    p = pick(logits, params, np.random.default_rng(0), generated=[4, 4, 9], top_logprobs=5)
    ref = torch.log_softmax(torch.from_numpy(adjusted_logits(logits, params, generated=[4, 4, 9])), -1)
    values, ids = torch.topk(ref, 5)
    assert [t for t, _ in p.top] == ids.tolist()
    np.testing.assert_allclose([lp for _, lp in p.top], values.numpy(), atol=1e-12)
    assert p.top[0] == (p.token, p.log_prob)
    # Sampling: log of the probabilities drawn from (temperature, top_k), truncated tokens -inf.
    params = SamplingParams(temperature=0.8, top_k=3, seed=1)
    for s in range(20):
        p = pick(logits, params, np.random.default_rng(s), top_logprobs=4)
        probs = sampling_distribution(adjusted_logits(logits, params), params)
        assert [t for t, _ in p.top[:3]] == np.argsort(-probs)[:3].tolist() and p.top[3][1] == -np.inf
        np.testing.assert_allclose([lp for _, lp in p.top[:3]], np.log(np.sort(probs)[::-1][:3]), atol=1e-12)
        assert (p.token, p.log_prob) in p.top
    assert top_log_probs(np.log(np.full(4, 0.25)), 20) == tuple((i, float(np.log(0.25))) for i in range(4))


@pytest.mark.parametrize("allowed_count", [3, 40, 600])  # the few-token path, and the masked row (> half)
def test_a_guided_mask_draws_from_the_allowed_tokens_renormalised(allowed_count: int) -> None:
    """With a mask (guided decoding), the distribution is the unmasked one restricted to the
    allowed tokens and renormalised, whichever way pick computes it; a ban that would leave nothing
    is not applied; the top log probs are the allowed tokens'."""
    logits = _row(5)
    allowed = np.zeros(V, bool)
    allowed[np.random.default_rng(allowed_count).choice(V, allowed_count, replace=False)] = True
    ids = np.flatnonzero(allowed)
    for params in (SamplingParams(), SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=2),
                   SamplingParams(temperature=1.3, min_p=0.05, frequency_penalty=0.5)):
        x = adjusted_logits(logits, params, generated=[int(ids[0])])
        want = np.full(V, -np.inf)
        if params.greedy:
            want[ids] = x[ids] - np.logaddexp.reduce(x[ids])
        else:
            masked = np.full(V, -np.inf)
            masked[ids] = x[ids]
            with np.errstate(divide="ignore"):
                want = np.log(sampling_distribution(masked, params))
        for s in range(20):
            p = pick(logits, params, np.random.default_rng(s), generated=[int(ids[0])], allowed=allowed, top_logprobs=3)
            assert allowed[p.token] and p.log_prob == pytest.approx(float(want[p.token]), abs=1e-9)
            order = sorted(range(V), key=lambda i: (-want[i], i))[:3]
            assert [lp for _, lp in p.top] == pytest.approx([float(want[i]) for i in order], abs=1e-9)
            assert [t for t, lp in p.top if lp > -np.inf] == [i for i in order if want[i] > -np.inf]
    only = int(ids[0])
    p = pick(logits, SamplingParams(), np.random.default_rng(0), allowed=allowed, banned=list(ids))
    assert allowed[p.token]  # every allowed token banned: the ban gives way to the mask
    one = np.zeros(V, bool)
    one[only] = True
    assert pick(logits, SamplingParams(temperature=1.0, top_k=5), np.random.default_rng(0), allowed=one).token == only


def test_a_greedy_pick_with_bans_is_the_argmax_of_the_banned_row() -> None:
    """The greedy pick skips the row's copy unless the argmax is banned; it must still pick what
    banning first and then taking the argmax picks, ties included (argmax takes the first)."""
    rng = np.random.default_rng(5)
    for trial in range(200):
        logits = rng.integers(0, 6, 40).astype(np.float32)  # few values: many ties with the max
        banned = rng.choice(40, size=int(rng.integers(1, 6)), replace=False).tolist()
        if trial % 50 == 0:
            banned = list(range(40))  # everything banned
        want = logits.copy()
        want[banned] = -np.inf
        got = pick(logits, SamplingParams(), np.random.default_rng(0), banned=banned, want_log_prob=False)
        assert got.token == int(np.argmax(want)), (logits, banned)


@pytest.mark.parametrize("vocab", [7, 4096, 128256])
def test_a_draw_is_numpys_choice_from_the_same_generator_state(vocab: int) -> None:
    """`draw` replaces `rng.choice(V, p=probs)` (half its cost at Llama 3's vocabulary): the same
    tokens from the same seeds, for full distributions and truncated ones (zeros: top-k, top-p)."""
    g = np.random.default_rng(vocab)
    for trial in range(40):
        x = g.standard_normal(vocab) * g.uniform(0.5, 4.0)
        if trial % 2:
            x[g.permutation(vocab)[: vocab // 2]] = -np.inf  # truncated: half the tokens have probability 0
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        ours, numpys = np.random.default_rng(trial), np.random.default_rng(trial)
        drawn = [draw(probs, ours) for _ in range(25)]
        assert drawn == [int(numpys.choice(vocab, p=probs)) for _ in range(25)], trial
        assert all(probs[t] > 0 for t in drawn)


def _top_p_by_sorting_everything(probs: np.ndarray, top_p: float) -> np.ndarray:
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    return np.sort(order[cumulative - probs[order] < top_p])


@pytest.mark.parametrize("vocab", [5, 4096, 128256])
def test_top_p_from_candidates_keeps_exactly_what_sorting_the_vocabulary_keeps(vocab: int) -> None:
    g = np.random.default_rng(vocab)
    for trial in range(60 if vocab < 100_000 else 15):  # (the reference sorts 128256 ids in 14 ms)
        scale = (0.3, 1.0, 4.0, 12.0)[trial % 4]  # flat to peaked (a trained model's are peaked)
        x = g.standard_normal(vocab) * scale
        if trial % 3 == 0:
            x = np.round(x, 1)  # ties, at the boundary too
        if trial % 5 == 0:
            x[g.permutation(vocab)[: vocab // 3]] = -np.inf  # top-k / min-p truncated: zeros
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        for top_p in (1e-9, 0.1, 0.5, 0.9, 0.95, 0.999999, 1 - 1e-16):
            got = top_p_kept(probs, top_p)
            assert got.size >= 1 and probs[got].max() == probs.max()
            np.testing.assert_array_equal(np.sort(got), _top_p_by_sorting_everything(probs, top_p),
                                          err_msg=f"trial {trial} top_p {top_p}")


def test_bad_values_name_the_field() -> None:
    for kwargs, field in (({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
                          ({"min_p": 1.5}, "min_p"), ({"logit_bias": ((1, 101.0),)}, "logit_bias"),
                          ({"logit_bias": ((-1, 1.0),)}, "logit_bias")):
        with pytest.raises(ValueError, match=f"^{field}"):
            SamplingParams(**kwargs)  # type: ignore[arg-type]


# -- through the engine core --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def core(tiny_engine: Path) -> EngineCore:
    c = EngineCore(tiny_engine, CoreConfig(KVCacheConfig(budget_tokens=2048), SchedulerConfig(max_num_seqs=8)))
    c.start()
    yield c
    c.stop()


def _run(core: EngineCore, requests: list[GenerationRequest]) -> list[GenerationOutput]:
    """Submit all, then merge each request's outputs (top log probs and logits rows included)."""
    handles = [core.submit(r) for r in requests]
    merged = []
    for h in handles:
        parts = list(h)
        merged.append(GenerationOutput(
            parts[-1].request_id, [t for p in parts for t in p.token_ids], "".join(p.text for p in parts),
            [x for p in parts for x in p.log_probs], True, parts[-1].finish_reason,
            generation_logits=np.concatenate([p.generation_logits for p in parts if p.generation_logits is not None])
            if parts[-1].generation_logits is not None else None,
            top_log_probs=[x for p in parts for x in p.top_log_probs]))
    return merged


PROMPT = [1, 100, 200, 300, 100, 200]


def test_core_penalises_the_generated_tokens_only(core: EngineCore) -> None:
    """Greedy with penalties: every token is the argmax of its raw row after OpenAI's formula over
    the tokens generated before it (the prompt's repeats are not counted), and the penalties change
    the output (the tiny model repeats itself without them)."""
    params = SamplingParams(presence_penalty=0.6, frequency_penalty=0.8)
    plain, penalised = _run(core, [
        GenerationRequest("plain", PROMPT, 24, SamplingParams(), end_ids=(), return_generation_logits=True),
        GenerationRequest("pen", PROMPT, 24, params, end_ids=(), return_generation_logits=True)])
    assert penalised.generation_logits is not None and len(penalised.token_ids) == 24
    for i, token in enumerate(penalised.token_ids):
        want = _openai_penalties(penalised.generation_logits[i], penalised.token_ids[:i], 0.6, 0.8)
        assert token == int(np.argmax(want)), i
    assert penalised.token_ids != plain.token_ids
    assert len(set(penalised.token_ids)) > len(set(plain.token_ids))


def test_core_top_log_probs_and_logit_bias(core: EngineCore) -> None:
    params = SamplingParams(temperature=0.9, min_p=0.02, seed=11, logit_bias=((42, 1.0),))
    (out,) = _run(core, [GenerationRequest("top", PROMPT, 12, params, end_ids=(), return_log_probs=True,
                                           top_logprobs=5, return_generation_logits=True)])
    assert out.generation_logits is not None and len(out.top_log_probs) == len(out.token_ids) == 12
    for i, (token, lp, top) in enumerate(zip(out.token_ids, out.log_probs, out.top_log_probs)):
        probs = sampling_distribution(adjusted_logits(out.generation_logits[i], params), params)
        assert lp == pytest.approx(float(np.log(probs[token])), abs=1e-9)
        assert [t for t, _ in top] == np.argsort(-probs, kind="stable")[:5].tolist()
        assert lp <= top[0][1] and (token not in dict(top) or dict(top)[token] == lp)
    # A request that asks for none gets none.
    (plain,) = _run(core, [GenerationRequest("none", PROMPT, 4, params, return_log_probs=True)])
    assert plain.top_log_probs == []


def test_a_seed_with_penalties_gives_the_same_tokens_in_any_batch(core: EngineCore) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=5, presence_penalty=0.4, frequency_penalty=0.3,
                            min_p=0.01, logit_bias=((7, 3.0),))
    (alone,) = _run(core, [GenerationRequest("alone", PROMPT, 16, params, end_ids=())])
    others = [GenerationRequest(f"o{i}", [1, 5 + i, 9], 20, SamplingParams(temperature=1.0, seed=i,
                                                                          frequency_penalty=1.0)) for i in range(5)]
    batch = _run(core, [*others[:3], GenerationRequest("in-batch", PROMPT, 16, params, end_ids=()), *others[3:]])
    assert batch[3].token_ids == alone.token_ids


def test_core_refuses_bad_values_naming_the_field(core: EngineCore) -> None:
    with pytest.raises(RequestError, match="^top_logprobs"):
        core.submit(GenerationRequest("x", PROMPT, 4, top_logprobs=21))
    with pytest.raises(RequestError, match="^logit_bias"):
        core.submit(GenerationRequest("y", PROMPT, 4, SamplingParams(logit_bias=((V, 1.0),))))
