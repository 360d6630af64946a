"""The OpenAI-compatible HTTP app in process (Starlette's TestClient) over the fake core: its routes,
response schema, and every error path (runtime/serving/openai_server.py, openai_protocol.py)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
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


def _eventually(condition: Callable[[], object], seconds: float) -> bool:
    """Polls `condition` until it is true or `seconds` pass; its last truth value."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(condition())


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
    assert r["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9,  # BOS + 5 bytes
                          "prompt_tokens_details": {"cached_tokens": 0}}
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
    assert req.min_tokens == 0
    client.post("/v1/completions", json={"model": MODEL, "prompt": "ab", "max_tokens": 5, "min_tokens": 5})
    assert core.submitted[-1].min_tokens == 5  # vLLM's extension
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
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "n": 0}, "n"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "n": 2, "best_of": 3}, "best_of"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "best_of": 2}, "best_of"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "frequency_penalty": -3}, "frequency_penalty"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "frequency_penalty": "1"}, "frequency_penalty"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "logit_bias": {"five": 1}}, "logit_bias"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "logit_bias": {"5000": 1}}, "logit_bias"),  # outside the vocab
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "logit_bias": [5, 1]}, "logit_bias"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "min_p": 1.5}, "min_p"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "suffix": "end"}, "suffix"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "logprobs": 21}, "logprobs"),  # OpenAI's bound on alternatives
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "logprobs": -1}, "logprobs"),
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
    (_CHAT, {"model": MODEL, "messages": _MSGS, "response_format": {"type": "xml"}}, "response_format.type"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "response_format": "json"}, "response_format"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
        "schema": {}}}}, "response_format.json_schema.name"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "strict": "yes"}}}, "response_format.json_schema.strict"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": []}}}, "response_format.json_schema.schema"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "response_format": {"type": "json_object", "schema": {}}},
     "response_format.schema"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "structured_outputs": {"regex": "a", "grammar": "b"}},
     "structured_outputs"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "structured_outputs": {"choice": ["a"]}}, "structured_outputs.choice"),
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "structured_outputs": {"regex": 5}}, "structured_outputs.regex"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "response_format": {"type": "json_object"},
             "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "top_logprobs": 0}, "top_logprobs"),  # needs logprobs
    (_CHAT, {"model": MODEL, "messages": _MSGS, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "presence_penalty": -2.1}, "presence_penalty"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "logprobs": 1}, "logprobs"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "max_completion_tokens": -1}, "max_completion_tokens"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "n": "3"}, "n"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "echo": True}, "echo"),  # completions only
    (_COMPLETION, {"model": MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    (_CHAT, {"model": MODEL, "messages": _MSGS, "min_tokens": -1}, "min_tokens"),
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
                                       "min_p": 0.0, "response_format": {"type": "text"},
                                       "stream": False, "logprobs": None, "echo": False})
    assert r.status_code == 200, r.text


def test_structured_output_parameters_reach_the_core(app: tuple[TestClient, FakeCore, OpenAIFrontend]) -> None:
    """response_format (json_schema, json_object), vLLM's structured_outputs for a regex or a
    grammar: each becomes the core's GuidedSpec, naming the field its errors will name (chat parses
    them with the same code: tests/serving/test_openai_chat.py)."""
    from llamaforge.runtime.core.guided import GuidedSpec

    client, core, _ = app
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases: list[tuple[str, dict[str, Any], GuidedSpec | None]] = [
        (_COMPLETION, {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema,
                                                                                  "strict": True}}},
         GuidedSpec("json_schema", json.dumps(schema), field="response_format")),
        (_COMPLETION, {"response_format": {"type": "json_object"}},
         GuidedSpec("json_schema", '{"type": "object"}', field="response_format")),
        (_COMPLETION, {"response_format": {"type": "text"}}, None),
        (_COMPLETION, {"structured_outputs": {"regex": "[0-9]+"}},
         GuidedSpec("regex", "[0-9]+", field="structured_outputs.regex")),
        (_COMPLETION, {"structured_outputs": {"grammar": 'root ::= "a"'}},
         GuidedSpec("ebnf_grammar", 'root ::= "a"', field="structured_outputs.grammar")),
        (_COMPLETION, {"structured_outputs": {"json": schema}},
         GuidedSpec("json_schema", json.dumps(schema), field="structured_outputs.json")),
    ]
    for path, extra, want in cases:
        body = {"model": MODEL, **({"messages": _MSGS} if path == _CHAT else {"prompt": "hi"}), **extra}
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        assert core.submitted[-1].guided == want, extra


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

    from llamaforge.runtime.serving.openai_server import HttpServer

    core = FakeCore(model_name=MODEL, step_s=0.05)  # 100 tokens: 5 s unless cancelled
    core.start()
    http = HttpServer(OpenAIFrontend(core), "127.0.0.1", 0).start()
    try:
        body = json.dumps({"model": MODEL, "prompt": "x" * 100, "max_tokens": 100}).encode()
        with socket.create_connection(("127.0.0.1", http.port), timeout=10) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            assert _eventually(lambda: core.submitted, 5)
        _eventually(lambda: core.cancelled, 2)  # well before the request would end by itself
        assert core.cancelled == [core.submitted[0].request_id]
    finally:
        http.stop()
        core.stop()


