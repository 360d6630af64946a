"""The OpenAI-compatible HTTP app in process (Starlette's TestClient) over the fake core: its routes,
response schema, and every error path (runtime/serving/openai_server.py, openai_protocol.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fake_core import FakeConfig, FakeCore
from starlette.testclient import TestClient

from llamaforge.runtime.core.requests import GenerationRequest
from llamaforge.runtime.serving.openai_server import OpenAIFrontend

MODEL = "fake-echo"


@pytest.fixture()
def app() -> Iterator[tuple[TestClient, FakeCore, OpenAIFrontend]]:
    core = FakeCore(FakeConfig(max_num_seqs=2, max_queue=2), context_length=64, model_name=MODEL)
    core.start()
    frontend = OpenAIFrontend(core, max_body_bytes=4096)
    frontend.start_serving()
    try:
        with TestClient(frontend.app) as client:
            yield client, core, frontend
    finally:
        core.release()
        core.stop()


def _events(text: str) -> list[Any]:
    """The `data:` payloads of an SSE body, JSON-decoded except the final [DONE]."""
    lines = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert text.endswith("\n\n") and all(line.startswith("data: ") for line in text.split("\n\n") if line)
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_health_models_and_readiness(app: tuple[TestClient, FakeCore, OpenAIFrontend]) -> None:
    client, _, frontend = app
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert client.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    missing = client.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    frontend.stop_serving()
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get("/v2/health/live").status_code == 200
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
    assert r.status_code == 503
    assert r.json()["error"] == {"message": "the server is not ready", "type": "service_unavailable", "param": None,
                                 "code": "not_ready"}


def test_completion_schema_echo_logprobs_and_prompt_forms(app: tuple[TestClient, FakeCore, OpenAIFrontend]) -> None:
    client, core, _ = app
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 3, "user": "u1"}).json()
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-") and r["model"] == MODEL
    assert isinstance(r["created"], int)
    assert r["choices"] == [{"index": 0, "text": "hel", "finish_reason": "length", "logprobs": None}]
    assert r["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9}  # BOS + 5 bytes
    # A list of prompts (text and token ids): one choice each, usage summed; echo prepends the prompt.
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": [[104, 105], "yo"], "echo": True}).json()
    assert [(c["index"], c["text"], c["finish_reason"]) for c in r["choices"]] == [(0, "hihi", "stop"),
                                                                                   (1, "yoyo", "stop")]
    assert r["usage"]["prompt_tokens"] == 2 + 3
    # logprobs 0: the sampled tokens' log probabilities, with their text offsets.
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "ab", "logprobs": 0}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b"] and lp["token_logprobs"] == [-0.5, -0.5] and lp["text_offset"] == [0, 1]
    assert core.submitted[-1].return_log_probs


def test_completion_parameters_reach_the_core(app: tuple[TestClient, FakeCore, OpenAIFrontend]) -> None:
    client, core, _ = app
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "abcdef", "stop": "cd", "seed": 3,
                                             "temperature": 0.5, "top_p": 0.9, "max_tokens": 5})
    assert r.json()["choices"][0]["text"] == "ab" and r.json()["choices"][0]["finish_reason"] == "stop"
    req = core.submitted[-1]
    assert req.stop_words == ("cd",) and req.max_tokens == 5
    assert (req.sampling.seed, req.sampling.temperature, req.sampling.top_p) == (3, 0.5, 0.9)
    # Defaults: OpenAI's temperature 1 and top_p 1; max_tokens whatever the context leaves (vLLM's).
    client.post("/v1/completions", json={"model": MODEL, "prompt": "ab", "stop": ["x", ""]})
    req = core.submitted[-1]
    assert (req.sampling.temperature, req.sampling.top_p, req.max_tokens, req.stop_words) == (1.0, 1.0, 64 - 3, ("x",))


def test_chat_needs_a_chat_template(app: tuple[TestClient, FakeCore, OpenAIFrontend]) -> None:
    client, _, _ = app
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "no chat template" in r.json()["error"]["message"]


def test_streaming_chunks_concatenate_to_the_unary_text(app: tuple[TestClient, FakeCore, OpenAIFrontend]) -> None:
    client, _, _ = app
    body = {"model": MODEL, "prompt": "héllo wörld", "max_tokens": 40}
    whole = client.post("/v1/completions", json=body).json()
    r = client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = _events(r.text)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    # Without include_usage no chunk carries usage.
    plain = _events(client.post("/v1/completions", json={**body, "stream": True}).text)
    assert all("usage" not in c for c in plain)


def _bad(client: TestClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
    return error


_COMPLETION = "/v1/completions"
_CHAT = "/v1/chat/completions"
_MSGS = [{"role": "user", "content": "hi"}]

BAD_INPUTS = [
    (_COMPLETION, {"prompt": "hi"}, "model"),  # no model
    (_COMPLETION, {"model": MODEL}, "prompt"),
    (_COMPLETION, {"model": MODEL, "prompt": []}, "prompt"),
    (_COMPLETION, {"model": MODEL, "prompt": [1.5]}, "prompt"),
    (_COMPLETION, {"model": MODEL, "prompt": [5000]}, "input_ids"),  # outside the vocabulary
    (_COMPLETION, {"model": MODEL, "prompt": "x" * 70}, "prompt"),  # over the context
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "max_tokens": 100}, "max_tokens"),  # prompt + max > context
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "max_tokens": "3"}, "max_tokens"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "temperature": 2.5}, "temperature"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "temperature": "hot"}, "temperature"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "stop": 3}, "stop"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "seed": 1.5}, "seed"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "seed": -1}, "seed"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "stream": "yes"}, "stream"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "stream": True, "stream_options": {"x": 1}}, "stream_options.x"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "n": 2}, "n"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "best_of": 2}, "best_of"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "frequency_penalty": 1}, "frequency_penalty"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 10}}, "logit_bias"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "suffix": "end"}, "suffix"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "logprobs": 2}, "logprobs"),  # top alternatives
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "logprobs": 0, "echo": True}, "echo"),  # prompt logprobs
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "user": 5}, "user"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "top_k": 5}, "top_k"),  # not OpenAI's: refused, not ignored
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "max_completion_tokens": 5}, "max_completion_tokens"),
    (_CHAT, {"model": MODEL}, "messages"),
    (_CHAT, {"model": MODEL, "messages": []}, "messages"),
    (_CHAT, {"model": MODEL, "messages": ["hi"]}, "messages[0]"),
    (_CHAT, {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    (_CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    (_CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]"),
    (_CHAT, {"model": MODEL, "messages": [{"role": "assistant", "content": None, "tool_calls": []}]},
     "messages[0].tool_calls"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "tool_choice": "auto"}, "tool_choice"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "response_format": {"type": "json_object"}}, "response_format"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "top_logprobs": 0}, "top_logprobs"),  # needs logprobs
    (_CHAT, {"model": MODEL, "messages": _MSGS, "logprobs": True, "top_logprobs": 3}, "top_logprobs"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "logprobs": 1}, "logprobs"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "max_completion_tokens": -1}, "max_completion_tokens"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "n": 3}, "n"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "echo": True}, "echo"),  # completions only
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_INPUTS, ids=[f"{'chat' if p == _CHAT else 'completion'}-{x}" for p, _, x in BAD_INPUTS])
def test_bad_input_is_400_naming_the_parameter(app: tuple[TestClient, FakeCore, OpenAIFrontend], path: str,
                                               body: dict[str, Any], param: str) -> None:
    client, core, _ = app
    error = _bad(client, path, body)
    assert error["param"] == param, error
    assert error["message"].startswith(param), error
    assert core.submitted == []  # nothing reached the core


def test_values_that_mean_the_default_are_accepted(app: tuple[TestClient, FakeCore, OpenAIFrontend]) -> None:
    client, _, _ = app
    r = client.post(_COMPLETION, json={"model": MODEL, "prompt": "hi", "n": 1, "best_of": 1, "presence_penalty": 0,
                                       "frequency_penalty": 0.0, "logit_bias": {}, "suffix": "", "user": "me",
                                       "stream": False, "logprobs": None, "echo": False})
    assert r.status_code == 200, r.text


def test_validation_messages_are_the_grpc_ones(app: tuple[TestClient, FakeCore, OpenAIFrontend]) -> None:
    """The prompt / max_tokens / context checks are runtime/core/validation.py's, as for gRPC."""
    from llamaforge.runtime.core.requests import RequestError
    from llamaforge.runtime.core.validation import RequestLimits, check_context, check_max_tokens

    client, _, _ = app
    with pytest.raises(RequestError) as want:
        check_max_tokens(0, "max_tokens")
    assert _bad(client, _COMPLETION, {"model": MODEL, "prompt": "hi", "max_tokens": 0})["message"] == str(want.value)
    with pytest.raises(RequestError) as want:
        check_context(3, 100, RequestLimits(64, 258), "prompt", "max_tokens")
    assert _bad(client, _COMPLETION, {"model": MODEL, "prompt": "hi", "max_tokens": 100})["message"] == str(want.value)


