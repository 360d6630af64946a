"""The ranks of a tensor-parallel engine as one MPI job: each process's communicator, the step's
collectives run with a deadline, and what happens when a rank dies.

Why every collective here is non-blocking and polled: a blocking MPI call whose peer has died never
returns (MPI has no timeout), and a rank that hangs would hang rank 0's step loop with it, and so
every request in flight. So each collective is started non-blocking (`Ibcast`, `Igatherv`,
`Iallreduce`) and `wait` polls it until it completes, the deadline (`timeout_s`) passes, or the
world is marked failed; the last two raise `RankFailure` and leave the world failed for good.

How a death is noticed (docs/tensor_parallel.md, "When a rank dies"):
  * `mpiexec -disable-auto-cleanup` keeps the other ranks alive when one dies, and hydra then sends
    SIGUSR1 to every process left (MPICH's failure notification). Python's default for SIGUSR1 is to
    terminate, so `install_failure_signal` turns it into `fail(...)` instead.
  * A rank that hangs without dying is caught by the deadline of the collective that waits for it.
  * The communicator returns MPI errors (MPI.ERRORS_RETURN) instead of aborting the job; an error
    marks the world failed.
A failed world runs no further collectives: rank 0 answers not-ready and ends its requests
UNAVAILABLE (runner.py, launch.py); the other ranks exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llamaforge.runtime.core.engine import EngineError
from llamaforge.runtime.core.requests import EngineUnavailable
from llamaforge.runtime.parallel.placement import local_rank

DEFAULT_TIMEOUT_S = 30.0  # how long one collective may wait for the other ranks


class RankFailure(EngineUnavailable):
    """A rank died, hung past the deadline, or MPI failed: the tensor-parallel engine cannot run."""


@dataclass
class CollectiveStats:
    """What this rank's collectives cost (the all-reduce kernel's figures feed `make bench-tp`)."""

    all_reduce_calls: int = 0
    all_reduce_bytes: int = 0
    all_reduce_s: float = 0.0
    broadcast_bytes: int = 0
    gather_bytes: int = 0


class RankWorld:
    """One process's view of the MPI job: `comm` (an mpi4py communicator, errors returned), its
    `rank` and `size`, and whether the job has failed (`failure`: why, or None)."""

    def __init__(self, comm: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        from mpi4py import MPI

        if not timeout_s > 0:
            raise ValueError(f"--tp-timeout: must be > 0 seconds, got {timeout_s}")
        comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.comm = comm
        self.rank: int = comm.Get_rank()
        self.size: int = comm.Get_size()
        self.timeout_s = timeout_s
        self.failure: str | None = None
        self.spawned = False  # rank 0 of an orchestrator: it spawned the other ranks (init_world)
        self.closed = False  # the other ranks were told to exit (runner.py TensorParallelRunner.close)
        self.stats = CollectiveStats()
        self.local_rank = 0  # this rank's index on its host, which picks its GPU (init_world sets it)
        self._listeners: list[Callable[[str], None]] = []
        self._lock = threading.Lock()

    # -- failure ---------------------------------------------------------------------------------
    def on_failure(self, listener: Callable[[str], None]) -> None:
        """Call `listener(reason)` once when the world fails (at once if it already has). It may run
        in a signal handler or the step thread: it must be quick and thread-safe."""
        with self._lock:
            self._listeners.append(listener)
            failure = self.failure
        if failure is not None:
            listener(failure)

    def fail(self, reason: str) -> None:
        with self._lock:
            if self.failure is not None:
                return
            self.failure = reason
            listeners = list(self._listeners)
        for listener in listeners:
            listener(reason)

    def check(self) -> None:
        """Raise RankFailure if the world has failed."""
        if self.failure is not None:
            raise RankFailure(f"tensor-parallel rank {self.rank}: {self.failure}")

    def install_failure_signal(self) -> None:
        """SIGUSR1 (hydra's notice that a process of the job died, under -disable-auto-cleanup) marks
        the world failed instead of killing this process. Main thread only (Python's signal rule)."""
        def on_sigusr1(signum: int, frame: Any) -> None:
            self.fail("mpiexec reported that a rank process died (SIGUSR1)")

        signal.signal(signal.SIGUSR1, on_sigusr1)

    # -- collectives -------------------------------------------------------------------------------
    def wait(self, request: Any, what: str, timeout_s: float | None = None) -> None:
        """Poll `request` until it completes; RankFailure (and the world failed) if the world fails
        meanwhile, MPI returns an error, or `timeout_s` (default: the world's) passes. Polls yield
        the CPU (sleep(0)) and back off to 1 ms once a wait is long, so an idle rank costs little."""
        from mpi4py import MPI

        self.check()
        start = time.monotonic()
        deadline = start + (self.timeout_s if timeout_s is None else timeout_s)
        polls = 0
        try:
            while not request.Test():
                polls += 1
                if self.failure is not None:
                    break
                now = time.monotonic()
                if now > deadline:
                    self.fail(f"{what}: no answer from the other ranks within {now - start:.1f} s")
                    break
                time.sleep(0 if polls < 2000 else min(1e-3, 1e-5 * (polls - 2000) + 1e-5))
        except MPI.Exception as e:
            self.fail(f"{what}: MPI error: {e.Get_error_string()}")
        self.check()

    def broadcast(self, payload: bytes | None, what: str = "step broadcast", timeout_s: float | None = None) -> bytes:
        """Rank 0's `payload` on every rank (others pass None): its length, then its bytes."""
        header = np.array([0 if payload is None else len(payload)], np.int64)
        self.wait(self.comm.Ibcast(header, root=0), what, timeout_s)
        body = np.frombuffer(payload, np.uint8).copy() if payload is not None else np.empty(int(header[0]), np.uint8)
        if len(body):
            self.wait(self.comm.Ibcast(body, root=0), what, timeout_s)
        self.stats.broadcast_bytes += 8 + len(body)
        return body.tobytes()

    def gather_vocab(self, shard: np.ndarray, widths: list[int]) -> np.ndarray:
        """Every rank's logits shard [..., widths[rank]] (float32) joined on rank 0 in rank order along
        the last axis ([..., sum(widths)]); the other ranks get their own shard back."""
        from mpi4py import MPI

        send = np.ascontiguousarray(shard, np.float32)
        if send.shape[-1] != widths[self.rank]:
            raise RankFailure(f"rank {self.rank}: logits shard has {send.shape[-1]} columns, the manifest's "
                              f"tensor_parallel.vocab_shards give it {widths[self.rank]}")
        lead = send.shape[:-1]
        rows = int(np.prod(lead))
        if self.rank != 0:
            self.wait(self.comm.Igatherv(send, None, root=0), "logits gather")
            self.stats.gather_bytes += send.nbytes
            return shard
        counts = [rows * w for w in widths]
        recv = np.empty(sum(counts), np.float32)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        self.wait(self.comm.Igatherv(send, [recv, counts, displs, MPI.FLOAT], root=0), "logits gather")
        parts = [recv[d : d + c].reshape(*lead, w) for d, c, w in zip(displs, counts, widths)]
        return np.concatenate(parts, axis=-1)


_world: RankWorld | None = None


def _spawn(count: int, args: Sequence[str]) -> Any:
    """`count` rank processes spawned by MPI (an intercommunicator to them). MPICH's singleton spawn
    runs the `mpiexec` it finds on PATH: the one installed beside this Python comes first."""
    from mpi4py import MPI

    here = str(Path(sys.executable).parent)
    if shutil.which("mpiexec", path=here):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    return MPI.COMM_SELF.Spawn(sys.executable, args=["-m", "llamaforge.runtime.parallel.launch", *args],
                               maxprocs=count)


def init_world(size: int, timeout_s: float = DEFAULT_TIMEOUT_S, spawn: Sequence[str] | None = None) -> RankWorld:
    """This process's world for an engine of `size` ranks (MPI initialised on first use, once per
    process): the job's COMM_WORLD under `mpiexec -n size` (leader mode), or, in a process started
    alone with `spawn` given, rank 0 of `size` ranks it spawns itself (orchestrator mode: MPI_Comm_spawn
    of `python -m llamaforge.runtime.parallel.launch *spawn`, as TensorRT-LLM's TRTLLM_ORCHESTRATOR=1);
    a spawned rank joins its parent's. Refused, naming the launch command, when the sizes differ."""
    global _world
    if _world is not None and _world.spawned and (_world.closed or _world.failure is not None) and spawn is not None:
        _world = None  # an orchestrator whose ranks are gone (a core stopped before): spawn a new set
    if _world is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        parent = MPI.Comm.Get_parent()
        spawned = False
        if parent != MPI.COMM_NULL:  # spawned by an orchestrator: rank 1.. after it
            comm = parent.Merge(high=True)
        elif comm.Get_size() == 1 and size > 1 and spawn is not None:
            comm = _spawn(size - 1, spawn).Merge(high=False)
            spawned = True
        _world = RankWorld(comm, timeout_s)
        _world.spawned = spawned
        _world.local_rank = local_rank(comm)  # collective: every rank forms its world here (placement.py)
    elif _world.closed:
        raise EngineError("this process's tensor-parallel ranks were stopped with the engine core that ran them; "
                          "under mpiexec a process runs one engine core (restart the job)")
    if _world.size != size:
        raise EngineError(f"this engine has {size} tensor-parallel ranks but this process is one of "
                                f"{_world.size}: launch it as `mpiexec -n {size} llamaforge serve ENGINE` "
                                "(docs/tensor_parallel.md)")
    return _world