class _Finished:
    """A CoreObserver that records the requests the core has sent their final output to."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def on_first_token(self, request_id: str, ttft_s: float) -> None:
        pass

    def on_token(self, request_id: str, itl_s: float) -> None:
        pass

    def on_finished(self, request_id: str, reason: str, num_output_tokens: int) -> None:
        self.done.set()  # after the final output went to the request's sink (FakeCore._finish)


def test_a_final_output_that_arrives_during_the_disconnect_check_is_answered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A unary handler polls for its outputs and, each time a poll times out, awaits
    `request.is_disconnected()`, which yields to the event loop. An output arriving then was taken
    and booked by the getter task, whose finish emptied the run's unfinished set before the handler
    had the output: the handler's loop ended without that choice's final output, and the client got
    HTTP 500 (an IndexError). Seen once in CI on a machine at load 12-15, where the check's wait is
    long enough for it; here the check waits until the core has sent the final output."""
    import asyncio

    from starlette.requests import Request

    from llamaforge.runtime.serving import openai_server

    observer = _Finished()
    core = FakeCore(model_name=MODEL, observer=observer)
    core.hold()  # the first poll times out: nothing is generated until the check releases the core
    core.start()
    checks = []

    async def slow_check(self: Request) -> bool:
        checks.append(self.url.path)
        if len(checks) == 1:
            core.release()
            assert await asyncio.to_thread(observer.done.wait, 10)
            await asyncio.sleep(0.05)  # the loop runs what the output woke (the getter task)
        return False

    monkeypatch.setattr(openai_server, "_POLL_S", 0.01)
    monkeypatch.setattr(Request, "is_disconnected", slow_check)
    try:
        client = TestClient(OpenAIFrontend(core, ready=lambda: True).app)
        r = client.post(_COMPLETION, json={"model": MODEL, "prompt": "hello", "max_tokens": 3})
        assert checks, "the disconnect check never ran: the test did not set up the race"
        assert r.status_code == 200, r.text
        assert [(c["text"], c["finish_reason"]) for c in r.json()["choices"]] == [("hel", "length")]
    finally:
        core.release()
        core.stop()


class _BrokenBodyFrontend(OpenAIFrontend):
    async def _whole(self, request: Any, run: Any) -> Any:
        raise RuntimeError("a bug in the handler")

    async def _events(self, run: Any) -> Any:
        async for event in super()._events(run):
            yield event
            raise RuntimeError("a bug in the stream")


def test_a_handler_bug_is_a_logged_500_in_openais_schema(capsys: pytest.CaptureFixture[str]) -> None:
    """An exception no path answers: OpenAI's error body (not uvicorn's plain text), the traceback
    on the server's stderr, and the request cancelled in the core."""
    core = FakeCore(model_name=MODEL, step_s=0.05)  # 100 tokens: 5 s unless cancelled
    core.start()
    try:
        client = TestClient(_BrokenBodyFrontend(core, ready=lambda: True).app)
        r = client.post(_COMPLETION, json={"model": MODEL, "prompt": "x" * 100, "max_tokens": 100})
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["type"] == "server_error" and "RuntimeError: a bug in the handler" in error["message"]
        err = capsys.readouterr().err
        assert "POST /v1/completions failed" in err and "Traceback" in err and "a bug in the handler" in err
        assert core.submitted
        _eventually(lambda: core.cancelled, 2)  # well before the request would end by itself
        assert core.cancelled == [core.submitted[0].request_id]
    finally:
        core.stop()


def test_a_stream_bug_ends_the_stream_with_a_logged_error_event(capsys: pytest.CaptureFixture[str]) -> None:
    """Once the 200 is out, a bug ends the stream with an error event (not a cut connection), the
    traceback on the server's stderr, and the request cancelled in the core."""
    core = FakeCore(model_name=MODEL, step_s=0.05)
    core.start()
    try:
        frontend = _BrokenBodyFrontend(core, ready=lambda: True)
        client = TestClient(frontend.app)
        r = client.post(_COMPLETION, json={"model": MODEL, "prompt": "x" * 100, "max_tokens": 100, "stream": True})
        assert r.status_code == 200
        events = [json.loads(x[len("data: "):]) for x in r.text.split("\n\n") if x]
        assert len(events) == 2 and events[0]["object"] == "text_completion"
        assert events[-1]["error"]["type"] == "server_error" and "a bug in the stream" in events[-1]["error"]["message"]
        err = capsys.readouterr().err
        assert "a stream failed" in err and "Traceback" in err
        _eventually(lambda: core.cancelled, 2)
        assert core.cancelled == [core.submitted[0].request_id] and frontend.admission.in_flight == 0
    finally:
        core.stop()
