"""What NVIDIA's Triton tools need from the gRPC server (issue 17): `ModelStatistics` filled as Triton
fills it (runtime/serving/model_stats.py), and decoupled mode as a deployment choice, against the
fake engine core (tests/helpers/fake_core.py) with the real `tritonclient.grpc` client."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from fake_core import FakeConfig, FakeCore
from server_utils import grpc_client, is_final, running_server, stream_infer, text_inputs, token_inputs, wait_until
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from llamaforge.runtime.serving.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("ensemble", "tensorrt_llm_bls", "fake-echo", "tensorrt_llm")
PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


def serving(decoupled: bool) -> Any:
    metrics = ServerMetrics()
    core = FakeCore(FakeConfig(max_num_seqs=4, max_queue=8), observer=metrics, context_length=256)
    return running_server(core, metrics=metrics, decoupled=decoupled), core


@pytest.fixture(params=[True, False], ids=["decoupled", "non-decoupled"])
def fake(request: pytest.FixtureRequest) -> Any:
    ctx, core = serving(request.param)
    with ctx as server:
        yield server, core, grpc_client(server)


@pytest.fixture
def non_decoupled() -> Any:
    ctx, core = serving(False)
    with ctx as server:
        yield server, core, grpc_client(server)


def stats_of(client: grpcclient.InferenceServerClient, model: str, version: str = "") -> Any:
    (ms,) = client.get_inference_statistics(model, version).model_stats
    return ms


def expect_error(fn: Any, code: str, *words: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        fn()
    assert info.value.status() == f"StatusCode.{code}", (info.value.status(), info.value.message())
    for w in words:
        assert w in info.value.message(), (w, info.value.message())


def perf_analyzer_version(start: pb.ModelStatisticsResponse, end: pb.ModelStatisticsResponse, model: str) -> str | None:
    """The version perf_analyzer measures when it is given no `-x`: the one of `model` whose
    `inference_stats.queue.count` grew between two ModelStatistics answers (None: it stops with
    "failed to find the requested model version")."""
    before = {(m.name, m.version): m.inference_stats.queue.count for m in start.model_stats}
    for m in end.model_stats:
        if m.name == model and m.inference_stats.queue.count > before.get((m.name, m.version), 0):
            return str(m.version)
    return None


# -- ModelStatistics -------------------------------------------------------------------------------------


def test_statistics_fill_every_phase_per_request(fake: Any) -> None:
    server, core, client = fake
    t_start_ms = int(time.time() * 1000)
    core.hold()  # the first three wait in the queue for >= 0.2 s
    threads = [threading.Thread(target=client.infer, args=("ensemble", text_inputs(f"abc{i}", 8))) for i in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: core.stats()["waiting"] == 3)
    time.sleep(0.2)
    core.release()
    for t in threads:
        t.join(30)
    res = stream_infer(client, "ensemble", [("s1", text_inputs("stream me", 16)), ("s2", text_inputs("x", 4))])
    assert not res.errors
    if server.servicer.decoupled:  # a streamed request is counted once, like a unary one
        res = stream_infer(client, "ensemble", text_inputs("pieces", 16, stream=True))
        assert not res.errors and len(res.results) > 1
    n = 6 if server.servicer.decoupled else 5

    ms = stats_of(client, "ensemble")
    st = ms.inference_stats
    assert (ms.name, ms.version) == ("ensemble", "1")
    assert st.success.count == n and st.fail.count == 0 and st.fail.ns == 0
    for phase in PHASES:
        d = getattr(st, phase)
        assert d.count == n and d.ns > 0, (phase, d)
    assert st.queue.ns >= 3 * 0.2e9, "three requests waited 0.2 s for the scheduler"
    assert st.success.ns >= st.queue.ns + st.compute_input.ns + st.compute_infer.ns
    assert ms.inference_count == ms.execution_count == n
    (batch,) = ms.batch_stats
    assert batch.batch_size == 1 and batch.compute_infer.count == n
    assert batch.compute_infer.ns == st.compute_infer.ns and batch.compute_input.ns == st.compute_input.ns
    assert t_start_ms <= ms.last_inference <= int(time.time() * 1000)
    assert stats_of(client, "ensemble", "1") == ms  # "" is the latest version, which is "1"
    untouched = stats_of(client, "tensorrt_llm")
    assert untouched.inference_stats.success.count == 0 and untouched.inference_stats.queue.count == 0
    assert untouched.last_inference == 0 and not untouched.batch_stats


def test_failed_requests_count_in_fail_only(fake: Any) -> None:
    server, core, client = fake
    expect_error(lambda: client.infer("ensemble", text_inputs("abc", 0)), "INVALID_ARGUMENT", "max_tokens")
    core.hold()
    expect_error(lambda: client.infer("ensemble", text_inputs("abc", 8), client_timeout=0.3), "DEADLINE_EXCEEDED")
    wait_until(lambda: bool(core._cancels))  # the server saw its client go and cancelled the queued request
    core.release()  # the step loop takes the cancel: the request ends cancelled, a failure
    wait_until(lambda: stats_of(client, "ensemble").inference_stats.fail.count == 2)
    res = stream_infer(client, "ensemble", text_inputs("abc", 0))  # refused on a stream
    assert len(res.errors) == 1
    expect_error(lambda: client.infer("ensemble", text_inputs("abc", 4), model_version="2"), "NOT_FOUND",
                 "model_version")  # a version that does not exist has no statistics
    st = stats_of(client, "ensemble").inference_stats
    assert st.fail.count == 3 and st.fail.ns > 0
    assert st.success.count == 0 and all(getattr(st, p).count == 0 for p in PHASES)


def test_statistics_of_unknown_model_or_version_are_not_found(fake: Any) -> None:
    _, _, client = fake
    expect_error(lambda: client.get_inference_statistics("nope"), "NOT_FOUND", "model_name")
    expect_error(lambda: client.get_inference_statistics("ensemble", "2"), "NOT_FOUND", "model_version")
    every = client.get_inference_statistics().model_stats
    assert sorted((m.name, m.version) for m in every) == sorted((name, "1") for name in MODELS)


def test_perf_analyzer_without_version_finds_version_1(fake: Any) -> None:
    server, _, client = fake
    for model, inputs in (("ensemble", text_inputs("hello", 8)), ("tensorrt_llm", token_inputs([256, 104, 105], 4))):
        start = client.get_inference_statistics(model)
        assert perf_analyzer_version(start, client.get_inference_statistics(model), model) is None
        client.infer(model, inputs)
        if server.servicer.decoupled:
            assert not stream_infer(client, model, inputs).errors
        assert perf_analyzer_version(start, client.get_inference_statistics(model), model) == "1"


# -- decoupled mode as a deployment choice --------------------------------------------------------------


def test_model_config_reports_the_transaction_policy(fake: Any) -> None:
    server, _, client = fake
    for model in MODELS:
        policy = client.get_model_config(model).config.model_transaction_policy
        assert policy.decoupled is server.servicer.decoupled, model


def test_non_decoupled_unary_serves_every_model_and_refuses_streaming(non_decoupled: Any) -> None:
    _, core, client = non_decoupled
    for model in ("ensemble", "tensorrt_llm_bls", "fake-echo"):
        r = client.infer(model, text_inputs("héllo", 16, exclude_input_in_output=True))
        assert r.as_numpy("text_output")[0] == "héllo".encode(), model
    r = client.infer("tensorrt_llm", token_inputs([256, 104, 105], 8, exclude_input_in_output=True))
    assert r.as_numpy("output_ids").reshape(-1).tolist() == [104, 105]
    expect_error(lambda: client.infer("ensemble", text_inputs("abc", 4, stream=True)), "INVALID_ARGUMENT",
                 "stream:", "non-decoupled")
    expect_error(lambda: client.infer("tensorrt_llm", token_inputs([256, 104], 4, streaming=True)),
                 "INVALID_ARGUMENT", "streaming:", "non-decoupled")
    assert not core.submitted[4:], "a refused streaming request never reaches the core"


def test_non_decoupled_stream_rpc_answers_one_response_per_request(non_decoupled: Any) -> None:
    """As Triton serves ModelStreamInfer for a non-decoupled model: one (final) response each, even
    with enable_empty_final_response; a request that asks to stream gets an error, and the stream
    stays open for the next."""
    _, _, client = non_decoupled
    for kwargs in ({}, {"enable_empty_final_response": True}):
        res = stream_infer(client, "ensemble", [("a", text_inputs("first", 16)), ("b", text_inputs("second", 16))],
                           **kwargs)
        assert not res.errors and len(res.results) == 2 and all(is_final(r) for r in res.results)
        assert res.text("a") == b"firstfirst" and res.text("b") == b"secondsecond"  # prompt + echo
    res = stream_infer(client, "ensemble", [("s", text_inputs("abc", 4, stream=True)), ("ok", text_inputs("ok", 4))])
    assert len(res.errors) == 1 and "stream:" in str(res.errors[0]) and "non-decoupled" in str(res.errors[0])
    assert res.text("ok") == b"okok"


def test_cli_and_make_pass_the_decoupled_choice() -> None:
    from llamaforge.cli import parser

    assert parser().parse_args(["serve", "e"]).decoupled is True
    assert parser().parse_args(["serve", "e", "--no-decoupled"]).decoupled is False
    assert parser().parse_args(["repo", "e", "--no-decoupled"]).decoupled is False
    for make_args, flag in ((["DECOUPLED=false"], "--no-decoupled"), ([], "--decoupled")):
        for target in ("serve", "repo"):
            r = subprocess.run(["make", "-n", target, "ENGINE=engines/x", *make_args], cwd=ROOT, capture_output=True,
                               text=True, check=True)
            assert f" {flag}" in r.stdout.replace("\\\n", " ") and (flag == "--no-decoupled") == ("--no-decoupled" in r.stdout)
