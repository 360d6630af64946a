"""The ranks' all-reduce: MPI through mpi4py, run inside ONNX Runtime as a Python custom op.

A tensor-parallel rank graph lowered for ONNX Runtime on the CPU holds
`ai.onnx.contrib::LlamaforgeAllReduce` nodes (the ORT lowering of `llamaforge::AllReduce`). ONNX
Runtime has no CPU collective of its own (`com.microsoft.AllReduce` is in its CUDA build, over
NCCL), so onnxruntime-extensions' Python custom op runs the node: the kernel below hands the
tensor to MPI's all-reduce on the rank's communicator. MPI is the existing collective library
here because the runtime never imports torch (so torch.distributed's gloo is out); `mpiexec`
from the same MPICH launches the ranks on one host or across hosts.

The communicator is process-wide (one rank per process), bound once with `bind_communicator` (or
`bind_world`) before a session runs a graph that holds the op.

Failure (world.py): an exception raised inside an onnxruntime-extensions Python op aborts the
process, and a blocking MPI_Allreduce whose peer died never returns. So the kernel starts a
non-blocking `Iallreduce` and waits for it with the world's deadline; when the world fails (a rank
died, or the deadline passed) it returns zeros instead of raising, every later all-reduce of the
call returns at once, and the caller (runner.py `TensorParallelEngine`) raises RankFailure once
ONNX Runtime hands the call back.

Cost (`make bench-tp`): the time spent inside the kernel, the calls and the bytes all-reduced add up
in the world's `stats` (two clock reads and three additions a call).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import onnxruntime as ort

from llamaforge.runtime.parallel.world import DEFAULT_TIMEOUT_S, RankWorld

ALL_REDUCE_DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions' domain for Python custom ops
ALL_REDUCE_OP_TYPE = "LlamaforgeAllReduce"

_world: RankWorld | None = None  # bound once per process
_registered = False


def bind_communicator(comm: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> RankWorld:
    """Use `comm` (an mpi4py communicator) for every all-reduce this process runs; its world."""
    world = RankWorld(comm, timeout_s)
    bind_world(world)
    return world


def bind_world(world: RankWorld) -> None:
    """Use `world`'s communicator (and its deadline and failure state) for every all-reduce."""
    global _world
    _world = world
    _register_kernel()


def _all_reduce_sum(x: np.ndarray) -> np.ndarray:
    # Registered only by `bind_world`, so a world is always there. Nothing here may raise (it would
    # abort the process inside ONNX Runtime): a failure returns zeros and leaves the world failed.
    from mpi4py import MPI

    world = _world
    assert world is not None
    send = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(send)
    if world.failure is not None:
        out.fill(0)
        return out
    start = time.perf_counter()
    try:
        world.wait(world.comm.Iallreduce(send, out, op=MPI.SUM), "all-reduce")
    except Exception:  # noqa: BLE001 - see above; world.failure says why
        out.fill(0)
    stats = world.stats
    stats.all_reduce_s += time.perf_counter() - start
    stats.all_reduce_calls += 1
    stats.all_reduce_bytes += send.nbytes
    return out


def _register_kernel() -> None:
    global _registered
    if _registered:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    onnx_op(op_type=ALL_REDUCE_OP_TYPE, inputs=[PyCustomOpDef.dt_float],
            outputs=[PyCustomOpDef.dt_float])(_all_reduce_sum)
    _registered = True


def session_options(options: ort.SessionOptions | None = None) -> ort.SessionOptions:
    """Session options that can run graphs holding the all-reduce op: onnxruntime-extensions'
    custom-op library. The kernel itself is registered by `bind_world`; until then a session
    refuses such a graph when it is made, naming the op."""
    from onnxruntime_extensions import get_library_path

    options = options or ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options
