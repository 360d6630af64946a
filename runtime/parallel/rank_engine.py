"""One rank of a tensor-parallel engine: its shard's ONNX Runtime session, whose `step` returns the
whole vocabulary's logits on rank 0.

The engine directory (docs/tensor_parallel.md) holds `rank{i}/` with each rank's graph, external data
and manifest (`tensor_parallel.rank` = i); the top-level manifest says `tensor_parallel.size` and
holds the tokenizer. A rank graph has a TP=1 graph's inputs and outputs, with two differences the
engine core never sees: its KV caches hold `kv_heads_per_rank` heads (each rank keeps its own, the
same block tables), and `logits` is the rank's vocabulary shard (`vocab_shards[rank]`), which
`step` gathers to rank 0 and joins in rank order (the sampled rows only travel: [batch, n, shard]).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llamaforge.runtime.core.engine import Engine, EngineError, read_manifest
from llamaforge.runtime.parallel import collective
from llamaforge.runtime.parallel.placement import place_providers, rank_device_id, uses_gpu, visible_gpu_count
from llamaforge.runtime.parallel.world import DEFAULT_TIMEOUT_S, RankWorld, init_world


class TensorParallelEngine(Engine):
    """This process's rank of the engine at `engine_dir` (`world.rank`), bound to `world`."""

    def __init__(self, engine_dir: str | os.PathLike[str], world: RankWorld, threads: int | None = None,
                 providers: Sequence[Any] | None = None) -> None:
        top_dir = Path(engine_dir)
        top = read_manifest(top_dir)
        tp = top.tensor_parallel
        if tp is None:
            raise EngineError(f"{top_dir}: manifest.json has no 'tensor_parallel' entry: not a tensor-parallel engine")
        if tp.size != world.size:
            raise EngineError(f"{top_dir}: built for {tp.size} tensor-parallel ranks, launched as {world.size}")
        if len(tp.vocab_shards) != tp.size:
            raise EngineError(f"{top_dir}: manifest.json field 'tensor_parallel.vocab_shards' has "
                              f"{len(tp.vocab_shards)} entries for {tp.size} ranks")
        self.world = world
        collective.bind_world(world)
        if uses_gpu(providers):  # each rank its own GPU: its local rank modulo the GPUs it sees
            providers = place_providers(providers or (), rank_device_id(world.local_rank, visible_gpu_count()))
        self.providers = list(providers or ["CPUExecutionProvider"])
        super().__init__(top_dir / f"rank{world.rank}", threads, self.providers,
                         session_options=collective.session_options(), tokenizer_dir=top_dir)
        mine = self.manifest.tensor_parallel
        if mine is None or mine.rank != world.rank or mine.size != tp.size:
            raise EngineError(f"{self.dir}: manifest.json field 'tensor_parallel' is {mine}, expected rank "
                              f"{world.rank} of {tp.size}")
        self.top_dir = top_dir
        self.vocab_widths = [end - start for start, end in tp.vocab_shards]
        if sum(self.vocab_widths) != self.vocab_size:
            raise EngineError(f"{top_dir}: manifest.json field 'tensor_parallel.vocab_shards' covers "
                              f"{sum(self.vocab_widths)} rows of a {self.vocab_size}-token vocabulary")

    def _whole(self, shard: np.ndarray) -> np.ndarray:
        """After a call: raise if the ranks failed during it (the all-reduce kernel never raises, it
        returns zeros and marks the world failed), then gather the logits shards onto rank 0."""
        self.world.check()
        return self.world.gather_vocab(shard, self.vocab_widths)

    def step(self, input_ids: np.ndarray, past_lengths: np.ndarray, past: list[np.ndarray],
             logits_index: np.ndarray | None = None,
             extra_feeds: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        self.world.check()
        logits, present = super().step(input_ids, past_lengths, past, logits_index, extra_feeds)
        return self._whole(logits), present

    def decode_in_place_step(self, input_ids: np.ndarray, past_lengths: np.ndarray, caches: list[np.ndarray],
                             logits_index: np.ndarray | None = None,
                             extra_feeds: dict[str, np.ndarray] | None = None) -> np.ndarray:
        self.world.check()
        return self._whole(super().decode_in_place_step(input_ids, past_lengths, caches, logits_index, extra_feeds))


def tensor_parallel_size(engine_dir: str | os.PathLike[str]) -> int | None:
    """The engine's number of ranks, or None for a single-process engine."""
    tp = read_manifest(engine_dir).tensor_parallel
    return None if tp is None else tp.size


def spawn_args(engine_dir: str | os.PathLike[str], threads: int | None, timeout_s: float,
               device: str = "cpu") -> list[str]:
    """What a spawned rank is told (orchestrator mode): `launch.py ENGINE THREADS TIMEOUT DEVICE`
    (DEVICE cpu | gpu: rank 0's kind of execution provider; each rank then picks its own GPU)."""
    return [str(Path(engine_dir).resolve()), str(threads or 0), repr(timeout_s), device]


def open_engine(engine_dir: str | os.PathLike[str], threads: int | None = None,
                providers: Sequence[Any] | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Engine:
    """The engine the engine core runs: a single-process `Engine`, or rank 0 of a tensor-parallel one
    (this process must be rank 0 of an MPI job of its size; the others run runner.py `run_worker`)."""
    size = tensor_parallel_size(engine_dir)
    if size is None:
        return Engine(engine_dir, threads=threads, providers=providers)
    world = init_world(size, timeout_s, spawn_args(engine_dir, threads, timeout_s, "gpu" if uses_gpu(providers) else "cpu"))
    if world.rank != 0:
        raise EngineError(f"rank {world.rank} of a tensor-parallel job runs its shard (run_worker), not an engine core")
    return TensorParallelEngine(engine_dir, world, threads, providers)
