"""The production switches of `llamaforge serve` in process, over the fake core: TLS (and mutual TLS) on
gRPC and HTTP with stock clients, the API key on both, the drain (refusals while the admitted requests
finish, cancellation at the timeout), and the settings' errors (runtime/serving/security.py,
admission.py, server.py, openai_server.py). tests/serving/test_production_process.py runs the same
switches through a real `llamaforge serve` process and its signals."""

from __future__ import annotations

import queue
import ssl
import threading
import time
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import tritonclient.grpc as grpcclient
from cryptography.hazmat.primitives import serialization
from fake_core import FakeConfig, FakeCore
from server_process import http_call
from server_utils import is_final, text_inputs, wait_until
from tls_files import Pki, make_pki, make_self_signed
from tritonclient.utils import InferenceServerException

from llamaforge.cli import main
from llamaforge.runtime.serving.admission import SHUTTING_DOWN, Admission
from llamaforge.runtime.serving.openai_server import HttpServer, OpenAIFrontend
from llamaforge.runtime.serving.security import (
    API_KEY_ENV,
    MISSING_KEY,
    WRONG_KEY,
    TlsConfig,
    bearer_matches,
    load_tls,
    resolve_api_key,
)
from llamaforge.runtime.serving.server import InferenceServer

MODEL = "fake-echo"
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Stack:
    core: FakeCore
    server: InferenceServer
    http: HttpServer
    tls: TlsConfig | None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def root_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http.port}"


@contextmanager
def serving(tls: TlsConfig | None = None, api_key: str | None = None, step_s: float = 0.001) -> Iterator[Stack]:
    """What serve() runs, in process: the gRPC server and the HTTP front end on one fake core, sharing
    the admission gate, on free ports of 127.0.0.1."""
    core = FakeCore(FakeConfig(max_num_seqs=4, max_queue=16), context_length=256, step_s=step_s, model_name=MODEL)
    server = InferenceServer(core, "127.0.0.1", 0, None, tls=tls, api_key=api_key).start()
    http = None
    try:
        frontend = OpenAIFrontend(core, ready=lambda: server.servicer.ready, admission=server.admission,
                                  api_key=api_key)
        http = HttpServer(frontend, "127.0.0.1", 0, tls=tls).start()
        yield Stack(core, server, http, tls)
    finally:
        core.release()
        if http is not None:
            http.stop()
        server.stop(grace=0)


def grpc_status(call: Any) -> str:
    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status())


def ask(prompt: str, max_tokens: int, **extra: Any) -> list[grpcclient.InferInput]:
    """The text model's inputs, answering only the new text (the fake core echoes the prompt)."""
    return text_inputs(prompt, max_tokens, exclude_input_in_output=True, **extra)


def send_on_refused_stream(client: grpcclient.InferenceServerClient, inputs: list[grpcclient.InferInput]) -> None:
    """Send on a stream the server refuses as a whole: its status reaches the callback, and once it
    has, tritonclient refuses to send on the stream ("no longer in valid state")."""
    try:
        client.async_stream_infer("ensemble", inputs)
    except InferenceServerException as e:
        assert "no longer in valid state" in str(e)


def prompts(core: FakeCore) -> list[str]:
    """The prompts that reached the core, in order."""
    return [core.tokenizer.decode(r.prompt_ids) for r in core.submitted]


def completion(prompt: str, max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, **extra}


# -- TLS -----------------------------------------------------------------------------------------------

def test_tls_serves_stock_clients_and_refuses_plaintext_and_untrusted_ones(pki: Pki) -> None:
    tls = load_tls(pki.cert, pki.key)
    with serving(tls=tls) as s:
        secure = grpcclient.InferenceServerClient(s.grpc_url, ssl=True, root_certificates=str(pki.ca))
        assert secure.is_server_live()
        r = secure.infer("ensemble", ask("over tls", 8))
        assert r.as_numpy("text_output")[0] == b"over tls"  # the fake core echoes the prompt
        plain = grpcclient.InferenceServerClient(s.grpc_url)
        assert grpc_status(plain.is_server_live) == "StatusCode.UNAVAILABLE"
        untrusted = grpcclient.InferenceServerClient(s.grpc_url, ssl=True, root_certificates=str(pki.other_ca))
        assert grpc_status(untrusted.is_server_live) == "StatusCode.UNAVAILABLE"

        status, body, _ = http_call(f"{s.root_url}/v1/completions", completion("https"), context=pki.client_context())
        assert status == 200 and body["choices"][0]["text"] == "https"
        client = openai.OpenAI(base_url=f"{s.root_url}/v1", api_key="unused", max_retries=0,
                               http_client=openai.DefaultHttpxClient(verify=pki.client_context()))
        assert client.completions.create(model=MODEL, prompt="official", max_tokens=8).choices[0].text == "official"
        with pytest.raises(urllib.error.URLError) as info:  # the other CA did not sign the server's certificate
            http_call(f"{s.root_url}/v2/health/live", context=ssl.create_default_context(cafile=str(pki.other_ca)))
        assert isinstance(info.value.reason, ssl.SSLCertVerificationError)
        plain_url = f"http://127.0.0.1:{s.http.port}/v2/health/live"
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # the server expects a TLS handshake
            http_call(plain_url)
        assert prompts(s.core) == ["over tls", "https", "official"]


