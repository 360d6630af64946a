"""Helpers for tests that drive the gRPC server with tritonclient (a helper module, not a test file).

    with running_server(core) as server:                # 127.0.0.1, free gRPC and metrics ports
        client = grpc_client(server)
        result = client.infer("ensemble", text_inputs("Hello", 16))
        pieces, final = stream_infer(client, "ensemble", text_inputs("Hello", 16, stream=True))
"""

from __future__ import annotations

import queue
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from llamaforge.runtime.serving.server import InferenceServer

__all__ = ["running_server", "grpc_client", "tensor", "text_inputs", "token_inputs", "stream_infer",
           "StreamResult", "scrape_metrics", "wait_until", "is_final"]


@contextmanager
def running_server(core: Any, **kwargs: Any) -> Iterator[InferenceServer]:
    """An `InferenceServer` over `core` on 127.0.0.1 with free ports (`server.port`,
    `server.metrics_port`); stopped (and the core with it) on exit."""
    kwargs.setdefault("port", 0)
    kwargs.setdefault("metrics_port", 0)
    server = InferenceServer(core, host="127.0.0.1", **kwargs).start()
    try:
        yield server
    finally:
        server.stop(grace=0)


def grpc_client(server: InferenceServer) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")


def tensor(name: str, value: Any, dtype: Any = None) -> grpcclient.InferInput:
    """An InferInput from a value; scalars and strings get TRT-LLM clients' [1, 1] shape."""
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    if arr.dtype.kind in "US":
        arr = arr.astype(np.object_)
    datatype = "BYTES" if arr.dtype == np.object_ else np_to_triton_dtype(arr.dtype)
    t = grpcclient.InferInput(name, list(arr.shape), datatype)
    t.set_data_from_numpy(arr)
    return t


def text_inputs(prompt: str | bytes, max_tokens: int, **extra: Any) -> list[grpcclient.InferInput]:
    """Inputs for the text model as TRT-LLM's end_to_end_grpc_client sends them ([[prompt]], [[n]])."""
    p = prompt.encode("utf-8") if isinstance(prompt, str) else prompt
    inputs = [tensor("text_input", np.array([[p]], dtype=np.object_)),
              tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32))]
    for name, value in extra.items():
        if isinstance(value, bool):
            inputs.append(tensor(name, np.array([[value]], dtype=bool)))
        elif isinstance(value, int):
            inputs.append(tensor(name, np.array([[value]], dtype=np.uint64 if name == "seed" else np.int32)))
        elif isinstance(value, float):
            inputs.append(tensor(name, np.array([[value]], dtype=np.float32)))
        elif isinstance(value, (list, tuple)):
            inputs.append(tensor(name, np.array([[w.encode("utf-8") for w in value]], dtype=np.object_)))
        else:
            inputs.append(value)
    return inputs


def token_inputs(ids: list[int], max_tokens: int, **extra: Any) -> list[grpcclient.InferInput]:
    """Inputs for the token model as TRT-LLM's inflight_batcher_llm_client sends them."""
    inputs = [tensor("input_ids", np.array([ids], dtype=np.int32)),
              tensor("input_lengths", np.array([[len(ids)]], dtype=np.int32)),
              tensor("request_output_len", np.array([[max_tokens]], dtype=np.int32))]
    for name, value in extra.items():
        if isinstance(value, bool):
            inputs.append(tensor(name, np.array([[value]], dtype=bool)))
        elif isinstance(value, int):
            inputs.append(tensor(name, np.array([[value]], dtype=np.int32)))
        elif isinstance(value, float):
            inputs.append(tensor(name, np.array([[value]], dtype=np.float32)))
        else:
            inputs.append(value)
    return inputs


def is_final(result: Any) -> bool:
    params = result.get_response().parameters
    return FINAL in params and params[FINAL].bool_param


FINAL = "triton_final_response"


class StreamResult:
    """What a stream delivered for the requests sent on it: results and errors in arrival order."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, InferenceServerException | None]] = []

    @property
    def results(self) -> list[Any]:
        return [r for r, e in self.items if e is None]

    @property
    def errors(self) -> list[InferenceServerException]:
        return [e for _, e in self.items if e is not None]

    def for_id(self, request_id: str) -> list[Any]:
        return [r for r in self.results if r.get_response().id == request_id]

    def text(self, request_id: str | None = None) -> bytes:
        rs = self.results if request_id is None else self.for_id(request_id)
        return b"".join(r.as_numpy("text_output")[0] for r in rs if r.as_numpy("text_output") is not None)


def stream_infer(client: grpcclient.InferenceServerClient, model: str,
                 requests: list[tuple[str, list[grpcclient.InferInput]]] | list[grpcclient.InferInput],
                 timeout: float = 30.0, **kwargs: Any) -> StreamResult:
    """Send requests ((id, inputs) pairs, or one list of inputs) on one stream, wait for every final
    response or error, close the stream."""
    if requests and isinstance(requests[0], grpcclient.InferInput):
        requests = [("", requests)]  # type: ignore[list-item]
    q: queue.Queue[tuple[Any, Any]] = queue.Queue()
    out = StreamResult()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    try:
        for rid, inputs in requests:  # type: ignore[misc]
            client.async_stream_infer(model, inputs, request_id=rid, **kwargs)
        pending = len(requests)
        deadline = time.monotonic() + timeout
        while pending:
            result, error = q.get(timeout=max(0.01, deadline - time.monotonic()))
            out.items.append((result, error))
            if error is not None or is_final(result):
                pending -= 1
    finally:
        client.stop_stream()
    return out


def scrape_metrics(server: InferenceServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode("utf-8")


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(interval)


def inflight_batcher_client_inputs(ids: list[int], output_len: int, *, streaming: bool, end_id: int, pad_id: int,
                                   **flags: bool | int) -> list[grpcclient.InferInput]:
    """What tensorrtllm_backend's inflight_batcher_llm_client.py prepare_inputs sends, with its
    defaults (top_k 1, top_p 0, temperature 1.0, beam width 1), plus optional inputs it adds per
    flag: `flags` maps an input name to its [[value]] (return_perf_metrics=True, num_return_sequences=1)."""
    inputs = {
        "input_ids": np.array([ids], dtype=np.int32),
        "input_lengths": np.array([[len(ids)]], dtype=np.int32),
        "request_output_len": np.array([[output_len]], dtype=np.int32),
        "beam_width": np.array([[1]], dtype=np.int32),
        "temperature": np.array([[1.0]], dtype=np.float32),
        "streaming": np.array([[streaming]], dtype=bool),
        "end_id": np.array([[end_id]], dtype=np.int32),
        "pad_id": np.array([[pad_id]], dtype=np.int32),
        "runtime_top_k": np.array([[1]], dtype=np.int32),
        "runtime_top_p": np.array([[0.0]], dtype=np.float32),
    }
    for name, value in flags.items():
        inputs[name] = np.array([[value]], dtype=bool if isinstance(value, bool) else np.int32)
    return [tensor(name, value) for name, value in inputs.items()]
