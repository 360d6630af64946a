"""A tensor-parallel engine served by `mpiexec -n 2 llamaforge serve` over loopback TCP, driven by the
stock tritonclient over gRPC: greedy output identical to the TP=1 engine, and a rank killed mid-run
ends the requests in flight UNAVAILABLE, never hangs, and leaves rank 0 answering health and
metadata (not ready).

The TP engine comes from tests/helpers/tp_engines.py `tp_engine` (the one switch between the real
`llamaforge build --tp 2` and a replicated stand-in, see there)."""

from __future__ import annotations

import os
import queue
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import tritonclient.grpc as grpcclient
from server_process import http_call, serve_process
from server_utils import text_inputs, token_inputs
from tp_engines import tp_engine
from tritonclient.utils import InferenceServerException

from llamaforge.runtime.core.engine_core import CoreConfig, EngineCore, run_to_completion
from llamaforge.runtime.core.requests import GenerationRequest

MPIEXEC = str(Path(sys.executable).parent / "mpiexec")
# MPICH's TCP path on loopback, as between hosts: the OFI netmod's tcp provider on `lo`, and no
# shared memory between the two local ranks (NOLOCAL). DEBUG_SUMMARY makes rank 0 print the
# provider it chose, which the test checks.
LOOPBACK_TCP = {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": "lo",
                "MPIR_CVAR_NOLOCAL": "1", "MPIR_CVAR_DEBUG_SUMMARY": "1", "OMP_NUM_THREADS": "1"}
# Rank 0 on a hydra proxy of its own (two names for this host): a proxy that reaps a rank killed by a
# signal SIGKILLs the other ranks it launched, even under -disable-auto-cleanup (docs/tensor_parallel.md).
LAUNCHER = (MPIEXEC, "-disable-auto-cleanup", "-launcher", "fork", "-hosts", "127.0.0.1,localhost", "-n", "2")
PROMPTS = [[5, 9, 33, 2, 17], list(range(40, 77)), [300, 12, 12, 99, 4, 8, 400, 21, 7]]


@pytest.fixture(scope="module")
def tp2_engine(tiny_builds: Any, tiny_hf_checkpoint: Path) -> Path:
    return tp_engine(tiny_builds, tiny_hf_checkpoint, size=2)


def tp1_greedy(engine: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    core = EngineCore(engine, CoreConfig(threads=1))
    try:
        outs = run_to_completion(core, [GenerationRequest(f"r{i}", p, max_tokens) for i, p in enumerate(prompts)])
    finally:
        core.stop()
    return [o.token_ids for o in outs]


def test_tp2_served_over_loopback_tcp_equals_tp1(tiny_engine: Path, tp2_engine: Path) -> None:
    expected = tp1_greedy(tiny_engine, PROMPTS, 24)
    with serve_process(tp2_engine, "--threads", "1", env=LOOPBACK_TCP, launcher=LAUNCHER) as server:
        assert "libfabric provider: tcp - 127.0.0.1/32" in server.output()  # MPI's traffic goes over TCP
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert client.is_server_ready()
        results: queue.Queue[tuple[int, Any]] = queue.Queue()
        for i, prompt in enumerate(PROMPTS):  # concurrent: the ranks run them in one batch
            client.async_infer("tensorrt_llm", token_inputs(prompt, 24),
                               callback=lambda result, error, i=i: results.put((i, result if error is None else error)))
        got: dict[int, list[int]] = {}
        for _ in PROMPTS:
            i, r = results.get(timeout=120)
            assert not isinstance(r, Exception), r
            ids = [int(t) for t in r.as_numpy("output_ids").reshape(-1)]  # prompt + output, as TensorRT-LLM's
            got[i] = ids[len(PROMPTS[i]) : int(r.as_numpy("sequence_length").reshape(-1)[0])]
        assert [got[i] for i in range(len(PROMPTS))] == expected
        text = client.infer("ensemble", text_inputs("def main(", 8)).as_numpy("text_output")[0]
        assert isinstance(text, bytes) and text  # the text model too (the tokenizer from the top level)


def _rank_pid(output: str, rank: int) -> int:
    m = re.search(rf"tensor-parallel rank {rank} of \d+ \(pid (\d+)\)", output)
    assert m is not None, output
    return int(m.group(1))


@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_rank_1_lost_mid_run_ends_requests_unavailable_and_rank_0_answers_not_ready(tp2_engine: Path,
                                                                                   kill: signal.Signals) -> None:
    """SIGKILL: hydra tells rank 0 at once (SIGUSR1). SIGSTOP (a hung rank, nothing tells): the step's
    collective gives up at --tp-timeout."""
    with serve_process(tp2_engine, "--threads", "1", "--tp-timeout", "5", env=LOOPBACK_TCP,
                       launcher=LAUNCHER, exit_status=None) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        events: queue.Queue[tuple[str, Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: events.put(("", result, error)))
        for i, prompt in enumerate(PROMPTS):
            client.async_stream_infer("tensorrt_llm", token_inputs(prompt, 400, streaming=True), request_id=f"q{i}")
        seen: dict[str, int] = {}
        while len(seen) < len(PROMPTS):  # every request is under way
            _, r, e = events.get(timeout=60)
            assert e is None, e.message()
            seen[r.get_response().id] = seen.get(r.get_response().id, 0) + 1
        rank1 = _rank_pid(server.output(), 1)
        os.kill(rank1, kill)
        killed = time.monotonic()
        ended: dict[str, str] = {}
        while len(ended) < len(PROMPTS):
            _, r, e = events.get(timeout=60)  # bounded: a hang fails here
            if e is not None:
                rid = re.search(r"request id '(q\d)'", e.message())
                assert rid is not None, e.message()
                ended[rid.group(1)] = e.message()
            elif r.get_response().parameters["triton_final_response"].bool_param:
                ended[r.get_response().id] = "completed"
        waited = time.monotonic() - killed
        client.stop_stream()
        failed = [m for m in ended.values() if m != "completed"]
        assert failed, f"every request had finished before rank 1 died: {ended}"
        assert all("unavailable" in m for m in failed), ended
        assert waited < (3 if kill == signal.SIGKILL else 5 + 5), f"the requests in flight took {waited:.1f} s to end"
        # Rank 0 keeps answering health and metadata, not ready; new requests are refused UNAVAILABLE.
        assert not client.is_server_ready()
        assert not client.is_model_ready("ensemble")
        assert client.is_server_live()
        assert client.get_server_metadata().name == "llama-forge"
        assert client.get_model_metadata("tensorrt_llm").name == "tensorrt_llm"
        with pytest.raises(InferenceServerException) as refused:
            client.infer("tensorrt_llm", token_inputs(PROMPTS[0], 4))
        assert refused.value.status() == str(grpc.StatusCode.UNAVAILABLE)
        assert http_call(f"{server.root_url}/v2/health/ready")[0] == 503
        assert http_call(f"{server.root_url}/v2/health/live")[0] == 200
        status, body, _ = http_call(f"{server.base_url}/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 503, body
        assert "tensor-parallel engine unavailable" in server.output()
        if kill == signal.SIGSTOP:
            os.kill(rank1, signal.SIGKILL)
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=60)  # rank 0 drains and exits: mpiexec ends
