"""GPU placement of tensor-parallel ranks (runtime/parallel/placement.py), without a GPU: the local rank
from MPI's shared-memory split or the launcher's environment, the visible GPU count, the device id
(local rank modulo the count) and the CUDA execution provider options each rank opens its session with."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from llamaforge.runtime.core.engine import EngineError, ort_providers
from llamaforge.runtime.parallel.placement import (
    local_rank,
    place_providers,
    rank_device_id,
    uses_gpu,
    visible_gpu_count,
)


class SharedSplit:
    """A communicator whose COMM_TYPE_SHARED split puts this process at `local` on its host."""

    def __init__(self, local: int) -> None:
        self.local, self.freed, self.split_types = local, False, []

    def Split_type(self, split_type: Any) -> SharedSplit:  # noqa: N802 (mpi4py's name)
        self.split_types.append(split_type)
        return self

    def Get_rank(self) -> int:  # noqa: N802
        return self.local

    def Free(self) -> None:  # noqa: N802
        self.freed = True


def test_local_rank_is_the_rank_within_the_hosts_shared_memory_split() -> None:
    from mpi4py import MPI

    comm = SharedSplit(3)
    assert local_rank(comm, env={"MPI_LOCALRANKID": "7"}) == 3  # MPI's answer wins over the environment
    assert comm.split_types == [MPI.COMM_TYPE_SHARED] and comm.freed


def test_local_rank_of_a_real_single_process_world_is_0() -> None:
    from mpi4py import MPI

    assert local_rank(MPI.COMM_SELF, env={}) == 0


@pytest.mark.parametrize("env, want", [({"MPI_LOCALRANKID": "2"}, 2), ({"OMPI_COMM_WORLD_LOCAL_RANK": "1"}, 1),
                                       ({"SLURM_LOCALID": "5"}, 5), ({"MPI_LOCALRANKID": " ", "SLURM_LOCALID": "4"}, 4)])
def test_without_a_split_the_launchers_local_rank_is_used(env: dict[str, str], want: int) -> None:
    assert local_rank(object(), env=env) == want


def test_no_way_to_tell_the_local_rank_is_an_error_naming_the_variables() -> None:
    with pytest.raises(EngineError, match="MPI_LOCALRANKID, OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID"):
        local_rank(object(), env={})
    with pytest.raises(EngineError, match="MPI_LOCALRANKID='x'"):
        local_rank(object(), env={"MPI_LOCALRANKID": "x"})


@pytest.mark.parametrize("visible, count", [("0,1,2,3", 4), ("2,3", 2), ("GPU-5e1c", 1), ("", 0), ("1,-1,2", 1),
                                            (None, 0)])
def test_without_a_driver_the_visible_gpus_are_cuda_visible_devices(visible: str | None, count: int) -> None:
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert visible_gpu_count(env, driver="libno-such-cuda-driver.so") == count


@pytest.mark.parametrize("local, gpus, want", [(0, 8, 0), (5, 8, 5), (9, 8, 1), (1, 2, 1), (3, 1, 0)])
def test_device_id_is_the_local_rank_modulo_the_visible_gpus(local: int, gpus: int, want: int) -> None:
    assert rank_device_id(local, gpus) == want


def test_a_gpu_rank_that_sees_no_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(EngineError, match="sees no GPU .CUDA_VISIBLE_DEVICES="):
        rank_device_id(0, 0)


def test_every_gpu_provider_gets_the_ranks_device_and_keeps_its_other_options() -> None:
    providers = [("CUDAExecutionProvider", {"device_id": 0, "arena_extend_strategy": "kSameAsRequested"}),
                 "TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert uses_gpu(providers) and not uses_gpu(["CPUExecutionProvider"]) and not uses_gpu(None)
    assert place_providers(providers, 3) == [
        ("CUDAExecutionProvider", {"device_id": 3, "arena_extend_strategy": "kSameAsRequested"}),
        ("TensorrtExecutionProvider", {"device_id": 3}), "CPUExecutionProvider"]
    assert providers[0][1]["device_id"] == 0  # the caller's list is left alone


def test_tensor_parallel_engine_opens_its_session_on_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank at local rank 1 on a host with 2 visible GPUs opens its shard on device 1, whatever device
    rank 0's providers named (the CUDA build of ONNX Runtime is not here: the session is recorded)."""
    from llamaforge.runtime.core import engine as core_engine
    from llamaforge.runtime.parallel import rank_engine

    opened: list[Any] = []

    def fake_engine_init(self: Any, engine_dir: Any, threads: Any = None, providers: Any = None, **kwargs: Any) -> None:
        opened.append(providers)
        raise RuntimeError("recorded")  # stop before a session is made

    class World:
        rank, size, local_rank = 1, 2, 1

    monkeypatch.setattr(rank_engine, "read_manifest", lambda d: type("M", (), {"tensor_parallel": type(
        "T", (), {"size": 2, "vocab_shards": [[0, 1], [1, 2]]})()})())
    monkeypatch.setattr(rank_engine.collective, "bind_world", lambda world: None)
    monkeypatch.setattr(core_engine.Engine, "__init__", fake_engine_init)
    monkeypatch.setattr(rank_engine, "visible_gpu_count", lambda: 2)
    with pytest.raises(RuntimeError, match="recorded"):
        rank_engine.TensorParallelEngine("engine", World(), 1, [("CUDAExecutionProvider", {"device_id": 0}),
                                                                 "CPUExecutionProvider"])
    assert opened == [[("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]]


def test_spawned_ranks_are_told_rank_0s_device_kind() -> None:
    from llamaforge.runtime.parallel.rank_engine import spawn_args

    assert spawn_args("/e", 2, 30.0)[-1] == "cpu" and spawn_args("/e", 2, 30.0, "gpu")[-1] == "gpu"
    with pytest.raises(EngineError, match="CUDAExecutionProvider"):  # the CPU-only onnxruntime here
        ort_providers("gpu")


def test_placement_imports_no_torch() -> None:
    import subprocess

    code = ("import sys; import llamaforge.runtime.parallel.placement, llamaforge.runtime.parallel.rank_engine; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
