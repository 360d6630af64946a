"""`llamaforge serve` of a tensor-parallel engine: what each rank process does (docs/tensor_parallel.md).

    mpiexec -disable-auto-cleanup -n N llamaforge serve ENGINE [--tp-timeout 30] ...   (leader mode)
    llamaforge serve ENGINE ...        (orchestrator mode: rank 0 spawns the other N - 1 itself)

Under mpiexec every rank runs the same command; in orchestrator mode (also the Triton `llama`
model's) the spawned ranks run `python -m llamaforge.runtime.parallel.launch ENGINE THREADS TIMEOUT`. `start_rank` makes the process's world (MPI) and, on ranks >= 1,
runs the shard's step loop until rank 0 says stop; rank 0 goes on to serve: its engine core's runner
drives the other ranks (runner.py), and `watch_ranks` turns a failure of the world into the
servers' not-ready / UNAVAILABLE state.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from llamaforge.runtime.core.engine import ort_providers
from llamaforge.runtime.parallel.rank_engine import TensorParallelEngine, spawn_args, tensor_parallel_size
from llamaforge.runtime.parallel.runner import TensorParallelRunner, run_worker
from llamaforge.runtime.parallel.world import DEFAULT_TIMEOUT_S, RankFailure, init_world


def start_rank(engine_dir: str | os.PathLike[str], threads: int | None = None,
               timeout_s: float = DEFAULT_TIMEOUT_S, device: str = "cpu") -> bool:
    """For a tensor-parallel engine: join the MPI job. On a rank >= 1, run its shard until rank 0
    stops (True: the process has served its part). False on rank 0 and for a single-process engine."""
    size = tensor_parallel_size(engine_dir)
    if size is None:
        return False
    world = init_world(size, timeout_s, spawn_args(engine_dir, threads, timeout_s, device))
    world.install_failure_signal()
    if world.rank == 0:
        return False
    # SIGTERM/SIGINT reach every rank from mpiexec: rank 0 drains, then tells this one to stop.
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    engine = TensorParallelEngine(engine_dir, world, threads, ort_providers(device))  # its own GPU: placement.py
    print(f"llama-forge: tensor-parallel rank {world.rank} of {world.size} (pid {os.getpid()}) running "
          f"{engine.dir}", flush=True)
    try:
        run_worker(engine)
    except RankFailure as e:
        print(f"llama-forge: rank {world.rank} stops: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # MPI_Finalize would wait for the dead rank
    _ending()
    return True


def _ending() -> None:
    """An orderly end: the ranks exit one after another, and hydra's SIGUSR1 about the first to go
    must not kill the others while they finalize (Python's own handler is gone by then)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def watch_ranks(core: Any, mark_unavailable: Callable[[str], None]) -> Callable[[], None]:
    """Rank 0: when the world fails, `mark_unavailable(reason)` (the servers stop admitting and
    answer not-ready; the core ends the requests in flight 'unavailable'). Returns what to call once
    the core has stopped: it tells the other ranks to exit. A no-op for a single-process core."""
    runner = getattr(core, "runner", None)
    if not isinstance(runner, TensorParallelRunner):
        return lambda: None

    def on_failure(reason: str) -> None:
        print(f"llama-forge: tensor-parallel engine unavailable: {reason}", file=sys.stderr, flush=True)
        mark_unavailable(reason)

    runner.world.on_failure(on_failure)

    def stop() -> None:
        runner.close()  # the core's stop has done it already; idempotent
        _ending()
    return stop


def exit_after_failure() -> None:
    """Rank 0 at its end: if the world failed, leave without MPI_Finalize (it would wait for the
    dead rank forever); otherwise return, and mpi4py finalizes MPI as usual."""
    from llamaforge.runtime.parallel import world

    if world._world is not None and world._world.failure is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":  # a rank spawned by an orchestrator (world.py init_world): ENGINE THREADS TIMEOUT DEVICE
    engine_dir, threads, timeout, device = sys.argv[1:5]
    start_rank(engine_dir, int(threads) or None, float(timeout), device)
