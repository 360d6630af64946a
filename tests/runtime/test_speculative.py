"""Speculative decoding: the proposers, the scheduler's verify rows, greedy output equal to decoding
without speculation (prompt lookup and a draft engine, inside the in-flight batch), and sampled
output distributed as the target's (a chi-square test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TinyBuilds, hf_greedy, load_hf_oracle, tiny_config

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig, SpeculativeConfig
from llamaforge.runtime.core.engine import KVSpec
from llamaforge.runtime.core.engine_core import EngineCore, run_to_completion
from llamaforge.runtime.core.kv_cache import KVCacheManager
from llamaforge.runtime.core.output_processor import OutputProcessor
from llamaforge.runtime.core.requests import GenerationRequest, RequestHandle
from llamaforge.runtime.core.sampling import SamplingParams
from llamaforge.runtime.core.scheduler import Scheduler, Sequence
from llamaforge.runtime.core.speculative import NgramProposer, SpeculativeError, Speculator
from llamaforge.runtime.core.stats import CoreStats

SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=2, dtype=np.dtype(np.float32), max_capacity=4096)


def test_prompt_lookup_proposes_what_followed_the_most_recent_occurrence_of_the_last_ngram() -> None:
    ngram = NgramProposer(2, 3)
    seq = Sequence("s", [5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 2, 6, 7], 13, 40)
    # Last 3 tokens (2, 6, 7) never occurred before; the last 2 (6, 7) did, most recently at 6..7.
    assert ngram.propose(seq, 3) == [3, 4, 2]
    assert ngram.propose(seq, 10) == [3, 4, 2, 6, 7], "a continuation stops at the sequence's end"
    assert ngram.propose(Sequence("t", [1, 2, 3, 4, 2, 5], 6, 20), 4) == [], "single-token matches are below min"
    assert NgramProposer(1, 3).propose(Sequence("t", [1, 2, 3, 4, 2], 5, 20), 2) == [3, 4]
    with pytest.raises(SpeculativeError, match="prompt_lookup_min"):
        NgramProposer(3, 2)


def _lookup_by_scanning(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Prompt lookup by definition: of the earlier positions whose n-gram ending there equals the
    sequence's last n tokens, the one with the longest such n (at most max_n, at least min_n) wins,
    the most recent among equals; its continuation is the draft."""
    last = len(tokens) - 1
    best: tuple[int, int] = (0, -1)
    for end in range(last):
        n = 0
        while n < max_n and end - n >= 0 and tokens[end - n] == tokens[last - n]:
            n += 1
        if n >= min_n and n >= best[0]:
            best = (n, end)
    return tokens[best[1] + 1 : best[1] + 1 + k] if best[0] else []


@pytest.mark.parametrize("min_n,max_n", [(1, 3), (2, 4), (3, 3)])
def test_prompt_lookup_indexed_as_the_sequence_grows_equals_a_scan_of_the_whole_sequence(min_n: int, max_n: int) -> None:
    rng = np.random.default_rng(min_n * 10 + max_n)
    ngram = NgramProposer(min_n, max_n)
    for trial in range(6):
        # A small vocabulary, so n-grams repeat; grown a token or a few at a time (as accepted drafts
        # add several), asked at every length, under one reused sequence id.
        seq = Sequence("s", rng.integers(0, 4, 5).tolist(), 5, 400)
        proposed = 0
        while len(seq.tokens) < 200:
            got = ngram.propose(seq, 4)
            assert got == _lookup_by_scanning(seq.tokens, 4, min_n, max_n), (trial, len(seq.tokens))
            proposed += bool(got)
            seq.tokens += rng.integers(0, 4, int(rng.integers(1, 4))).tolist()
        assert proposed > 20
    ngram.forget("s")
    assert not ngram.indexes


def test_the_scheduler_fits_drafts_into_the_budget_and_the_free_blocks() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=64, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=6), kv)
    a, b = Sequence("a", [1, 2, 3], 3, 40), Sequence("b", [4, 5, 6], 3, 40)
    for s in (a, b):
        sched.add(s)
    out = sched.schedule()
    for c in out.prefill:
        c.seq.num_computed += c.count - 1  # prompts computed but their last token: decode-ready
    a.draft, b.draft = [7, 8, 9], [1, 1, 1, 1, 1]
    out = sched.schedule()
    # Budget 6: a takes 1 + 3, b what is left (1 + 1); both verify.
    assert out.verify == [a, b] and not out.decode and a.draft == [7, 8, 9] and b.draft == [1]
    assert out.num_tokens == 6 and kv.capacity_of("a") >= 3 + 3


