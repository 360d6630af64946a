"""Automatic prefix caching: the KV manager's block sharing, and the engine core's outputs with the
cache on equal to those with it off, through chunked prefill, preemption, cancellation, eviction
pressure and the static batch's decode-row layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import hf_greedy, load_hf_oracle

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
from llamaforge.runtime.core.engine import KVSpec
from llamaforge.runtime.core.engine_core import EngineCore, run_to_completion
from llamaforge.runtime.core.kv_cache import KVCacheManager
from llamaforge.runtime.core.requests import GenerationOutput, GenerationRequest
from llamaforge.runtime.core.sampling import SamplingParams
from llamaforge.runtime.core.scheduler import Scheduler, Sequence

SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=2, dtype=np.dtype(np.float32), max_capacity=4096)


# -- the KV manager -------------------------------------------------------------------------------------------


def computed(kv: KVCacheManager, seq_id: str, tokens: list[int]) -> None:
    """`seq_id` holds and has computed every position of `tokens` (its prefill ran)."""
    kv.grow(seq_id, len(tokens))
    kv.commit(seq_id, tokens, len(tokens))


def test_full_blocks_are_shared_along_the_hash_chain_short_of_the_last_token() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=64, block_size=4)
    a = list(range(10, 20))  # 2 full blocks + 2 tokens
    computed(kv, "a", a)
    # Same first 8 tokens: both full blocks are shared, and the lookup never covers the last token.
    assert kv.lookup("b", a[:8] + [99, 98]) == 8
    assert kv.tables["b"] == kv.tables["a"][:2]
    assert kv.lookup("c", a[:8]) == 4, "the last prompt token must be computed: its block is not taken"
    assert kv.lookup("d", a[:4] + [0] + a[5:10]) == 4, "a different second block ends the chain"
    assert kv.lookup("e", [0] + a[1:]) == 0
    assert kv.lookup("f", a, salt=b"tenant-2") == 0, "a salt keys the blocks apart"
    # Shared blocks count once in the usage, and stay held until their last holder frees them.
    assert kv.usage().used_tokens == 3 * 4
    kv.free("a")
    assert kv.usage().used_tokens == 2 * 4 and kv.usage().cached_tokens == 0
    for s in ("b", "c", "d"):
        kv.free(s)
    assert kv.all_free() and kv.usage().cached_tokens == 2 * 4, "full blocks stay cached when nobody holds them"
    assert kv.lookup("g", a) == 8
    kv.free("g")


def test_lookup_counts_only_what_admission_records_and_off_finds_nothing() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=64, block_size=4, prefix_caching=False)
    computed(kv, "a", list(range(12)))
    assert kv.lookup("b", list(range(12))) == 0 and kv.usage().cached_tokens == 0
    kv.free("a")
    assert kv.all_free() and kv.usage().cached_tokens == 0


def test_eviction_takes_uncached_blocks_first_then_the_least_recently_freed_tail_first() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=6 * 4, block_size=4)  # 6 blocks
    a, b = list(range(100, 110)), list(range(200, 208))  # a: 3 blocks (2 full), b: 2 full blocks
    computed(kv, "a", a)
    computed(kv, "b", b)
    kv.free("a")
    kv.free("b")
    assert kv.usage().cached_tokens == 4 * 4
    kv.grow("x", 4)  # takes a block with no cached content (a's partial block or a never used one)
    assert kv.lookup("y", a) == 8 and kv.lookup("z", b + [1]) == 8
    for s in ("x", "y", "z"):
        kv.free(s)
    # Freed in the order x, y (a's blocks), z (b's): 2 uncached blocks are taken before any cached
    # one; then a's tail block, then a's head.
    kv.grow("w", 3 * 4)
    assert kv.lookup("v", a) == 4, "a's second block was evicted before its first"
    kv.free("v")
    kv.grow("w", 4 * 4)
    assert kv.lookup("u", a) == 4, "a's head, freed last (by v), is still cached"
    assert kv.lookup("t", b + [1]) == 4, "b's tail block was evicted before its head"


def test_the_scheduler_skips_cached_blocks_and_charges_the_budget_for_the_rest_only() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=256, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv)
    system = list(range(1, 21))  # 5 blocks

    first = Sequence("a", system + [30, 31], 22, 40)
    sched.add(first)
    out = sched.schedule()
    (chunk,) = out.prefill
    chunk.seq.num_computed += chunk.count
    kv.commit("a", first.tokens, first.num_computed)
    first.tokens.append(7)

    second = Sequence("b", system + [40, 41, 42], 23, 40)
    sched.add(second)
    out = sched.schedule()
    (chunk,) = out.prefill
    assert (chunk.start, chunk.count) == (20, 3) and second.num_cached_tokens == 20
    assert kv.prefix_stats.queries_tokens == 22 + 23 and kv.prefix_stats.hit_tokens == 20
    assert kv.tables["b"][:5] == kv.tables["a"][:5]

    # A sequence that must compute every prompt position (context logits) never starts from the cache.
    third = Sequence("c", system + [50], 21, 40, reuse_prefix=False)
    sched.add(third)
    chunk = next(c for c in sched.schedule().prefill if c.seq is third)
    assert (chunk.start, chunk.count) == (0, 21)


def test_a_sequence_that_cannot_be_admitted_holds_no_cached_blocks() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=8 * 4, block_size=4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64), kv)
    prefix = list(range(1, 13))
    computed(kv, "old", prefix + [1])
    kv.free("old")
    kv.grow("hog", 5 * 4)  # 3 blocks left: exactly the cached ones
    sched.add(Sequence("n", prefix + list(range(50, 70)), 32, 40))
    # The 3 cached blocks would be shared, but the remaining 20 tokens need 5 more blocks: none.
    assert sched.schedule().empty
    assert "n" not in kv.tables and kv.usage().used_tokens == 5 * 4 and kv.usage().cached_tokens == 3 * 4


# -- the engine core: cache on == cache off ---------------------------------------------------------------------


def config(prefix_caching: bool, budget: int = 1024, chunk: int = 64, policy: str = "inflight") -> CoreConfig:
    return CoreConfig(KVCacheConfig(budget_tokens=budget, prefix_caching=prefix_caching),
                      SchedulerConfig(4, chunk, policy))


def conversation_waves(seed: int) -> list[list[list[int]]]:
    """Three waves of prompts: every prompt shares a 37-token system prompt; the second and third
    waves re-send whole earlier prompts (a conversation's history) with a new turn appended, which
    `chat_turns` completes with the earlier outputs."""
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, 600, (37,), generator=g).tolist()
    return [[system + torch.randint(3, 600, (n,), generator=g).tolist() for n in lengths]
            for lengths in ((5, 19, 40, 11), (7, 3, 22, 9), (13, 6, 2, 30))]


def chat_turns(core: EngineCore, sampling: SamplingParams, seed: int,
               between: Callable[[EngineCore], None] | None = None) -> list[GenerationOutput]:
    """Run the waves in order; a prompt of wave w > 0 is the same row's prompt + output of wave w - 1,
    then its own new tokens."""
    outs: list[GenerationOutput] = []
    history: list[list[int]] = [[] for _ in range(4)]
    for w, wave in enumerate(conversation_waves(seed)):
        reqs = []
        for i, turn in enumerate(wave):
            prompt = history[i] + turn[37:] if w else turn
            reqs.append(GenerationRequest(f"w{w}r{i}", prompt, 12, sampling=sampling, end_ids=()))
        got = run_to_completion(core, reqs)
        for i, (r, o) in enumerate(zip(reqs, got)):
            history[i] = r.prompt_ids + o.token_ids
        outs += got
        if between is not None:
            between(core)
    return outs


SCENARIOS = {
    "roomy": dict(),
    "chunked": dict(chunk=16),
    "preempting": dict(budget=160),
    "static": dict(policy="static"),
}
SAMPLINGS = {"greedy": SamplingParams(), "seeded": SamplingParams(temperature=0.9, top_p=0.95, seed=11)}


def run_both(engine: Path, sampling: SamplingParams, seed: int, **kw: object) -> tuple[list[GenerationOutput], list[GenerationOutput], EngineCore]:
    runs = []
    for on in (False, True):
        core = EngineCore(engine, config(on, **kw))  # type: ignore[arg-type]
        try:
            runs.append((chat_turns(core, sampling, seed), core))
            assert core.kv.all_free(), "no block may stay held by a sequence"
        finally:
            core.stop()
    (off, _), (on, core_on) = runs
    return off, on, core_on


@pytest.mark.parametrize("sampling", SAMPLINGS.values(), ids=SAMPLINGS.keys())
@pytest.mark.parametrize("scenario", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_outputs_with_the_cache_equal_outputs_without(tiny_engine: Path, scenario: dict, sampling: SamplingParams) -> None:
    off, on, core = run_both(tiny_engine, sampling, seed=3, **scenario)
    for a, b in zip(off, on):
        assert b.token_ids == a.token_ids, a.request_id
        np.testing.assert_allclose(b.log_probs, a.log_probs, atol=1e-4, err_msg=a.request_id)
    stats = core.stats()
    assert stats["prefix_cache_hit_tokens"] > 0 and stats["kv_cached_free_tokens"] > 0
    assert stats["prefix_cache_queries_tokens"] >= sum(o.num_input_tokens for o in on)
    assert any(o.num_cached_tokens >= 32 and o.kv_reused_blocks == o.num_cached_tokens // 16 for o in on)
    assert all(o.num_cached_tokens == 0 for o in off)


def test_greedy_with_cache_hits_is_transformers_greedy(tiny_engine: Path, tiny_hf_checkpoint: Path) -> None:
    core = EngineCore(tiny_engine, config(True, chunk=16))
    try:
        outs = chat_turns(core, SamplingParams(), seed=5)
    finally:
        core.stop()
    hf = load_hf_oracle(tiny_hf_checkpoint)
    assert sum(1 for o in outs if o.num_cached_tokens) >= 8
    # The prompts are rebuilt from the waves to ask transformers.
    history: list[list[int]] = [[] for _ in range(4)]
    for w, wave in enumerate(conversation_waves(5)):
        for i, turn in enumerate(wave):
            prompt = history[i] + turn[37:] if w else turn
            out = outs[4 * w + i]
            assert out.token_ids == hf_greedy(hf, prompt, 12), out.request_id
            history[i] = prompt + out.token_ids


def test_eviction_pressure_and_cancellation_keep_outputs_equal(tiny_engine: Path) -> None:
    """A budget that holds about one long conversation (9 blocks), so cached blocks are evicted all the time; and a
    wave of long requests cancelled mid-decode between the waves (their blocks, some shared, freed)."""
    def cancel_a_wave(core: EngineCore) -> None:
        g = torch.Generator().manual_seed(9)
        handles = [core.submit(GenerationRequest(f"x{i}", conversation_waves(3)[0][i] + torch.randint(3, 600, (20,), generator=g).tolist(),
                                                 40, end_ids=(), stream=True)) for i in range(3)]
        core.start()
        for h in handles:
            h.get(timeout=60)  # its first token: prefilled and decoding
            h.cancel()
        for h in handles:
            assert list(h)[-1].finish_reason == "cancelled"
        core.drain()

    runs = []
    for on in (False, True):
        core = EngineCore(tiny_engine, config(on, budget=144, chunk=32))
        try:
            runs.append(chat_turns(core, SamplingParams(temperature=0.7, seed=2), seed=3, between=cancel_a_wave))
            assert core.kv.all_free()
            stats = core.stats()
        finally:
            core.stop()
    off, on = runs
    for a, b in zip(off, on):
        assert b.token_ids == a.token_ids, a.request_id
    assert stats["prefix_cache_hit_tokens"] > 0


def test_a_running_sequence_shares_its_computed_blocks_with_a_newcomer(tiny_engine: Path) -> None:
    core = EngineCore(tiny_engine, config(True))
    prompt = conversation_waves(4)[0][2]  # 77 tokens: 4 full blocks
    try:
        first = core.submit(GenerationRequest("first", prompt, 60, end_ids=(), stream=True))
        core.start()
        first.get(timeout=60)  # prefilled; now decoding
        second = run_to_completion(core, [GenerationRequest("second", prompt[:70] + [5, 6], 4, end_ids=())])[0]
        assert not first.done.is_set(), "the first must still be running for the blocks to be shared"
        assert second.num_cached_tokens == 64 and second.kv_reused_blocks == 4
        first.cancel()
        core.drain()
        assert core.kv.all_free()
    finally:
        core.stop()


def test_a_request_that_returns_context_logits_computes_its_whole_prompt(tiny_engine: Path) -> None:
    core = EngineCore(tiny_engine, config(True))
    prompt = conversation_waves(6)[0][1]
    try:
        plain, = run_to_completion(core, [GenerationRequest("a", prompt, 2, end_ids=())])
        kept, = run_to_completion(core, [GenerationRequest("b", prompt, 2, end_ids=(), return_context_logits=True)])
        again, = run_to_completion(core, [GenerationRequest("c", prompt, 2, end_ids=())])
    finally:
        core.stop()
    assert kept.num_cached_tokens == 0 and kept.context_logits is not None and len(kept.context_logits) == len(prompt)
    assert again.num_cached_tokens == 48 and again.token_ids == plain.token_ids == kept.token_ids
