"""The model runner of a tensor-parallel engine: every rank runs each step's engine calls in lockstep.

Rank 0 hosts the engine core (scheduler, KV block tables, sampling). `TensorParallelRunner` is a
`ModelRunner` (the engine core drives it as it drives the single-process one) that, before each
step's calls, broadcasts a `StepPlan`: the scheduler's output as sequence ids, positions and tokens,
the block tables of the step's sequences (rank 0's decisions) and the block copies made since the
last step (a fork's copied partial block). Every other rank runs `run_worker`: it receives the plan,
applies the tables and copies to its own KV blocks (its shard's `kv_heads_per_rank` heads), rebuilds
the scheduler's output and drives its own `ModelRunner` through the same calls. The calls are the
same on every rank, in the same order and with the same shapes, so the all-reduces inside the graphs
pair up, and each call's logits shards are gathered onto rank 0 (rank_engine.py).

The plan is pickled: the ranks are one MPI job, launched together from the same installation.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from llamaforge.runtime.core.engine import Engine
from llamaforge.runtime.core.kv_cache import KVCacheManager
from llamaforge.runtime.core.model_runner import ContextLogits, ModelRunner, Sampled
from llamaforge.runtime.core.scheduler import Chunk, SchedulerOutput, Sequence
from llamaforge.runtime.core.stats import CoreStats
from llamaforge.runtime.parallel.rank_engine import TensorParallelEngine
from llamaforge.runtime.parallel.world import RankFailure, RankWorld


@dataclass(frozen=True)
class RunnerSetup:
    """Sent once, when rank 0's runner is made: what the other ranks size their runner and KV by."""

    num_blocks: int
    block_size: int
    max_num_seqs: int
    prefill_padding_tokens: int
    condense_decode_rows: bool | None


@dataclass(frozen=True)
class SequencePlan:
    """What a rank needs of one sequence: its tokens from `num_computed` on (those before are in the
    KV cache), its draft, its block table, and its kept context logits' (rows, filled) if any."""

    num_computed: int
    tail: list[int]
    draft: list[int]
    table: list[int]
    context: tuple[int, int] | None


@dataclass(frozen=True)
class StepPlan:
    sequences: dict[str, SequencePlan]
    decode: list[str]
    verify: list[str]
    prefill: list[tuple[str, int, int]]  # (sequence, start, count)
    preempted: bool
    static_batch: int | None
    block_copies: list[tuple[int, int]] = field(default_factory=list)