def test_a_draft_never_takes_the_block_another_row_needs_for_its_token() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=5 * 4, block_size=4)  # 5 blocks
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv)
    a, b = Sequence("a", [1, 2, 3, 4], 4, 20), Sequence("b", [5, 6, 7, 8], 4, 20)
    for s in (a, b):
        sched.add(s)
    for c in sched.schedule().prefill:  # one block each, full
        c.seq.num_computed += c.count
        c.seq.tokens.append(9)
    a.draft = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    out = sched.schedule()
    # Each next token takes a block (4 used); a's draft then gets what is left, cut to fit: the
    # last block and the rest of its own second one, 7 positions. b keeps its token, and nobody
    # is preempted (a draft of 9 taking 2 more blocks first would have left b none).
    assert not out.preempted and out.decode == [b] and out.verify == [a] and a.draft == [1, 2, 3, 4, 5, 6, 7]


def test_the_speculator_caps_drafts_and_stands_back_after_misses() -> None:
    spec = Speculator(SpeculativeConfig(method="ngram", num_speculative_tokens=4), NgramProposer(1, 2), 4096)
    seq = Sequence("s", [1, 2, 3, 1, 2, 3, 1, 2], 8, 11, num_computed=7)
    spec.propose([seq])
    assert seq.draft == [3, 1], "max_total 11: the verify call's own token plus 2 drafts"
    for _ in range(4):
        spec.record(seq, 2, 0)
    idle = 0
    for _ in range(6):
        spec.propose([seq])
        idle += not seq.draft
    assert idle == 4, "after 4 misses in a row, 2^(4-2) steps without proposals"
    spec.record(seq, 2, 1)
    spec.propose([seq])
    assert seq.draft and spec.stats.draft_tokens == 10 and spec.stats.accepted_tokens == 1


def test_no_drafts_in_a_step_with_disable_by_batch_size_sequences_decoding() -> None:
    """vLLM's speculative_disable_by_batch_size: by default (2) only a sequence decoding alone gets
    a draft; sequences still in their prompt do not count; 0 never disables."""
    def seqs() -> list[Sequence]:
        return [Sequence(name, [1, 2, 3, 1, 2, 3, 1, 2], 8, 40, num_computed=7) for name in "ab"]

    default = Speculator(SpeculativeConfig(method="ngram"), NgramProposer(2, 4), 4096)
    a, b = seqs()
    default.propose([a, b])
    assert a.draft == [] and b.draft == [], "two decoding: no drafts"
    b.num_computed = 3  # b back in its prompt (a chunk left): a decodes alone
    default.propose([a, b])
    assert a.draft == [3, 1, 2] and b.draft == []
    never = Speculator(SpeculativeConfig(method="ngram", disable_by_batch_size=0), NgramProposer(2, 4), 4096)
    a, b = seqs()
    never.propose([a, b])
    assert a.draft == b.draft == [3, 1, 2]
    with pytest.raises(SpeculativeError, match="disable_by_batch_size"):
        Speculator(SpeculativeConfig(method="ngram", disable_by_batch_size=-1), NgramProposer(2, 4), 4096)


def test_the_default_speculates_only_for_a_sequence_decoding_alone(tiny_engine: Path) -> None:
    """Two repetitive requests, the first shorter: while both decode nothing is drafted; once the
    first has finished, the second speculates; greedy tokens as without speculation."""
    prompts = repetitive_prompts(3)
    requests = [GenerationRequest("short", prompts[0], 8, end_ids=()), GenerationRequest("long", prompts[3], 40, end_ids=())]
    outs = []
    for spec in (None, SpeculativeConfig(method="ngram", num_speculative_tokens=3)):
        core = EngineCore(tiny_engine, config(spec))
        mix: list[tuple[int, int]] = []
        schedule = core.scheduler.schedule

        def spy(schedule=schedule, mix=mix):  # type: ignore[no-untyped-def]
            out = schedule()
            mix.append((len(out.decode), len(out.verify)))
            return out

        core.scheduler.schedule = spy  # type: ignore[method-assign]
        try:
            outs.append([o.token_ids for o in run_to_completion(core, requests)])
            drafted = core.stats().get("spec_draft_tokens", 0)
        finally:
            core.stop()
    assert outs[1] == outs[0]
    assert drafted > 0 and any(v for _, v in mix), "the long request, decoding alone, speculates"
    assert all(d == 0 and v == 1 for d, v in mix if v), "no verify row shares a step with another decoding row"


