"""Which GPU a tensor-parallel rank runs on (docs/tensor_parallel.md#gpu-placement).

Each rank selects its own device: its *local* rank, its index among the ranks on its host, modulo
the number of GPUs visible to it. So N ranks on a host with N GPUs get one each; with
`CUDA_VISIBLE_DEVICES=2,3` the two ranks of a host get ordinals 0 and 1, which are GPUs 2 and 3;
a launcher that gives each rank one GPU through its own `CUDA_VISIBLE_DEVICES` makes every rank's
ordinal 0. The ordinal is ONNX Runtime's CUDA (or TensorRT) execution provider option `device_id`.

The local rank comes from MPI itself (`Split_type(COMM_TYPE_SHARED)`: the ranks that share memory,
i.e. one host), which is right in both launch modes; the launcher's environment is the fallback
(hydra: MPI_LOCALRANKID, Open MPI: OMPI_COMM_WORLD_LOCAL_RANK, Slurm: SLURM_LOCALID), though in
orchestrator mode the spawned ranks' variables count only the spawned group. The GPU count is the
CUDA driver's (`cuDeviceGetCount`, which honours CUDA_VISIBLE_DEVICES) through ctypes: no torch here.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping, Sequence
from typing import Any

from llamaforge.runtime.core.engine import EngineError

LOCAL_RANK_ENV = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def local_rank(comm: Any, env: Mapping[str, str] = os.environ) -> int:
    """This process's index among the job's ranks on its host. Collective over `comm`: every rank
    must call it (world.py `init_world` does, right after the job forms)."""
    try:
        from mpi4py import MPI

        shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
    except (AttributeError, NotImplementedError):
        shared = None
    if shared is not None:
        try:
            return int(shared.Get_rank())
        finally:
            shared.Free()
    for name in LOCAL_RANK_ENV:
        value = env.get(name, "")
        if value.strip():
            try:
                return int(value)
            except ValueError:
                raise EngineError(f"{name}={value!r}: the launcher's local rank is not an integer") from None
    raise EngineError(f"cannot tell this rank's local rank: the communicator has no Split_type and none of "
                      f"{', '.join(LOCAL_RANK_ENV)} is set")


def visible_gpu_count(env: Mapping[str, str] = os.environ, driver: str = "libcuda.so.1") -> int:
    """GPUs this process can use: the CUDA driver's count (after CUDA_VISIBLE_DEVICES), else, with no
    driver to ask, the number of CUDA_VISIBLE_DEVICES entries (CUDA stops at the first invalid one)."""
    try:
        cuda = ctypes.CDLL(driver)
    except OSError:
        cuda = None
    if cuda is not None:
        count = ctypes.c_int(0)
        if cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0:
            return count.value
        return 0
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return 0
    entries = []
    for entry in visible.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return len(entries)


def rank_device_id(local: int, gpu_count: int) -> int:
    """The CUDA device ordinal of the rank with local rank `local`: `local % gpu_count`."""
    if gpu_count < 1:
        raise EngineError("a tensor-parallel rank on a GPU execution provider sees no GPU (CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!s})")
    if local < 0:
        raise EngineError(f"local rank {local} is negative")
    return local % gpu_count


def uses_gpu(providers: Sequence[Any] | None) -> bool:
    return any((p[0] if isinstance(p, tuple) else p) in GPU_PROVIDERS for p in providers or ())


def place_providers(providers: Sequence[Any], device_id: int) -> list[Any]:
    """`providers` with every GPU execution provider's `device_id` option set to `device_id`."""
    placed: list[Any] = []
    for p in providers:
        name, options = (p[0], dict(p[1])) if isinstance(p, tuple) else (p, {})
        placed.append((name, {**options, "device_id": int(device_id)}) if name in GPU_PROVIDERS else p)
    return placed