class TensorParallelRunner(ModelRunner):
    """Rank 0's model runner (see the module docstring); `close()` ends the other ranks' loops."""

    def __init__(self, engine: Engine, kv: KVCacheManager, stats: CoreStats, *, max_num_seqs: int,
                 prefill_padding_tokens: int, condense_decode_rows: bool | None) -> None:
        if not isinstance(engine, TensorParallelEngine):
            raise TypeError("TensorParallelRunner runs a TensorParallelEngine")
        super().__init__(engine, kv, stats, max_num_seqs=max_num_seqs, prefill_padding_tokens=prefill_padding_tokens,
                         condense_decode_rows=condense_decode_rows)
        self.world: RankWorld = engine.world
        self._lock = threading.Lock()  # one sequence of collectives at a time: a step, or close()
        self._closed = False
        kv.block_copies = []
        setup = RunnerSetup(kv.num_blocks, kv.block_size, max_num_seqs, prefill_padding_tokens, condense_decode_rows)
        self.world.broadcast(pickle.dumps(setup), "runner setup")

    def execute(self, out: SchedulerOutput) -> Iterator[Sampled]:
        if out.empty and not out.preempted:
            return
        with self._lock:
            if self._closed:
                raise RankFailure("the tensor-parallel ranks have been stopped")
            self.world.broadcast(pickle.dumps(self._plan(out)))
            calls = super().execute(out)
            finished = False
            try:
                for sampled in calls:  # noqa: UP028 - `yield from` would close `calls` with this generator
                    yield sampled
                finished = True
            finally:
                if not finished:  # the core left the step early: its other calls still run, as on the other ranks
                    for _ in calls:
                        pass

    def _plan(self, out: SchedulerOutput) -> StepPlan:
        seqs = [*out.decode, *out.verify, *(c.seq for c in out.prefill)]
        plans = {}
        for s in seqs:
            kept = self.context_logits.get(s.seq_id)
            plans[s.seq_id] = SequencePlan(s.num_computed, s.tokens[s.num_computed :], list(s.draft),
                                           list(self.kv.tables.get(s.seq_id, ())),
                                           None if kept is None else (len(kept.rows), kept.filled))
        copies = self.kv.block_copies or []
        self.kv.block_copies = []
        return StepPlan(plans, [s.seq_id for s in out.decode], [s.seq_id for s in out.verify],
                        [(c.seq.seq_id, c.start, c.count) for c in out.prefill], bool(out.preempted),
                        out.static_batch, copies)

    def close(self) -> None:
        """Tell the other ranks to exit (skipped once the world has failed); idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.world.closed = True
            if self.world.failure is None:
                try:
                    self.world.broadcast(pickle.dumps(None), "stop", timeout_s=5.0)
                except RankFailure:
                    pass


def runner_class(engine: Engine) -> type[ModelRunner]:
    """The model runner for `engine`: the tensor-parallel one for rank 0 of a tensor-parallel engine."""
    return TensorParallelRunner if isinstance(engine, TensorParallelEngine) else ModelRunner


def apply_plan(plan: StepPlan, runner: ModelRunner, vocab_width: int) -> SchedulerOutput:
    """On a rank other than 0: bring its KV blocks and runner to rank 0's state for the step (copies,
    tables, kept context logits), and the scheduler's output for the step's calls."""
    kv = runner.kv
    for src, dst in plan.block_copies:
        for pool in (*kv.keys, *kv.values):
            pool[dst] = pool[src]
    kv.tables = {sid: p.table for sid, p in plan.sequences.items()}
    seqs = {}
    for sid, p in plan.sequences.items():
        tokens = [0] * p.num_computed + p.tail  # tokens before num_computed are only in the KV cache
        seqs[sid] = Sequence(sid, tokens, len(tokens), len(tokens), num_computed=p.num_computed, draft=list(p.draft))
    runner.context_logits = {sid: ContextLogits(np.zeros((p.context[0], vocab_width), np.float32), p.context[1])
                             for sid, p in plan.sequences.items() if p.context is not None}
    return SchedulerOutput(decode=[seqs[s] for s in plan.decode], verify=[seqs[s] for s in plan.verify],
                           prefill=[Chunk(seqs[s], start, count) for s, start, count in plan.prefill],
                           # the runner only asks whether any was preempted (its decode rows are rebuilt)
                           preempted=[Sequence("preempted", [], 0, 0)] if plan.preempted else [],
                           static_batch=plan.static_batch)


def run_worker(engine: TensorParallelEngine) -> None:
    """A rank other than 0: run each step rank 0 broadcasts until it says stop (or the world fails:
    RankFailure). Between steps the rank waits as long as rank 0 is idle; a death ends it (SIGUSR1)."""
    world = engine.world
    setup = pickle.loads(world.broadcast(None, "runner setup"))
    assert isinstance(setup, RunnerSetup)
    kv = KVCacheManager(engine.kv, setup.num_blocks * setup.block_size, setup.block_size, prefix_caching=False)
    runner = ModelRunner(engine, kv, CoreStats(), max_num_seqs=setup.max_num_seqs,
                         prefill_padding_tokens=setup.prefill_padding_tokens,
                         condense_decode_rows=setup.condense_decode_rows)
    width = engine.vocab_widths[world.rank]
    while True:
        plan = pickle.loads(world.broadcast(None, "waiting for rank 0's next step", timeout_s=float("inf")))
        if plan is None:
            return
        for _ in runner.execute(apply_plan(plan, runner, width)):
            pass