def test_body_errors(app: tuple[TestClient, FakeCore, OpenAIFrontend]) -> None:
    client, core, _ = app
    r = client.post(_COMPLETION, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None
    assert client.post(_COMPLETION, json=[1, 2]).status_code == 400
    big = client.post(_COMPLETION, json={"model": MODEL, "prompt": "x" * 5000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    # Without Content-Length (chunked), the limit holds as the body is read.
    chunked = client.post(_COMPLETION, content=iter([b'{"model": "fake-echo", "prompt": "', b"x" * 5000, b'"}']))
    assert chunked.status_code == 413
    unknown = client.post(_COMPLETION, json={"model": "gpt-4", "prompt": "hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    assert client.get("/v1/nothing").status_code == 404 and "error" in client.get("/v1/nothing").json()
    assert client.get(_COMPLETION).status_code == 405
    assert core.submitted == []


def test_queue_full_is_429_and_queues_nothing(app: tuple[TestClient, FakeCore, OpenAIFrontend]) -> None:
    client, core, _ = app
    core.hold()
    for i in range(2):  # the fake's waiting queue holds 2
        core.submit(GenerationRequest(f"filler-{i}", [104], 1))
    r = client.post(_COMPLETION, json={"model": MODEL, "prompt": ["a", "b"]})
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
    assert [q.request_id for q in core.submitted] == ["filler-0", "filler-1"]
    core.release()


def test_default_max_tokens_is_what_the_context_and_kv_cache_leave() -> None:
    core = FakeCore(FakeConfig(kv_budget_tokens=32), context_length=64, model_name=MODEL)
    core.start()
    try:
        client = TestClient(OpenAIFrontend(core, ready=lambda: True).app)
        assert client.post(_COMPLETION, json={"model": MODEL, "prompt": "ab"}).status_code == 200
        assert core.submitted[-1].max_tokens == 32 - 3
        error = _bad(client, _COMPLETION, {"model": MODEL, "prompt": "ab", "max_tokens": 40})
        assert error["param"] == "max_tokens" and "KV cache" in error["message"]
    finally:
        core.stop()


class _FailingCore(FakeCore):
    """Every request fails in the engine on its first step."""

    def _step(self, r: Any) -> None:
        self._finish(r, "error")


def test_an_engine_failure_is_500_or_an_error_event() -> None:
    core = _FailingCore(model_name=MODEL)
    core.start()
    try:
        client = TestClient(OpenAIFrontend(core, ready=lambda: True).app)
        r = client.post(_COMPLETION, json={"model": MODEL, "prompt": "ab"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        r = client.post(_COMPLETION, json={"model": MODEL, "prompt": "ab", "stream": True})
        events = [json.loads(x[len("data: "):]) for x in r.text.split("\n\n") if x]
        assert events[-1]["error"]["type"] == "server_error"  # and no [DONE]: the stream failed
    finally:
        core.stop()


def test_a_unary_client_that_disconnects_is_cancelled() -> None:
    """Over uvicorn (HttpServer, a free port): the client of a unary request closes its connection
    while the core is still generating; the request is cancelled in the core."""
    import socket
    import time

    from llamaforge.runtime.serving.openai_server import HttpServer

    core = FakeCore(model_name=MODEL, step_s=0.05)  # 100 tokens: 5 s unless cancelled
    core.start()
    http = HttpServer(OpenAIFrontend(core), "127.0.0.1", 0).start()
    try:
        body = json.dumps({"model": MODEL, "prompt": "x" * 100, "max_tokens": 100}).encode()
        with socket.create_connection(("127.0.0.1", http.port), timeout=10) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            deadline = time.monotonic() + 5
            while not core.submitted and time.monotonic() < deadline:
                time.sleep(0.01)
            assert core.submitted
        deadline = time.monotonic() + 2  # well before the request would end by itself
        while not core.cancelled and time.monotonic() < deadline:
            time.sleep(0.01)
        assert core.cancelled == [core.submitted[0].request_id]
    finally:
        http.stop()
        core.stop()
