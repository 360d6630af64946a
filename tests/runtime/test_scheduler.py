"""Scheduler and KV-cache manager policies, without an engine."""

from __future__ import annotations

import numpy as np
import pytest

from llamaforge.runtime.core.engine import KVSpec
from llamaforge.runtime.core.kv_cache import KVCacheFull, KVCacheManager
from llamaforge.runtime.core.scheduler import Scheduler, SchedulerConfig, Sequence

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, dtype=np.dtype(np.float32), max_capacity=4096)


def seq(name: str, prompt: int, max_tokens: int = 8) -> Sequence:
    return Sequence(name, list(range(1, prompt + 1)), prompt, prompt + max_tokens)


def run_prefills(out) -> None:  # type: ignore[no-untyped-def]
    """Pretend the engine ran: chunks computed; a completed prompt samples one token."""
    for chunk in out.prefill:
        chunk.seq.num_computed += chunk.count
        if chunk.completes_prompt:
            chunk.seq.tokens.append(7)


def run_decodes(out) -> None:  # type: ignore[no-untyped-def]
    for s in out.decode:
        s.num_computed += 1
        s.tokens.append(7)


def test_kv_gather_scatter_round_trip() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=64, block_size=4)
    kv.grow("a", 6)
    kv.grow("b", 3)
    rng = np.random.default_rng(0)
    presents = [rng.standard_normal((2, 2, 8, 4)).astype(np.float32) for _ in range(4)]
    kv.scatter(["a", "b"], [0, 0], [6, 3], presents)
    got = kv.gather(["b", "a"], 8)
    np.testing.assert_array_equal(got[0][1, :, :6], presents[0][0, :, :6])
    np.testing.assert_array_equal(got[3][0, :, :3], presents[3][1, :, :3])
    assert not got[0][0, :, 4:].any(), "positions past a table are the zero block"
    with pytest.raises(KVCacheFull):
        kv.scatter(["b"], [3], [2], presents)  # b holds one block = 4 positions
    kv.free("a")
    kv.free("b")
    assert kv.all_free()


def test_a_single_decode_token_lands_where_the_batched_scatter_puts_it() -> None:
    """The one-sequence, one-token scatter (a single stream's decode step, plain indexing) writes
    the same block slots as the fancy-indexed copy of several sequences, and refuses past the table."""
    rng = np.random.default_rng(1)
    presents = [rng.standard_normal((3, 2, 8, 4)).astype(np.float32) for _ in range(4)]
    one, many = (KVCacheManager(SPEC, budget_tokens=64, block_size=4) for _ in range(2))
    for kv in (one, many):
        kv.grow("a", 7)
        kv.grow("b", 2)
    for pos in range(7):  # across a block boundary, from row 2 of the presents
        one.scatter(["a"], [pos], [1], presents, rows=[2])
    many.scatter(["a", "b"], [0, 0], [7, 2], presents, rows=[2, 0])
    for got, want in zip(one.gather(["a"], 8), many.gather(["a"], 8)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(KVCacheFull):
        one.scatter(["b"], [4], [1], presents)  # b holds one block = 4 positions


def test_chunked_prefill_respects_token_budget_and_decodes_first() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=1024, block_size=16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32), kv)
    sched.add(seq("long", 100))
    out = sched.schedule()
    assert [(c.seq.seq_id, c.start, c.count) for c in out.prefill] == [("long", 0, 32)]
    run_prefills(out)
    sched.add(seq("short", 5))
    out = sched.schedule()  # the long prompt continues; the newcomer joins in the same step
    assert [(c.seq.seq_id, c.start, c.count) for c in out.prefill] == [("long", 32, 32)]
    run_prefills(out)
    out = sched.schedule()
    assert [(c.seq.seq_id, c.count) for c in out.prefill] == [("long", 32)]
    run_prefills(out)
    out = sched.schedule()
    assert [(c.seq.seq_id, c.start, c.count) for c in out.prefill] == [("long", 96, 4), ("short", 0, 5)]
    run_prefills(out)
    out = sched.schedule()
    assert {s.seq_id for s in out.decode} == {"long", "short"} and not out.prefill
    assert out.num_tokens <= 32


def test_admission_is_fcfs_and_bounded_by_max_num_seqs() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=4096, block_size=16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=1000), kv)
    for i in range(4):
        sched.add(seq(f"s{i}", 10))
    out = sched.schedule()
    assert [c.seq.seq_id for c in out.prefill] == ["s0", "s1"]
    run_prefills(out)
    sched.finish(sched.running[0])
    out = sched.schedule()
    assert [c.seq.seq_id for c in out.prefill] == ["s2"] and [s.seq_id for s in out.decode] == ["s1"]


