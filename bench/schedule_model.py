"""A cost model of serving schedules, for `make bench-serve`'s bounds: how long its workload would
take on this machine if the host work between engine calls and the serving stack cost nothing.

Step costs are measured on a loaded `runtime.engine.Engine` (in process, the fastest of several
calls): prefill calls as a line in their tokens, and a decode step for every row count up to
`max_num_seqs`, once with every row live at the workload's token-weighted mean context and once
with every row at past length 0 (a static batch's finished rows). Two uses:

* `perfect_seconds`: every prompt prefilled once and every later token decoded in full batches; no
  scheduler can do better, none can do as well (it ignores the run's start and tail, where no
  schedule can fill a batch);
* `replay_seconds`: the real `runtime.scheduler.Scheduler` and `KVCacheManager` run the workload on
  a virtual clock that advances by the modelled cost of each step's engine calls: what our policy
  itself reaches, first come first served, before any serving cost. The gap between that and a
  measured run is the serving stack's cost (and the machine's drift); the modelled in-flight /
  static ratio is the most an FCFS in-flight scheduler gets on this workload and machine.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from timing import call_times


def decode_call(engine: Any, ids: np.ndarray, lengths: np.ndarray, caches: list[np.ndarray]) -> Callable[[], object]:
    """One decode step as the engine core runs it: the cache updated in place where the engine can."""
    if engine.decode_in_place:
        return lambda: engine.decode_in_place_step(ids, lengths, caches)
    return lambda: engine.step(ids, lengths, caches)


def mean_context(reqs: Sequence[Any]) -> float:
    """The context a generated token attends to, averaged over every generated token."""
    tokens = sum(r.max_tokens for r in reqs)
    return sum(len(r.ids) * r.max_tokens + r.max_tokens * (r.max_tokens - 1) / 2 for r in reqs) / tokens


@dataclass(frozen=True)
class StepCosts:
    prefill_fixed_s: float
    prefill_per_token_s: float
    decode_live_s: tuple[float, ...]  # [rows - 1]: every row live at the mean context
    decode_dead_s: tuple[float, ...]  # [rows - 1]: every row at past length 0

    def prefill(self, tokens: int) -> float:
        return self.prefill_fixed_s + self.prefill_per_token_s * tokens

    def decode(self, rows: int, live: int) -> float:
        """A decode call of `rows` rows of which `live` are live: a finished row still costs its
        matmuls but skips attention, so the cost is interpolated between the two measurements."""
        dead, full = self.decode_dead_s[rows - 1], self.decode_live_s[rows - 1]
        return dead + (full - dead) * live / rows


def measure_step_costs(engine: Any, reqs: Sequence[Any], max_rows: int, repeat: int = 5) -> StepCosts:
    def best_s(fn: Callable[[], object]) -> float:  # a schedule's bound gets every call at its fastest
        return min(call_times(fn, repeat))

    widths = (64, 128, 256)
    costs = [best_s(lambda w=w: engine.step(np.ones((1, w), np.int64), np.zeros(1, np.int32),  # type: ignore[misc]
                                             engine.kv.empty(1, w), np.array([[w - 1]]))) for w in widths]
    slope, intercept = np.polyfit(widths, costs, 1)
    context = int(mean_context(reqs))
    caches = engine.kv.empty(max_rows, -(-(context + 1) // 64) * 64)
    live, dead = [], []
    for rows in range(1, max_rows + 1):
        view, ids = [c[:rows] for c in caches], np.ones((rows, 1), np.int64)
        live.append(best_s(decode_call(engine, ids, np.full(rows, context, np.int32), view)))
        dead.append(best_s(decode_call(engine, ids, np.zeros(rows, np.int32), view)))
    return StepCosts(float(intercept), float(slope), tuple(live), tuple(dead))


def perfect_seconds(costs: StepCosts, reqs: Sequence[Any], rows: int) -> float:
    decoded = sum(r.max_tokens - 1 for r in reqs)  # a request's first token comes from its prefill call
    return sum(costs.prefill(len(r.ids)) for r in reqs) + -(-decoded // rows) * costs.decode(rows, rows)


def replay_seconds(costs: StepCosts, reqs: Sequence[Any], max_num_seqs: int, policy: str,
                   max_num_batched_tokens: int = 512, prefill_padding_tokens: int = 8) -> float:
    """Seconds from the first arrival to the last generated token when `runtime.scheduler` runs the
    workload (`policy` "inflight", or "static" with finished rows kept until the batch drains) and
    each step takes the modelled time of the engine calls the core's `ModelRunner` makes for it:
    one decode call (a static batch's finished rows included, as `SchedulerOutput.static_batch`
    tells it), prefill calls grouped as its `padding_groups` groups them."""
    from llamaforge.runtime.core.engine import KVSpec
    from llamaforge.runtime.core.kv_cache import KVCacheManager
    from llamaforge.runtime.core.model_runner import padding_groups
    from llamaforge.runtime.core.scheduler import Scheduler, SchedulerConfig
    from llamaforge.runtime.core.scheduler import Sequence as Seq

    # Blocks are only counted here: a one-float-per-token spec keeps the pools tiny.
    kv = KVCacheManager(KVSpec(1, 1, 1, np.dtype(np.float32), 1 << 20), max_num_seqs * 1024)  # as the server runs'
    scheduler = Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens, policy), kv)
    arrivals = deque(sorted(reqs, key=lambda r: r.arrival))
    to_generate: dict[str, int] = {}
    clock = last_token = arrivals[0].arrival
    start, batch = clock, None
    batch_rows: set[str] = set()  # the current static batch's sequences that have reached decode

    def sampled(seq: Seq) -> None:
        seq.tokens.append(0)
        to_generate[seq.seq_id] -= 1
        if to_generate[seq.seq_id] == 0:
            scheduler.finish(seq)

    while arrivals or scheduler.has_work():
        while arrivals and arrivals[0].arrival <= clock:
            r = arrivals.popleft()
            scheduler.add(Seq(str(r.idx), list(r.ids), len(r.ids), len(r.ids) + r.max_tokens))
            to_generate[str(r.idx)] = r.max_tokens
        if not scheduler.has_work():
            clock = arrivals[0].arrival
            continue
        out = scheduler.schedule()
        if out.preempted:
            raise RuntimeError("the modelled run preempted a sequence, whose recompute this model does not cost")
        if out.static_batch != batch:  # a static batch's rows stay in its decode calls
            batch, batch_rows = out.static_batch, set()
        if out.decode:
            batch_rows |= {s.seq_id for s in out.decode}
            rows = len(batch_rows) if out.static_batch is not None else len(out.decode)
            clock += costs.decode(rows, len(out.decode))
        for group in padding_groups([c for c in out.prefill if c.start == 0], prefill_padding_tokens):
            clock += costs.prefill(len(group) * max(c.count for c in group))
        clock += sum(costs.prefill(c.count) for c in out.prefill if c.start != 0)
        for seq in out.decode:
            seq.num_computed += 1
            sampled(seq)
        for chunk in out.prefill:
            chunk.seq.num_computed += chunk.count
            if chunk.completes_prompt:
                sampled(chunk.seq)
        if out.decode or any(c.completes_prompt for c in out.prefill):
            last_token = clock
    return last_token - start