def test_a_self_signed_pair_made_here_serves_both_ports(tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path)
    with serving(tls=load_tls(cert, key)) as s:
        client = grpcclient.InferenceServerClient(s.grpc_url, ssl=True, root_certificates=str(cert))
        assert client.infer("ensemble", ask("self-signed", 16)).as_numpy("text_output")[0] == b"self-signed"
        status, body, _ = http_call(f"{s.root_url}/v1/completions", completion("self-signed", 16),
                                    context=ssl.create_default_context(cafile=str(cert)))
        assert status == 200 and body["choices"][0]["text"] == "self-signed"
        with pytest.raises(urllib.error.URLError) as info:  # the system's roots do not include it
            http_call(f"{s.root_url}/v2/health/live", context=ssl.create_default_context())
        assert isinstance(info.value.reason, ssl.SSLCertVerificationError)


def test_mutual_tls_requires_a_client_certificate_signed_by_the_client_ca(pki: Pki) -> None:
    tls = load_tls(pki.cert, pki.key, pki.ca)
    with serving(tls=tls) as s:
        with_cert = grpcclient.InferenceServerClient(s.grpc_url, ssl=True, root_certificates=str(pki.ca),
                                                     private_key=str(pki.client_key),
                                                     certificate_chain=str(pki.client_cert))
        assert with_cert.infer("ensemble", ask("mtls", 8)).as_numpy("text_output")[0] == b"mtls"
        without = grpcclient.InferenceServerClient(s.grpc_url, ssl=True, root_certificates=str(pki.ca))
        assert grpc_status(without.is_server_live) == "StatusCode.UNAVAILABLE"

        status, _, _ = http_call(f"{s.root_url}/v2/health/live", context=pki.client_context(client_cert=True))
        assert status == 200
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            http_call(f"{s.root_url}/v2/health/live", context=pki.client_context(client_cert=False))


# -- the API key -------------------------------------------------------------------------------------------

def test_api_key_on_grpc_leaves_only_liveness_and_readiness_open() -> None:
    with serving(api_key=KEY) as s:
        client = grpcclient.InferenceServerClient(s.grpc_url)
        right, wrong = {"authorization": f"Bearer {KEY}"}, {"authorization": "Bearer nope"}
        assert client.is_server_live() and client.is_server_ready()  # load-balancer probes
        for call in (lambda h: client.infer("ensemble", ask("hi", 4), headers=h),
                     lambda h: client.get_model_metadata("ensemble", headers=h),
                     lambda h: client.is_model_ready("ensemble", headers=h)):
            with pytest.raises(InferenceServerException) as missing:
                call(None)
            assert str(missing.value.status()) == "StatusCode.UNAUTHENTICATED" and MISSING_KEY in str(missing.value)
            with pytest.raises(InferenceServerException) as bad:
                call(wrong)
            assert str(bad.value.status()) == "StatusCode.UNAUTHENTICATED" and WRONG_KEY in str(bad.value)
            call(right)
        assert client.infer("ensemble", ask("keyed", 8), headers=right).as_numpy("text_output")[0] == b"keyed"

        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: results.put((result, error)))  # no key: the stream is refused
        send_on_refused_stream(client, ask("stream", 8, stream=True))
        _, error = results.get(timeout=10)
        assert error is not None and str(error.status()) == "StatusCode.UNAUTHENTICATED"
        client.stop_stream()
        client.start_stream(callback=lambda result, error: results.put((result, error)), headers=right)
        client.async_stream_infer("ensemble", ask("stream", 8, stream=True))
        pieces = []
        while True:
            result, error = results.get(timeout=10)
            assert error is None
            pieces.append(result.as_numpy("text_output")[0])
            if is_final(result):
                break
        client.stop_stream()
        assert b"".join(pieces) == b"stream"
        assert prompts(s.core) == ["hi", "keyed", "stream"]