# -- exactness: sampled tokens follow the target's distribution -------------------------------------------------


def chi_square_p(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """P(chi2 >= the statistic) for counts `observed` against `expected_probs` (regularized gamma)."""
    expected = expected_probs * observed.sum()
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def test_verified_tokens_follow_the_target_distribution() -> None:
    """Two positions of logits over a 6-token vocabulary and a 2-token draft, verified 6000 times
    (seeds 0..5999): the first token is distributed as softmax(row 0 / T); the second, given that
    the first was the draft's, as softmax(row 1 / T); the acceptance rate of the first draft token
    is its target probability."""
    rows = np.array([[1.0, 0.2, 2.0, -1.0, 0.5, 0.0], [0.0, 1.5, -0.5, 1.0, 0.3, 2.2], [0.1] * 6], np.float32)
    draft = [2, 5]
    params = SamplingParams(temperature=0.8, seed=None)
    proc = OutputProcessor(None, (), 10_000, CoreStats())

    def probs(row: np.ndarray) -> np.ndarray:
        x = row.astype(np.float64) / params.temperature
        e = np.exp(x - x.max())
        return e / e.sum()

    first, second, accepted_first = np.zeros(6), np.zeros(6), 0
    n = 6000
    for seed in range(n):
        req = GenerationRequest(f"r{seed}", [3, 3], 8, SamplingParams(temperature=0.8, seed=seed), end_ids=())
        state = proc.new_request(req, RequestHandle(req.request_id, lambda _: None))
        accepted, reason = proc.verify(state, rows, draft)
        assert reason is None and len(state.generated) == accepted + 1
        first[state.generated[0]] += 1
        if accepted >= 1:
            accepted_first += 1
            second[state.generated[1]] += 1
    assert chi_square_p(first, probs(rows[0])) > 1e-3
    assert chi_square_p(second, probs(rows[1])) > 1e-3
    p = probs(rows[0])[draft[0]]
    assert abs(accepted_first / n - p) < 4 * np.sqrt(p * (1 - p) / n)


# -- the engine core: greedy output equals decoding without speculation ---------------------------------------


def config(spec: SpeculativeConfig | None, chunk: int = 64, budget: int = 2048) -> CoreConfig:
    return CoreConfig(KVCacheConfig(budget_tokens=budget), SchedulerConfig(4, chunk), speculative=spec or SpeculativeConfig())


def repetitive_prompts(seed: int) -> list[list[int]]:
    """Prompts whose pieces repeat (as code or an edited document does), and one that does not."""
    g = torch.Generator().manual_seed(seed)
    piece = lambda n: torch.randint(3, 600, (n,), generator=g).tolist()  # noqa: E731
    a, b = piece(12), piece(9)
    return [a + b + a + piece(3) + a[:5], b + piece(4) + b + b[:3], piece(30), a + a + a[:7]]


def run(engine: Path, spec: SpeculativeConfig | None, sampling: SamplingParams = SamplingParams(), **kw: int):  # type: ignore[no-untyped-def]
    core = EngineCore(engine, config(spec, **kw))
    verify_mix: list[tuple[int, int]] = []
    schedule = core.scheduler.schedule

    def spy():  # type: ignore[no-untyped-def]
        out = schedule()
        verify_mix.append((len(out.decode), len(out.verify)))
        return out

    core.scheduler.schedule = spy  # type: ignore[method-assign]
    try:
        outs = run_to_completion(core, [GenerationRequest(f"r{i}", p, 40, sampling=sampling, end_ids=())
                                        for i, p in enumerate(repetitive_prompts(3))])
        assert core.kv.all_free()
        return outs, core.stats(), verify_mix
    finally:
        core.stop()


@pytest.mark.parametrize("chunk", [64, 6], ids=["roomy", "tight-budget"])
def test_prompt_lookup_greedy_equals_plain_decoding_and_transformers(tiny_engine: Path, tiny_hf_checkpoint: Path,
                                                                     chunk: int) -> None:
    plain, _, _ = run(tiny_engine, None)
    spec, stats, mix = run(tiny_engine, SpeculativeConfig(method="ngram", num_speculative_tokens=3,
                                                           disable_by_batch_size=0), chunk=chunk)
    for a, b in zip(plain, spec):
        assert b.token_ids == a.token_ids, a.request_id
        np.testing.assert_allclose(b.log_probs, a.log_probs, atol=1e-4)
    assert stats["spec_draft_tokens"] > 0 and 0 < stats["spec_accepted_tokens"] <= stats["spec_draft_tokens"]
    assert any(d and v for d, v in mix), "rows with and without drafts share steps"
    assert sum(o.num_accepted_draft_tokens for o in spec) == stats["spec_accepted_tokens"]
    assert sum(o.num_draft_tokens for o in spec) == stats["spec_draft_tokens"]
    hf = load_hf_oracle(tiny_hf_checkpoint)
    for p, o in zip(repetitive_prompts(3), spec):
        assert o.token_ids == hf_greedy(hf, p, 40)


def test_a_draft_engine_greedy_equals_plain_decoding(tiny_engine: Path, tiny_builds: TinyBuilds) -> None:
    """Drafts from the target itself (every draft token accepted: the bonus-token path) and from a
    1-layer engine with the same tokenizer (few accepted)."""
    plain, _, _ = run(tiny_engine, None)
    small = tiny_builds.engine(tiny_builds.hf_checkpoint(tiny_config(num_layers=1), seed=4))
    for draft, all_accepted in ((tiny_engine, True), (small, False)):
        spec, stats, _ = run(tiny_engine, SpeculativeConfig(method="draft", draft_engine=str(draft), num_speculative_tokens=3,
                                                            disable_by_batch_size=0))
        for a, b in zip(plain, spec):
            assert b.token_ids == a.token_ids, (draft, a.request_id)
        assert stats["spec_draft_tokens"] > 0
        if all_accepted:
            assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"]


def test_sampled_requests_under_speculation_stay_valid_and_seeded(tiny_engine: Path) -> None:
    sampling = SamplingParams(temperature=0.8, top_k=20, seed=7)
    spec_cfg = SpeculativeConfig(method="ngram", num_speculative_tokens=3, disable_by_batch_size=0)
    first, stats, _ = run(tiny_engine, spec_cfg, sampling)
    again, _, _ = run(tiny_engine, spec_cfg, sampling)
    assert [o.token_ids for o in first] == [o.token_ids for o in again], "a seed gives the same tokens"
    assert all(len(o.token_ids) == 40 for o in first) and stats["spec_draft_tokens"] > 0


def test_a_draft_engine_with_another_tokenizer_is_refused(tiny_engine: Path, tiny_builds: TinyBuilds) -> None:
    other = tiny_builds.engine(tiny_builds.hf_checkpoint(tiny_config(vocab_size=700), seed=4))
    with pytest.raises(SpeculativeError, match="draft_engine"):
        EngineCore(tiny_engine, config(SpeculativeConfig(method="draft", draft_engine=str(other))))
    with pytest.raises(SpeculativeError, match="draft_engine"):
        EngineCore(tiny_engine, config(SpeculativeConfig(method="draft")))


def test_a_single_stream_verifies_in_place_and_streams_the_same_tokens(tiny_engine: Path) -> None:
    """One request alone: its verify calls run on its decode row in place (it is gathered from blocks
    no more often than without speculation), and its streamed pieces join to the tokens of plain
    decoding."""
    prompt = repetitive_prompts(3)[3]
    outs, gathers = [], []
    for spec in (None, SpeculativeConfig(method="ngram", num_speculative_tokens=4)):
        core = EngineCore(tiny_engine, config(spec))
        core.start()
        try:
            handle = core.submit(GenerationRequest("s", prompt, 48, end_ids=(), stream=True))
            parts = list(handle)
            outs.append([t for p in parts for t in p.token_ids])
            gathers.append(core.counters.decode_gathers)
            if spec is not None:
                assert core.counters.verify_steps > 0 and len(parts) < 48, "a verify step streams its tokens at once"
                assert gathers[1] <= gathers[0], gathers
                assert parts[-1].num_accepted_draft_tokens > 0
            assert core.kv.all_free()
        finally:
            core.stop()
    assert outs[1] == outs[0]
