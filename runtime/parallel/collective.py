"""The ranks' all-reduce: MPI through mpi4py, run inside ONNX Runtime as a Python custom op.

A tensor-parallel rank graph lowered for ONNX Runtime on the CPU holds
`ai.onnx.contrib::LlamaforgeAllReduce` nodes (the ORT lowering of `llamaforge::AllReduce`). ONNX
Runtime has no CPU collective of its own (`com.microsoft.AllReduce` is in its CUDA build, over
NCCL), so onnxruntime-extensions' Python custom op runs the node: the kernel below hands the
tensor to MPI's `Allreduce` on the rank's communicator. MPI is the existing collective library
here because the runtime never imports torch (so torch.distributed's gloo is out); `mpiexec`
from the same MPICH launches the ranks on one host or across hosts.

The communicator is process-wide (one rank per process), bound once with `bind_communicator`
before a session runs a graph that holds the op.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort

ALL_REDUCE_DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions' domain for Python custom ops
ALL_REDUCE_OP_TYPE = "LlamaforgeAllReduce"

_communicator: Any = None  # an mpi4py communicator once bound
_registered = False


def bind_communicator(comm: Any) -> None:
    """Use `comm` (an mpi4py communicator) for every all-reduce this process runs."""
    global _communicator
    _communicator = comm
    _register_kernel()


def _all_reduce_sum(x: np.ndarray) -> np.ndarray:
    # Registered only by `bind_communicator`, so a communicator is always there. An exception
    # raised here would abort the process inside ONNX Runtime, so nothing here raises on purpose.
    from mpi4py import MPI

    send = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(send)
    _communicator.Allreduce(send, out, op=MPI.SUM)
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
    custom-op library. The kernel itself is registered by `bind_communicator`; until then a
    session refuses such a graph when it is made, naming the op."""
    from onnxruntime_extensions import get_library_path

    options = options or ort.SessionOptions()
    options.register_custom_ops_library(get_library_path())
    return options
