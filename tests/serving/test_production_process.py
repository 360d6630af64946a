"""The production switches through a real `llamaforge serve` process on the tiny engine: TLS with an
API key from the environment on a non-default bind address, with the stock clients; and SIGTERM, which
drains (new requests UNAVAILABLE / 503 while the admitted ones finish with all their tokens) and exits
0, or cancels what is left at the drain timeout and still exits 0. The rules one by one, in process:
tests/serving/test_production_switches.py."""

from __future__ import annotations

import queue
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import tritonclient.grpc as grpcclient
from server_process import ServerProcess, http_call, serve_process
from server_utils import is_final, text_inputs, token_inputs, wait_until
from tls_files import Pki, make_pki
from tritonclient.utils import InferenceServerException

from llamaforge.runtime.serving.admission import SHUTTING_DOWN

pytestmark = pytest.mark.slow

KEY = "process-key"
LONG = 480  # tokens per long request: the tiny engine's context is 512
REQUESTS = 8  # long requests queued on one sequence slot: several seconds of work in all


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_tls_api_key_from_the_environment_and_bind_address(tiny_engine: Path, tmp_path: Path) -> None:
    pki: Pki = make_pki(tmp_path / "pki")
    with serve_process(tiny_engine, "--host", "127.0.0.2", "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
                       env={"LLAMAFORGE_API_KEY": KEY}) as server:
        assert "TLS; API key required" in server.start_line and server.scheme == "https"
        assert server.host == "127.0.0.2" and KEY not in server.start_line
        for port in (server.grpc_port, server.http_port, server.metrics_port):  # bound to 127.0.0.2 only
            assert refused("127.0.0.1", port)
        assert server.metric("llamaforge_kv_cache_free_fraction") == 1.0  # metrics: plain HTTP

        client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=60,
                               http_client=openai.DefaultHttpxClient(verify=pki.client_context()))
        model = client.models.list().data[0].id
        r = client.completions.create(model=model, prompt="def main(", max_tokens=8, temperature=0)
        assert r.usage is not None and r.usage.completion_tokens > 0
        anonymous = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0,
                                  http_client=openai.DefaultHttpxClient(verify=pki.client_context()))
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()
        assert http_call(f"{server.root_url}/v2/health/ready", context=pki.client_context())[0] == 200

        grpc = grpcclient.InferenceServerClient(server.grpc_url, ssl=True, root_certificates=str(pki.ca))
        assert grpc.is_server_ready()  # open without the key
        headers = {"authorization": f"Bearer {KEY}"}
        out = grpc.infer("ensemble", text_inputs("def main(", 8, exclude_input_in_output=True), headers=headers)
        assert out.as_numpy("text_output")[0].decode() == r.choices[0].text  # greedy: the same text either way
        with pytest.raises(InferenceServerException) as info:
            grpc.infer("ensemble", text_inputs("def main(", 8))
        assert str(info.value.status()) == "StatusCode.UNAUTHENTICATED"
        plain = grpcclient.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException):
            plain.is_server_live()


def _start_long_stream(server: ServerProcess) -> tuple[grpcclient.InferenceServerClient, queue.Queue[Any]]:
    """REQUESTS long token-model requests on one stream (one runs, the others wait for the slot); returns
    once all are admitted (the server reads a stream's requests one by one) and the first has streamed."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for i in range(REQUESTS):
        client.async_stream_infer("tensorrt_llm", token_inputs([5, 6, 7 + i], LONG, min_tokens=LONG, streaming=True),
                                  request_id=f"long-{i}")
    wait_until(lambda: server.metric("llamaforge_prompt_tokens_total") == 3 * REQUESTS, timeout=30, interval=0.05)
    first = results.get(timeout=60)
    assert first[1] is None, first[1]
    results.put(first)  # the caller counts it
    return client, results


def _remaining_output(server: ServerProcess) -> str:
    return server.output()


def test_sigterm_refuses_new_work_lets_admitted_requests_finish_and_exits_0(tiny_engine: Path) -> None:
    with serve_process(tiny_engine, "--max-num-seqs", "1", "--kv-budget-tokens", "2048") as server:
        for port in (server.grpc_port, server.http_port, server.metrics_port):  # the default: 127.0.0.1 only
            assert refused("127.0.0.2", port)
        stream, results = _start_long_stream(server)
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: http_call(f"{server.root_url}/v2/health/ready")[0] == 503, timeout=10)

        fresh = grpcclient.InferenceServerClient(server.grpc_url)
        assert fresh.is_server_live() and not fresh.is_server_ready()
        with pytest.raises(InferenceServerException) as info:
            fresh.infer("tensorrt_llm", token_inputs([5, 6, 7], 4))
        assert str(info.value.status()) == "StatusCode.UNAVAILABLE"
        stream.async_stream_infer("tensorrt_llm", token_inputs([5, 6, 7], 4, streaming=True), request_id="late")
        status, body, _ = http_call(f"{server.base_url}/completions", {"prompt": "def", "max_tokens": 4})
        assert status == 503 and body["error"]["code"] == "shutting_down"
        refusals_done = time.monotonic()

        tokens = {f"long-{i}": 0 for i in range(REQUESTS)}
        ended: dict[str, float] = {}
        late_error = None
        while len(ended) < REQUESTS:
            result, error = results.get(timeout=120)
            if error is not None:
                assert "late" in str(error) and late_error is None, error
                late_error = error
                continue
            rid = result.get_response().id
            tokens[rid] += result.as_numpy("output_ids").size
            if is_final(result):
                ended[rid] = time.monotonic()
        stream.stop_stream()
        assert late_error is not None and SHUTTING_DOWN in str(late_error)
        assert tokens == {rid: LONG for rid in tokens}  # every admitted request whole
        # The refusals were answered while admitted requests were still running, not after the drain.
        assert sum(t > refusals_done for t in ended.values()) >= 2
        assert server.proc.wait(timeout=60) == 0
        out = _remaining_output(server)
        m = re.search(r"(\d+) request\(s\) answered, 0 cancelled; KV cache in use: 0 of", out)
        assert m is not None and int(m.group(1)) >= sum(t > refusals_done for t in ended.values()), out


def test_drain_timeout_cancels_what_is_left_and_exits_0(tiny_engine: Path) -> None:
    with serve_process(tiny_engine, "--max-num-seqs", "1", "--kv-budget-tokens", "2048",
                       "--drain-timeout", "0.5") as server:
        stream, results = _start_long_stream(server)
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
        model = client.models.list().data[0].id
        http_stream = client.completions.create(model=model, prompt="def", max_tokens=32, stream=True)  # queued
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError) as info:  # still queued at the timeout: cancelled, an error event
            for _ in http_stream:
                pass
        assert "cancelled" in str(info.value)
        cancelled, finished = set(), set()
        while len(cancelled | finished) < REQUESTS:
            result, error = results.get(timeout=60)
            if error is not None:
                assert "cancelled" in str(error), error
                cancelled.add(str(error).split("request id '")[1].rstrip("')"))
            elif is_final(result):
                finished.add(result.get_response().id)
        stream.stop_stream()
        assert server.proc.wait(timeout=30) == 0
        assert time.monotonic() - sent < 20
        out = _remaining_output(server)
        assert len(cancelled) >= 2 and not cancelled & finished
        assert f"{len(finished)} request(s) answered, {len(cancelled) + 1} cancelled" in out, out
        assert "KV cache in use: 0 of 2048 tokens" in out, out
