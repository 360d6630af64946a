"""The scheduler -> model runner seam, without ONNX Runtime: the real Scheduler and KVCacheManager
drive the ModelRunner against a stub engine, and the scheduler's output alone decides how the
decode batch treats its rows (condensed in flight; a static batch keeps its finished rows and the
next batch starts at row 0)."""

from __future__ import annotations

import numpy as np
import pytest

from llamaforge.runtime.core.config import SchedulerConfig
from llamaforge.runtime.core.engine import KVSpec
from llamaforge.runtime.core.kv_cache import KVCacheManager
from llamaforge.runtime.core.model_runner import ModelRunner
from llamaforge.runtime.core.scheduler import Scheduler, Sequence
from llamaforge.runtime.core.stats import CoreStats

SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=2, dtype=np.dtype(np.float32), max_capacity=128)
VOCAB = 32


class StubEngine:
    """Every token of sequence i is the id 10 + i, and its KV at each position is that id, so each
    call can check that every live row holds its own sequence's cache. A call writes the input
    token into the cache at its position, and the logits pick the row's last input token."""

    def __init__(self, decode_in_place: bool) -> None:
        self.kv = SPEC
        self.decode_in_place = decode_in_place
        self.in_place_caches: list[list[np.ndarray]] = []  # each in-place call's cache arrays

    def _check_rows(self, input_ids: np.ndarray, past_lengths: np.ndarray, past: list[np.ndarray]) -> None:
        for row, length in enumerate(past_lengths):
            if input_ids[row, 0]:  # a live row (a dead one is fed token 0 past length 0)
                np.testing.assert_array_equal(past[0][row, :, :length], float(input_ids[row, 0]))

    def _write(self, input_ids: np.ndarray, past_lengths: np.ndarray, caches: list[np.ndarray]) -> None:
        for row, start in enumerate(past_lengths):
            for j, token in enumerate(input_ids[row]):
                if token:
                    for cache in caches:
                        cache[row, :, start + j] = float(token)

    def _logits(self, input_ids: np.ndarray, last: np.ndarray | None) -> np.ndarray:
        logits = np.zeros((len(input_ids), 1, VOCAB), np.float32)
        for row in range(len(input_ids)):
            logits[row, 0, input_ids[row, 0 if last is None else last[row, 0]]] = 1.0
        return logits

    def step(self, input_ids: np.ndarray, past_lengths: np.ndarray, past: list[np.ndarray],
             last: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        self._check_rows(input_ids, past_lengths, past)
        present = [a.copy() for a in past]
        self._write(input_ids, past_lengths, present)
        return self._logits(input_ids, last), present

    def decode_in_place_step(self, input_ids: np.ndarray, past_lengths: np.ndarray,
                             caches: list[np.ndarray]) -> np.ndarray:
        self._check_rows(input_ids, past_lengths, caches)
        self._write(input_ids, past_lengths, caches)
        self.in_place_caches.append(caches)
        return self._logits(input_ids, None)


def run(policy: str, max_tokens: list[int], condense: bool | None = None, in_place: bool = True
        ) -> list[list[str | None]]:
    """All requests arrive at once (3 run at a time); returns the decode batch's rows after each
    decode call."""
    kv = KVCacheManager(SPEC, budget_tokens=1024, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=64, policy=policy), kv)
    runner = ModelRunner(StubEngine(in_place), kv, CoreStats(), max_num_seqs=3, prefill_padding_tokens=8,  # type: ignore[arg-type]
                         condense_decode_rows=condense)
    left: dict[str, int] = {}
    for i, n in enumerate(max_tokens):
        prompt = [10 + i] * (5 + 3 * i)
        scheduler.add(Sequence(f"s{i}", prompt, len(prompt), len(prompt) + n))
        left[f"s{i}"] = n
    rows: list[list[str | None]] = []
    while scheduler.has_work():
        out = scheduler.schedule()
        for sampled in runner.execute(out):
            for seq, logits in sampled:
                token = int(np.argmax(logits))
                assert token == 10 + int(seq.seq_id[1:]), "a sequence got another row's logits"
                left[seq.seq_id] -= 1
                if left[seq.seq_id]:
                    seq.tokens.append(token)
                else:
                    scheduler.finish(seq)
        if out.decode:
            assert runner.decode_batch is not None
            rows.append(list(runner.decode_batch.rows))
    assert kv.all_free()
    return rows


def test_decode_steps_on_unchanged_rows_pass_the_same_cache_arrays() -> None:
    """The engine keeps its in-place binding only while the very same array objects come back, so a
    decode batch whose rows and capacity do not change must hand over the same views each step, and
    new ones when they change."""
    kv = KVCacheManager(SPEC, budget_tokens=1024, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64), kv)
    engine = StubEngine(True)
    runner = ModelRunner(engine, kv, CoreStats(), max_num_seqs=2, prefill_padding_tokens=8,  # type: ignore[arg-type]
                         condense_decode_rows=None)
    scheduler.add(Sequence("s0", [10] * 5, 5, 5 + 80))  # crosses the first capacity (64 positions)
    calls: list[tuple[int, int]] = []  # (rows, capacity) of each decode call
    while scheduler.has_work():
        out = scheduler.schedule()
        for sampled in runner.execute(out):
            for seq, _ in sampled:
                seq.tokens.append(seq.tokens[0])  # the stub engine: every token of a sequence is its id
                if len(seq.tokens) == seq.max_total:
                    scheduler.finish(seq)
        if out.decode:
            assert runner.decode_batch is not None
            calls.append((len(runner.decode_batch.rows), runner.decode_batch.capacity))
        if len(calls) == 20:
            scheduler.add(Sequence("s1", [11] * 3, 3, 3 + 4))  # a second row joins, then leaves
    caches = engine.in_place_caches
    assert len(set(calls)) >= 3, calls  # the row count and the capacity both changed
    for i in range(1, len(calls)):
        same = all(a is b for a, b in zip(caches[i - 1], caches[i]))
        assert same == (calls[i] == calls[i - 1]), (i, calls[i - 1], calls[i])


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "copying"])
def test_in_flight_rows_are_condensed_and_refilled(in_place: bool) -> None:
    rows = run("inflight", [2, 6, 4, 3], in_place=in_place)
    assert all(None not in r for r in rows), rows  # every decode call computes live rows only
    assert rows[0] == ["s0", "s1", "s2"]
    assert ["s2", "s1"] in rows, rows  # s0 finished first: the last row moved into its place
    assert any("s3" in r for r in rows) and rows[-1] == ["s1"], rows


def test_static_batch_keeps_finished_rows_and_the_next_batch_starts_at_row_0() -> None:
    rows = run("static", [2, 6, 4, 3])
    first = [r for r in rows if "s3" not in r]
    assert first[0] == ["s0", "s1", "s2"] and first[-1] == [None, "s1", None], first
    assert all(len(r) == 3 for r in first)
    assert rows[len(first):] == [["s3"]] * 2, rows  # s3 alone, from row 0, not in the old batch's rows


def test_in_flight_without_condensing_refills_dead_rows_in_place() -> None:
    rows = run("inflight", [2, 6, 4, 3], condense=False)
    assert ["s3", "s1", "s2"] in rows, rows  # s3 took s0's dead row
    assert rows[-1] == [None, "s1", None], rows