def test_strict_fcfs_head_blocks_queue() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=64, block_size=16)  # 4 blocks
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1000), kv)
    sched.add(seq("a", 40))  # 3 blocks
    run_prefills(sched.schedule())
    sched.add(seq("big", 40))
    sched.add(seq("small", 4))
    out = sched.schedule()
    # "big" gets the one free block's worth of prompt; "small" must not jump ahead of it.
    assert [c.seq.seq_id for c in out.prefill] == ["big"] and out.prefill[0].count == 16


def test_preemption_by_recompute_instead_of_failure() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=64, block_size=16)  # 4 blocks
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1000), kv)
    old, new = seq("old", 31, max_tokens=30), seq("new", 31, max_tokens=30)
    sched.add(old)
    sched.add(new)
    run_prefills(sched.schedule())  # each: 31 prompt tokens + 1 sampled = 32 -> 2 blocks; all 4 used
    out = sched.schedule()
    assert {s.seq_id for s in out.decode} == {"old", "new"} and not out.preempted  # token 32 fits
    run_decodes(out)
    out = sched.schedule()  # both need a 3rd block for token 33: the newest is preempted
    assert [s.seq_id for s in out.preempted] == ["new"]
    assert [s.seq_id for s in out.decode] == ["old"]
    assert new.num_computed == 0 and sched.waiting[0] is new and len(new.tokens) == 33
    for _ in range(60):
        run_decodes(out)
        run_prefills(out)
        if old in sched.running and len(old.tokens) >= old.max_total:
            sched.finish(old)
        out = sched.schedule()
        if old not in sched.running and new in sched.running:
            break
    # "old" runs to completion (it may preempt "new" again as it grows); then "new" is readmitted
    # and recomputes its prompt and generated tokens together.
    assert len(old.tokens) == old.max_total and new in sched.running
    assert [(c.seq.seq_id, c.start) for c in out.prefill] == [("new", 0)]
    sched.finish(new)
    assert kv.all_free()


def test_remove_frees_blocks_wherever_the_sequence_is() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=256, block_size=16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=1000), kv)
    sched.add(seq("run", 20))
    sched.add(seq("wait", 20))
    run_prefills(sched.schedule())
    assert sched.remove("run") is not None and sched.remove("wait") is not None
    assert sched.remove("nope") is None
    assert kv.all_free() and not sched.has_work()


def test_static_policy_drains_the_batch_before_admitting() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=4096, block_size=16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1000, policy="static"), kv)
    sched.add(seq("a", 10))
    sched.add(seq("b", 10))
    out = sched.schedule()
    assert [c.seq.seq_id for c in out.prefill] == ["a", "b"]
    run_prefills(out)
    sched.add(seq("late", 5))
    out = sched.schedule()
    assert not out.prefill and {s.seq_id for s in out.decode} == {"a", "b"}, "static: late waits"
    sched.finish(sched.running[0])
    assert not sched.schedule().prefill, "still waits while one of the batch runs"
    sched.finish(sched.running[0])
    assert [c.seq.seq_id for c in sched.schedule().prefill] == ["late"]


def test_static_batch_takes_max_num_seqs_and_prefills_over_several_steps() -> None:
    kv = KVCacheManager(SPEC, budget_tokens=4096, block_size=16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=40, policy="static"), kv)
    for i in range(5):
        sched.add(seq(f"s{i}", 30))
    admitted: list[str] = []
    for _ in range(4):
        out = sched.schedule()
        admitted += [c.seq.seq_id for c in out.prefill if c.start == 0]
        run_prefills(out)
        run_decodes(out)
    assert admitted == ["s0", "s1", "s2"], "the batch is the first max_num_seqs requests, whatever the token budget"
    for s in list(sched.running):
        sched.finish(s)
    assert [c.seq.seq_id for c in sched.schedule().prefill] == ["s3", "s4"], "then the next batch"


def test_the_output_numbers_static_batches_and_is_none_in_flight() -> None:
    """The model runner keeps a static batch's rows by this number alone (test_model_runner.py)."""
    kv = KVCacheManager(SPEC, budget_tokens=4096, block_size=16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=1000, policy="static"), kv)
    for i in range(3):
        sched.add(seq(f"s{i}", 10))
    out = sched.schedule()
    assert out.static_batch == 1 and [c.seq.seq_id for c in out.prefill] == ["s0", "s1"]
    run_prefills(out)
    out = sched.schedule()
    assert out.static_batch == 1 and [s.seq_id for s in out.decode] == ["s0", "s1"]
    run_decodes(out)
    sched.finish(sched.running[0])
    assert sched.schedule().static_batch == 1, "one of the batch still runs: same batch"
    sched.finish(sched.running[0])
    out = sched.schedule()
    assert out.static_batch == 2 and [c.seq.seq_id for c in out.prefill] == ["s2"]

    inflight = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=1000), KVCacheManager(SPEC, 4096, 16))
    inflight.add(seq("a", 10))
    assert inflight.schedule().static_batch is None