def test_api_key_on_http_guards_v1_and_leaves_health_open() -> None:
    with serving(api_key=KEY) as s:
        root = s.root_url
        assert http_call(f"{root}/v2/health/live")[0] == 200
        assert http_call(f"{root}/v2/health/ready")[0] == 200
        status, body, headers = http_call(f"{root}/v1/models")
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert body == {"error": {"message": MISSING_KEY, "type": "invalid_request_error", "param": None,
                                  "code": "invalid_api_key"}}
        status, body, _ = http_call(f"{root}/v1/completions", completion("x"), key="nope")
        assert status == 401 and body["error"]["message"] == WRONG_KEY
        status, _, _ = http_call(f"{root}/v1/completions", completion("x"), authorization=f"Basic {KEY}")
        assert status == 401
        assert http_call(f"{root}/v1/models", key=KEY)[0] == 200
        status, body, _ = http_call(f"{root}/v1/completions", completion("keyed"), authorization=f"bearer {KEY}")
        assert status == 200 and body["choices"][0]["text"] == "keyed"  # the scheme is case-insensitive

        good = openai.OpenAI(base_url=f"{root}/v1", api_key=KEY, max_retries=0)
        assert good.completions.create(model=MODEL, prompt="official", max_tokens=8).choices[0].text == "official"
        bad = openai.OpenAI(base_url=f"{root}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.completions.create(model=MODEL, prompt="x", max_tokens=4)
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        assert prompts(s.core) == ["keyed", "official"]  # only the requests with the key reached the core


def test_bearer_matching_and_where_the_key_comes_from() -> None:
    assert bearer_matches(f"Bearer {KEY}", KEY) and bearer_matches(f"  BEARER {KEY} ", KEY)
    for value in (None, "", KEY, f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Basic {KEY}", "Bearer"):
        assert not bearer_matches(value, KEY), value
    assert resolve_api_key("flag", {API_KEY_ENV: "env"}) == "flag"
    assert resolve_api_key(None, {API_KEY_ENV: "env"}) == "env"
    assert resolve_api_key(None, {API_KEY_ENV: ""}) is None and resolve_api_key(None, {}) is None


# -- the drain ----------------------------------------------------------------------------------------------

def test_drain_refuses_new_work_and_lets_the_admitted_requests_finish() -> None:
    with serving() as s:
        s.core.hold()  # the admitted requests wait in the core until released: the drain must wait for them
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        stream = grpcclient.InferenceServerClient(s.grpc_url)
        stream.start_stream(callback=lambda result, error: results.put((result, error)))
        prompts = {f"r{i}": f"admitted request {i}" for i in range(3)}
        for rid, prompt in prompts.items():
            stream.async_stream_infer("ensemble", ask(prompt, 64, stream=True), request_id=rid)
        http_stream: list[str] = []

        def read_http_stream() -> None:
            client = openai.OpenAI(base_url=f"{s.root_url}/v1", api_key="unused", max_retries=0)
            for chunk in client.completions.create(model=MODEL, prompt="http stream", max_tokens=64, stream=True):
                http_stream.extend(c.text for c in chunk.choices)
        reader = threading.Thread(target=read_http_stream)
        reader.start()
        wait_until(lambda: len(s.core.submitted) == 4)
        assert s.server.admission.in_flight == 4

        drained: list[Any] = []
        drainer = threading.Thread(target=lambda: drained.append(s.server.drain(timeout=60)))
        drainer.start()
        wait_until(lambda: s.server.admission.draining)
        fresh = grpcclient.InferenceServerClient(s.grpc_url)
        assert fresh.is_server_live() and not fresh.is_server_ready()
        assert http_call(f"{s.root_url}/v2/health/ready")[0] == 503
        assert http_call(f"{s.root_url}/v2/health/live")[0] == 200
        with pytest.raises(InferenceServerException) as unary:
            fresh.infer("ensemble", ask("late", 8))
        assert str(unary.value.status()) == "StatusCode.UNAVAILABLE" and SHUTTING_DOWN in str(unary.value)
        other: queue.Queue[tuple[Any, Any]] = queue.Queue()  # a new stream is refused as a whole
        fresh.start_stream(callback=lambda result, error: other.put((result, error)))
        send_on_refused_stream(fresh, ask("late", 8, stream=True))
        assert str(other.get(timeout=10)[1].status()) == "StatusCode.UNAVAILABLE"
        fresh.stop_stream()
        stream.async_stream_infer("ensemble", ask("late", 8, stream=True), request_id="late")
        _, error = results.get(timeout=10)  # on the open stream: an error for this request, the stream goes on
        assert error is not None and SHUTTING_DOWN in str(error) and "late" in str(error)
        status, body, _ = http_call(f"{s.root_url}/v1/completions", completion("late"))
        assert status == 503 and body["error"]["code"] == "shutting_down" and body["error"]["message"] == SHUTTING_DOWN
        assert drainer.is_alive() and len(s.core.submitted) == 4  # nothing new reached the core

        s.core.release()
        texts = {rid: b"" for rid in prompts}
        finals = 0
        while finals < len(prompts):
            result, error = results.get(timeout=30)
            assert error is None, error
            rid = result.get_response().id
            texts[rid] += result.as_numpy("text_output")[0]
            finals += is_final(result)
        stream.stop_stream()
        reader.join(timeout=30)
        drainer.join(timeout=30)
        assert texts == {rid: p.encode() for rid, p in prompts.items()}  # every admitted request whole
        assert "".join(http_stream) == "http stream"
        assert drained[0].drained == 4 and drained[0].cancelled == 0
        assert s.core.cancelled == []


def test_drain_timeout_cancels_what_is_left() -> None:
    with serving(step_s=0.05) as s:  # 100 tokens: 5 s each, far past the drain timeout
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        stream = grpcclient.InferenceServerClient(s.grpc_url)
        stream.start_stream(callback=lambda result, error: results.put((result, error)))
        stream.async_stream_infer("ensemble", ask("x", 100, stream=True, min_tokens=100), request_id="long")
        unary: list[Any] = []
        waiter = threading.Thread(target=lambda: unary.append(
            http_call(f"{s.root_url}/v1/completions", completion("y" * 100, 100))))  # echoed: 100 tokens
        waiter.start()
        wait_until(lambda: len(s.core.submitted) == 2)
        start = time.monotonic()
        result = s.server.drain(timeout=0.3)
        took = time.monotonic() - start
        assert result.cancelled == 2 and result.drained == 0 and result.left == 0
        assert 0.3 <= took < 3.0
        assert sorted(s.core.cancelled) == sorted(r.request_id for r in s.core.submitted)
        assert s.core.stats()["kv_used_tokens"] == 0
        errors = []
        while not errors:
            _, error = results.get(timeout=10)
            if error is not None:
                errors.append(error)
        assert "cancelled" in str(errors[0]) and "long" in str(errors[0])
        stream.stop_stream()
        waiter.join(timeout=10)
        status, body, _ = unary[0]
        assert status == 503 and "cancelled" in body["error"]["message"]


def test_drain_interrupt_cancels_at_once() -> None:
    """A second signal sets `interrupt`: the drain stops waiting and cancels."""
    with serving(step_s=0.05) as s:
        client = grpcclient.InferenceServerClient(s.grpc_url)
        answers: list[str] = []

        def call() -> None:
            try:
                client.infer("ensemble", ask("x", 100, min_tokens=100))
            except InferenceServerException as e:
                answers.append(str(e.status()))
        caller = threading.Thread(target=call)
        caller.start()
        wait_until(lambda: len(s.core.submitted) == 1)
        interrupt = threading.Event()
        threading.Timer(0.2, interrupt.set).start()
        start = time.monotonic()
        result = s.server.drain(timeout=60, interrupt=interrupt)
        assert result.cancelled == 1 and time.monotonic() - start < 3.0
        assert s.core.cancelled == [s.core.submitted[0].request_id]
        caller.join(timeout=10)
        assert answers == ["StatusCode.CANCELLED"]


def test_admission_gate() -> None:
    gate = Admission()
    a, b = gate.admit(), gate.admit()
    assert a is not None and b is not None and gate.in_flight == 2
    a.rows += ["a1", "a2"]
    b.rows.append("b1")
    a.release()
    a.release()  # idempotent
    assert gate.in_flight == 1 and not gate.wait_idle(0.05)
    gate.start_draining()
    assert gate.admit() is None and gate.draining
    cancelled: list[str] = []
    assert gate.cancel_all(cancelled.append) == [b] and cancelled == ["b1"]
    threading.Timer(0.1, b.release).start()
    assert gate.wait_idle(5.0) and gate.in_flight == 0


def test_a_drain_counts_as_answered_what_the_core_finished_before_its_cancel() -> None:
    """At the timeout a request may be finished in the core with its handler not yet done: the
    cancel then ends nothing, and the drain must not report it cancelled."""
    gate = Admission()
    finished, running = gate.admit(), gate.admit()
    assert finished is not None and running is not None
    finished.rows.append("done-just-now")
    running.rows.append("still-running")
    ended_cancelled: set[str] = set()

    def cancel(request_id: str) -> None:  # what the core does: only a live request ends cancelled
        if request_id == "still-running":
            ended_cancelled.add(request_id)
        threading.Timer(0.05, (finished if request_id == "done-just-now" else running).release).start()

    result = gate.drain(0.05, cancel, was_cancelled=ended_cancelled.__contains__)
    assert (result.drained, result.cancelled, result.left) == (1, 1, 0)
    without = Admission()  # the count without the core's word: every ticket still out at the timeout
    for rows in (["a"], ["b"]):
        t = without.admit()
        assert t is not None
        t.rows += rows
        threading.Timer(0.05, t.release).start()
    assert without.drain(0.01, lambda _: None).cancelled == 2


# -- the settings' errors ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encrypted_key(pki: Pki) -> Path:
    key = serialization.load_pem_private_key(pki.key.read_bytes(), password=None)
    path = pki.key.parent / "encrypted-key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(b"pass")))
    return path


@pytest.mark.parametrize("case, expected", [
    ("cert-only", "--tls-key: required with --tls-cert"),
    ("key-only", "--tls-cert: required with --tls-key"),
    ("missing-cert", "--tls-cert: cannot read"),
    ("key-as-cert", "--tls-cert: "),
    ("cert-as-key", "--tls-key: "),
    ("mismatch", "is not the private key of the certificate in --tls-cert"),
    ("encrypted", "--tls-key: "),
    ("ca-only", "--tls-client-ca: needs --tls-cert and --tls-key"),
    ("missing-ca", "--tls-client-ca: cannot read"),
    ("negative-drain", "--drain-timeout: must be >= 0 seconds"),
    ("zero-threads", "--threads: must be >= 1"),
])
def test_bad_settings_fail_before_the_engine_loads(case: str, expected: str, pki: Pki, encrypted_key: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each names its flag; the engine folder does not even exist, so nothing was loaded or bound."""
    args = {
        "cert-only": ["--tls-cert", pki.cert],
        "key-only": ["--tls-key", pki.key],
        "missing-cert": ["--tls-cert", tmp_path / "nope.pem", "--tls-key", pki.key],
        "key-as-cert": ["--tls-cert", pki.key, "--tls-key", pki.key],
        "cert-as-key": ["--tls-cert", pki.cert, "--tls-key", pki.cert],
        "mismatch": ["--tls-cert", pki.cert, "--tls-key", pki.other_key],
        "encrypted": ["--tls-cert", pki.cert, "--tls-key", encrypted_key],
        "ca-only": ["--tls-client-ca", pki.ca],
        "missing-ca": ["--tls-cert", pki.cert, "--tls-key", pki.key, "--tls-client-ca", tmp_path / "nope.pem"],
        "negative-drain": ["--drain-timeout", "-1"],
        "zero-threads": ["--threads", "0"],
    }[case]
    rc = main(["serve", str(tmp_path / "no-engine"), "--port", "0", "--http-port", "0", "--metrics-port", "-1",
               *map(str, args)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and expected in err, err
    if case == "encrypted":
        assert "is encrypted" in err
    if case in ("key-as-cert", "cert-as-key"):
        assert "has no PEM" in err


def test_threads_reach_the_engine_core(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`serve --threads N` sets ONNX Runtime's intra-op threads (CoreConfig.threads); unset, ORT's own choice."""
    from llamaforge.runtime.serving import serve as serve_module

    seen: list[Any] = []
    monkeypatch.setattr(serve_module, "serve", lambda *a, **k: seen.append(k["core_config"]))
    for extra, threads in ((["--threads", "3"], 3), ([], None)):
        assert main(["serve", str(tmp_path), "--port", "0", *extra]) in (0, None)
        assert seen.pop().threads == threads
