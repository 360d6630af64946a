"""n > 1 sequences per request (OpenAI's n, TensorRT-LLM's num_return_sequences): the prompt is
computed once, its KV blocks shared with a copy of the partial last block, each sequence has its
own RNG stream, and everything is freed at the end, through cancellation and crowded batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import hf_greedy, load_hf_oracle

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
from llamaforge.runtime.core.engine import KVSpec
from llamaforge.runtime.core.engine_core import EngineCore, run_to_completion
from llamaforge.runtime.core.kv_cache import KVCacheManager
from llamaforge.runtime.core.requests import GenerationRequest, RequestError
from llamaforge.runtime.core.sampling import SamplingParams


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    spec = KVSpec(num_layers=1, num_kv_heads=1, head_dim=2, dtype=np.dtype(np.float32), max_capacity=256)
    kv = KVCacheManager(spec, budget_tokens=8 * 4, block_size=4)
    kv.grow("p", 10)  # 2 full blocks + 2 positions
    presents = [np.arange(1 * 1 * 12 * 2, dtype=np.float32).reshape(1, 1, 12, 2) + 100 * i for i in range(2)]
    kv.scatter(["p"], [0], [10], presents)
    assert kv.fork("p", "c", 10)
    assert kv.tables["c"][:2] == kv.tables["p"][:2] and kv.tables["c"][2] != kv.tables["p"][2]
    np.testing.assert_array_equal(kv.gather(["c"], 12)[0][0, :, :10], presents[0][0, :, :10])
    assert kv.usage().used_tokens == 4 * 4, "shared blocks count once"
    kv.free("p")
    assert kv.usage().used_tokens == 3 * 4
    kv.free("c")
    assert kv.all_free()
    kv.grow("hog", 8 * 4 - 4)
    kv.grow("p", 2)
    assert not kv.fork("p", "d", 2) and "d" not in kv.tables, "no free block for the copy: nothing forked"


def core_for(engine: Path, max_num_seqs: int = 8, budget: int = 2048, prefix_caching: bool = True) -> EngineCore:
    return EngineCore(engine, CoreConfig(KVCacheConfig(budget_tokens=budget, prefix_caching=prefix_caching),
                                         SchedulerConfig(max_num_seqs, 64)))


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 600, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_greedy_sequences_are_transformers_greedy_and_the_prompt_is_computed_once(
        tiny_engine: Path, tiny_hf_checkpoint: Path) -> None:
    core = core_for(tiny_engine)
    computed: list[int] = []
    run_prefill = core.runner.run_prefill

    def spy(chunks):  # type: ignore[no-untyped-def]
        computed.extend(c.count for c in chunks)
        return run_prefill(chunks)

    core.runner.run_prefill = spy  # type: ignore[method-assign]
    p = prompt(37, 1)  # 2 full blocks and a partial one: the copy on write is exercised
    try:
        outs = run_to_completion(core, [GenerationRequest("g", p, 20, n=4, end_ids=())])
        assert core.kv.all_free()
    finally:
        core.stop()
    assert [o.sequence_index for o in outs] == [0, 1, 2, 3]
    want = hf_greedy(load_hf_oracle(tiny_hf_checkpoint), p, 20)
    assert all(o.token_ids == want for o in outs)
    assert computed == [37], "the prompt is computed once, by sequence 0"
    assert [o.num_cached_tokens for o in outs] == [0, 32, 32, 32]


def test_sampled_sequences_have_their_own_streams_from_the_seed(tiny_engine: Path) -> None:
    core = core_for(tiny_engine)
    p = prompt(21, 2)
    params = SamplingParams(temperature=1.0, seed=5)
    try:
        a = run_to_completion(core, [GenerationRequest("a", p, 16, params, n=3, end_ids=())])
        b = run_to_completion(core, [GenerationRequest("b", p, 16, params, n=3, end_ids=())])
        single = run_to_completion(core, [GenerationRequest("c", p, 16, params, end_ids=())])
        # The same request in a batch with others (sampled and greedy, longer and shorter).
        mixed = run_to_completion(core, [GenerationRequest("x", prompt(9, 7), 24, SamplingParams(temperature=1.0, seed=9),
                                                           n=2, end_ids=()),
                                         GenerationRequest("d", p, 16, params, n=3, end_ids=()),
                                         GenerationRequest("y", prompt(30, 8), 6, end_ids=())])
        assert core.kv.all_free()
    finally:
        core.stop()
    assert [o.token_ids for o in a] == [o.token_ids for o in b], "the same seed, the same n sequences"
    assert len({tuple(o.token_ids) for o in a}) == 3, "each sequence draws from its own stream"
    assert a[0].token_ids == single[0].token_ids, "sequence 0 draws from the seed's stream, as n = 1 does"
    in_batch = sorted((o for o in mixed if o.request_id == "d"), key=lambda o: o.sequence_index)
    assert [o.token_ids for o in in_batch] == [o.token_ids for o in a], "whatever else is in the batch"


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["cache", "no-cache"])
def test_siblings_without_a_free_row_compute_the_prompt_themselves(tiny_engine: Path, tiny_hf_checkpoint: Path,
                                                                   prefix_caching: bool) -> None:
    """max_num_seqs 3 and another request running: one sibling can be forked at once; the other
    waits at the head of the queue and starts from the cached full blocks (or from scratch, with
    prefix caching off)."""
    core = core_for(tiny_engine, max_num_seqs=3, prefix_caching=prefix_caching)
    p, other = prompt(40, 3), prompt(9, 4)
    computed: dict[str, int] = {}
    run_prefill = core.runner.run_prefill

    def spy(chunks):  # type: ignore[no-untyped-def]
        for c in chunks:
            computed[c.seq.seq_id] = computed.get(c.seq.seq_id, 0) + c.count
        return run_prefill(chunks)

    core.runner.run_prefill = spy  # type: ignore[method-assign]
    try:
        outs = run_to_completion(core, [GenerationRequest("busy", other, 30, end_ids=()),
                                        GenerationRequest("n", p, 12, n=3, end_ids=())])
        assert core.kv.all_free()
    finally:
        core.stop()
    hf = load_hf_oracle(tiny_hf_checkpoint)
    assert outs[0].token_ids == hf_greedy(hf, other, 30)
    want = hf_greedy(hf, p, 12)
    assert [o.token_ids for o in outs[1:]] == [want] * 3
    assert computed == {"busy": 9, "n": 40, "n#2": 8 if prefix_caching else 40}, "n#1 was forked; n#2 computed the rest"


def test_cancelling_ends_every_sequence_and_frees_everything(tiny_engine: Path) -> None:
    core = core_for(tiny_engine)
    core.start()
    try:
        handle = core.submit(GenerationRequest("c", prompt(30, 5), 200, n=3, end_ids=(), stream=True))
        first = handle.get(timeout=60)
        assert first.token_ids
        handle.cancel()
        finals = [o for o in handle if o.finished] + ([first] if first.finished else [])
        assert sorted(o.sequence_index for o in finals) == [0, 1, 2]
        assert {o.finish_reason for o in finals} == {"cancelled"}
        core.drain()
        assert core.kv.all_free()
    finally:
        core.stop()


def test_n_beyond_the_running_batch_is_refused_naming_it(tiny_engine: Path) -> None:
    core = core_for(tiny_engine, max_num_seqs=4)
    try:
        with pytest.raises(RequestError, match="^n: must be in \\[1, 4\\]"):
            core.submit(GenerationRequest("x", [5, 6], 4, n=5))
        with pytest.raises(RequestError, match="^n: "):
            core.submit(GenerationRequest("y", [5, 6], 4, n=0))
    finally:
        core.stop()
