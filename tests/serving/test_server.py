"""The gRPC server (Triton / KServe v2 protocol) driven by the real `tritonclient.grpc` client on
127.0.0.1: against a fake engine core (tests/fake_core.py: echoes the prompt's bytes) for the
protocol, errors, queueing, cancellation and metrics, and against the real `EngineCore` on a tiny
built engine for end-to-end streaming = unary and KV release on disconnect."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from fake_core import EOS, FakeConfig, FakeCore
from server_process import serve_process
from server_utils import (
    grpc_client,
    is_final,
    running_server,
    scrape_metrics,
    stream_infer,
    tensor,
    text_inputs,
    token_inputs,
    wait_until,
)
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from llamaforge.runtime.core.requests import RequestError
from llamaforge.runtime.serving.metrics import METRIC_NAMES, ServerMetrics
from llamaforge.runtime.serving.model_interface import MAX_BATCH_SIZE, TEXT_MODEL
from llamaforge.runtime.serving.protocol import ModelContext, _sampling, parse_request
from llamaforge.runtime.serving.tensor_codec import decode_inputs, deserialize_bytes, serialize_bytes

PROMPT = "Hello wörld 🙂 — naïve"  # multi-byte characters arrive one byte (token) at a time


@pytest.fixture
def fake() -> Any:
    metrics = ServerMetrics()
    core = FakeCore(FakeConfig(max_num_seqs=4, max_queue=8), observer=metrics, context_length=256)
    with running_server(core, metrics=metrics, max_message_bytes=1 << 20) as server:
        yield server, core, grpc_client(server)


def expect_error(fn: Any, code: str, *fields: str) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn()
    e = info.value
    assert e.status() == f"StatusCode.{code}", (e.status(), e.message())
    for f in fields:
        assert f in e.message(), (f, e.message())
    return e


def assert_serves(client: grpcclient.InferenceServerClient) -> None:
    r = client.infer("ensemble", text_inputs("ok", 8, exclude_input_in_output=True))
    assert r.as_numpy("text_output")[0] == b"ok"


# -- codec and parsing units ---------------------------------------------------------------------------


def test_bytes_codec_round_trip_and_truncation() -> None:
    elems = [b"", b"a", "wörld 🙂".encode(), bytes(range(256))]
    assert deserialize_bytes(serialize_bytes(elems), "x") == elems
    buf = serialize_bytes([b"hello"])
    for cut in (buf[:2], buf[:-1]):
        with pytest.raises(RequestError) as info:
            deserialize_bytes(cut, "text_input")
        assert info.value.field == "text_input"


def test_typed_contents_and_raw_contents_decode_the_same() -> None:
    req = pb.ModelInferRequest(model_name="ensemble")
    t = req.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    t.contents.bytes_contents.append("héllo".encode())
    t = req.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1])
    t.contents.int_contents.append(7)
    t = req.inputs.add(name="seed", datatype="UINT64", shape=[1])
    t.contents.uint64_contents.append(2**63 + 5)
    typed = decode_inputs(req)
    raw_req = pb.ModelInferRequest(model_name="ensemble")
    for inp in req.inputs:
        raw_req.inputs.add(name=inp.name, datatype=inp.datatype, shape=inp.shape)
    raw_req.raw_input_contents.extend([serialize_bytes(["héllo".encode()]), np.int32(7).tobytes(),
                                       np.uint64(2**63 + 5).tobytes()])
    raw = decode_inputs(raw_req)
    for name in typed:
        assert typed[name].shape == raw[name].shape
        assert typed[name].tolist() == raw[name].tolist()
    assert raw["seed"].dtype == np.uint64 and raw["seed"][0] == 2**63 + 5


def test_sampling_follows_trtllm() -> None:
    assert _sampling({}, "top_k", "top_p").greedy
    assert _sampling({"temperature": 0.8}, "top_k", "top_p").greedy  # temperature alone: greedy (TRT-LLM)
    assert _sampling({"temperature": 1.0, "top_k": 1, "top_p": 0.0}, "top_k", "top_p").greedy  # TRT-LLM client defaults
    assert _sampling({"temperature": 0.0, "top_k": 40}, "top_k", "top_p").greedy
    p = _sampling({"top_k": 40}, "top_k", "top_p")
    assert (p.temperature, p.top_k, p.top_p) == (1.0, 40, 1.0)
    p = _sampling({"temperature": 0.7, "top_p": 0.9, "seed": 3}, "top_k", "top_p")
    assert (p.temperature, p.top_k, p.top_p, p.seed) == (0.7, 0, pytest.approx(0.9), 3)
    assert not _sampling({"temperature": 0.7, "top_p": 1.0}, "top_k", "top_p").greedy  # full distribution


def test_parse_names_the_field() -> None:
    core = FakeCore()
    ctx = ModelContext.from_core(core)

    def parse(**values: Any) -> None:
        req = pb.ModelInferRequest(model_name="ensemble")
        for name, (dtype, arr) in values.items():
            req.inputs.add(name=name, datatype=dtype, shape=list(np.shape(arr)))
            req.raw_input_contents.append(serialize_bytes(np.ravel(arr)) if dtype == "BYTES"
                                          else np.ascontiguousarray(arr).tobytes())
        parse_request(req, TEXT_MODEL, ctx, "id", streaming_rpc=True)

    ok = dict(text_input=("BYTES", np.array([[b"hi"]], dtype=object)), max_tokens=("INT32", np.array([[4]], np.int32)))
    parse(**ok)
    with pytest.raises(RequestError, match="^end_id"):
        parse(**ok, end_id=("INT32", np.array([[10**6]], np.int32)))
    with pytest.raises(RequestError, match="^min_tokens"):
        parse(**ok, min_tokens=("INT32", np.array([[9]], np.int32)))
    with pytest.raises(RequestError, match="^temperature"):
        parse(**ok, temperature=("FP32", np.array([[np.nan]], np.float32)))
    with pytest.raises(RequestError, match="^presence_penalty"):
        parse(**ok, presence_penalty=("FP32", np.array([[2.5]], np.float32)))
    with pytest.raises(RequestError, match="^frequency_penalty"):
        parse(**ok, frequency_penalty=("FP32", np.array([[-2.5]], np.float32)))


# -- health, metadata, config, index, statistics ---------------------------------------------------------


def test_health_metadata_config_index_statistics(fake: Any) -> None:
    server, core, client = fake
    assert client.is_server_live() and client.is_server_ready()
    for name in ("ensemble", "tensorrt_llm_bls", "fake-echo", "tensorrt_llm"):
        assert client.is_model_ready(name), name
        assert client.is_model_ready(name, "1")
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("ensemble", "2")
    assert client.get_server_metadata().name == "llama-forge"

    md = client.get_model_metadata("ensemble")
    inputs = {t.name: (t.datatype, list(t.shape)) for t in md.inputs}
    # A batching model's metadata shapes start with the batch dimension, as Triton reports them.
    assert inputs["text_input"] == ("BYTES", [-1, 1]) and inputs["max_tokens"] == ("INT32", [-1, 1])
    assert inputs["stop_words"] == ("BYTES", [-1, -1]) and inputs["seed"] == ("UINT64", [-1, 1])
    assert {t.name for t in md.outputs} >= {"text_output", "cum_log_probs", "output_log_probs",
                                            "num_input_tokens", "num_output_tokens"}

    cfg = client.get_model_config("ensemble").config
    assert cfg.name == "ensemble" and cfg.max_batch_size == MAX_BATCH_SIZE > 0 and cfg.model_transaction_policy.decoupled
    required = {i.name for i in cfg.input if not i.optional}
    assert required == {"text_input", "max_tokens"}
    tok = client.get_model_config("tensorrt_llm").config
    assert {i.name for i in tok.input if not i.optional} == {"input_ids", "request_output_len"}
    assert {o.name for o in tok.output} >= {"output_ids", "sequence_length"}

    index = client.get_model_repository_index()
    assert {(m.name, m.version, m.state) for m in index.models} >= {("ensemble", "1", "READY"),
                                                                     ("tensorrt_llm", "1", "READY")}

    client.infer("ensemble", text_inputs("abc", 8))
    expect_error(lambda: client.infer("ensemble", text_inputs("abc", 0)), "INVALID_ARGUMENT")
    stats = client.get_inference_statistics("ensemble").model_stats[0]
    assert stats.name == "ensemble" and stats.inference_stats.success.count == 1
    assert stats.inference_stats.fail.count == 1 and stats.last_inference > 0
    assert len(client.get_inference_statistics().model_stats) == 4
    for fn in (lambda: client.get_model_metadata("nope"), lambda: client.get_model_config("ensemble", "3"),
               lambda: client.get_inference_statistics("nope")):
        expect_error(fn, "NOT_FOUND")


# -- inference -------------------------------------------------------------------------------------------


def test_unary_text_includes_prompt_unless_excluded(fake: Any) -> None:
    server, core, client = fake
    r = client.infer("ensemble", text_inputs(PROMPT, 200))
    assert r.as_numpy("text_output")[0].decode("utf-8") == PROMPT + PROMPT  # TRT-LLM default: prompt + generated
    n = len(PROMPT.encode())
    assert r.as_numpy("num_input_tokens").tolist() == [[n + 1]]  # + BOS
    assert r.as_numpy("num_output_tokens").tolist() == [[n]]
    assert r.as_numpy("cum_log_probs") is None  # not asked for

    r = client.infer("ensemble", text_inputs(PROMPT, 5, exclude_input_in_output=True, return_log_probs=True))
    assert r.as_numpy("text_output")[0] == PROMPT.encode()[:5]
    assert r.as_numpy("output_log_probs").shape == (1, 1, 5)
    assert r.as_numpy("cum_log_probs").shape == (1, 1)

    # The request's knobs reach the core.
    client.infer("ensemble", text_inputs("a,b", 8, end_id=ord(","), min_tokens=1, temperature=0.5, top_k=5,
                                         top_p=0.5, seed=42, repetition_penalty=1.1, stop_words=["xyz", ""],
                                         bad_words=["ab"], beam_width=1, length_penalty=1.0),
                 request_id="knobs")
    req = core.submitted[-1]
    assert req.end_ids == (ord(","),) and req.min_tokens == 1 and req.stop_words == ("xyz",)
    assert req.bad_words == ((ord("a"), ord("b")),)
    s = req.sampling
    assert (s.temperature, s.top_k, s.top_p, s.seed, s.repetition_penalty) == \
        (0.5, 5, pytest.approx(0.5), 42, pytest.approx(1.1))

    assert not req.return_log_probs  # nothing asked for log probs: the core skips computing them

    # Requested outputs only; a log-prob output asked for by name makes the core compute log probs.
    r = client.infer("ensemble", text_inputs("abc", 8), outputs=[grpcclient.InferRequestedOutput("num_output_tokens")])
    assert r.as_numpy("text_output") is None and r.as_numpy("num_output_tokens").tolist() == [[3]]
    assert not core.submitted[-1].return_log_probs
    r = client.infer("ensemble", text_inputs("abc", 8), outputs=[grpcclient.InferRequestedOutput("cum_log_probs")])
    assert core.submitted[-1].return_log_probs and r.as_numpy("cum_log_probs").shape == (1, 1)


def test_trtllm_names_min_length_and_random_seed_are_declared_and_honoured(fake: Any) -> None:
    """TensorRT-LLM's ensemble and tensorrt_llm configs declare `min_length` and `random_seed` (our
    min_tokens and seed), and clients that check the config before sending (perf_analyzer, so
    genai-perf --output-tokens-mean-deterministic, which sends min_length) refuse an undeclared
    one: every model declares both as optional inputs, and a stock client's request with them works."""
    server, core, client = fake
    for name in ("ensemble", "tensorrt_llm_bls", "fake-echo", "tensorrt_llm"):
        cfg = client.get_model_config(name).config
        declared = {i.name: (mc.DataType.Name(i.data_type), list(i.dims), i.optional) for i in cfg.input}
        assert declared["min_length"] == ("TYPE_INT32", [1], True), name
        assert declared["random_seed"] == ("TYPE_UINT64", [1], True), name
        md = {t.name: (t.datatype, list(t.shape)) for t in client.get_model_metadata(name).inputs}
        assert md["min_length"] == ("INT32", [-1, 1]) and md["random_seed"] == ("UINT64", [-1, 1]), name

    # The fake echoes the prompt and stops at an end id once min_tokens tokens are out.
    short = client.infer("ensemble", text_inputs("a,b", 8, exclude_input_in_output=True, end_id=ord(",")))
    assert short.as_numpy("text_output")[0] == b"a"
    r = client.infer("ensemble", text_inputs("a,b", 8, exclude_input_in_output=True, end_id=ord(","), min_length=3,
                                             random_seed=tensor("random_seed", np.array([[7]], np.uint64))))
    assert r.as_numpy("text_output")[0] == b"a,b"
    assert core.submitted[-1].min_tokens == 3 and core.submitted[-1].sampling.seed == 7
    ids = [ord(c) for c in "a,b"]
    r = client.infer("tensorrt_llm", token_inputs(ids, 8, exclude_input_in_output=True, end_id=ord(","), min_length=3))
    assert r.as_numpy("output_ids").reshape(-1).tolist() == ids and core.submitted[-1].min_tokens == 3
    # One value per parameter: both names in one request is refused, naming the alias.
    expect_error(lambda: client.infer("ensemble", text_inputs("a,b", 8, min_tokens=1, min_length=3)),
                 "INVALID_ARGUMENT", "min_length", "given twice")


def test_stop_words_and_end_id_cut_the_text(fake: Any) -> None:
    server, core, client = fake
    r = client.infer("ensemble", text_inputs("one, two. three", 64, exclude_input_in_output=True, stop_words=[". "]))
    assert r.as_numpy("text_output")[0] == b"one, two"
    r = client.infer("ensemble", text_inputs("one, two", 64, exclude_input_in_output=True, end_id=ord(",")))
    assert r.as_numpy("text_output")[0] == b"one"


def test_stream_concatenation_equals_unary_byte_for_byte(fake: Any) -> None:
    server, core, client = fake
    unary = client.infer("ensemble", text_inputs(PROMPT, 200, exclude_input_in_output=True))
    whole = unary.as_numpy("text_output")[0]
    res = stream_infer(client, "ensemble", text_inputs(PROMPT, 200, stream=True))
    assert not res.errors
    pieces = [r.as_numpy("text_output")[0] for r in res.results]
    assert len(pieces) > 5
    assert b"".join(pieces) == whole == PROMPT.encode()
    for p in pieces:
        p.decode("utf-8")  # every piece is whole characters
    assert [is_final(r) for r in res.results] == [False] * (len(pieces) - 1) + [True]
    last = res.results[-1]
    assert last.as_numpy("num_output_tokens").tolist() == [[len(PROMPT.encode())]]

    # Streams never carry the prompt, whatever exclude_input_in_output says (TRT-LLM).
    res = stream_infer(client, "ensemble", text_inputs(PROMPT, 200, stream=True, exclude_input_in_output=False))
    assert res.text() == whole


def test_stream_empty_final_response(fake: Any) -> None:
    server, core, client = fake
    res = stream_infer(client, "ensemble", text_inputs("abc", 16, stream=True), enable_empty_final_response=True)
    assert [is_final(r) for r in res.results] == [False] * (len(res.results) - 1) + [True]
    assert res.results[-1].get_response().outputs == []  # flags only, as Triton sends it
    assert res.text() == b"abc"


def test_non_streaming_request_on_a_stream(fake: Any) -> None:
    """TRT-LLM's end_to_end_grpc_client uses a stream even with streaming off: one whole response."""
    server, core, client = fake
    res = stream_infer(client, "ensemble", text_inputs("abc", 16, stream=False))
    assert len(res.results) == 1 and is_final(res.results[0])
    assert res.results[0].as_numpy("text_output")[0] == b"abcabc"


def test_stream_many_requests_and_errors_keep_it_open(fake: Any) -> None:
    server, core, client = fake
    res = stream_infer(client, "ensemble", [
        ("a", text_inputs("first", 32, stream=True)),
        ("bad", text_inputs("x", 0, stream=True)),
        ("whole", text_inputs("x", 4)),
        ("b", text_inputs("second", 32, stream=True)),
    ])
    assert res.text("a") == b"first" and res.text("b") == b"second" and res.text("whole") == b"xx"
    assert is_final(res.for_id("a")[-1]) and is_final(res.for_id("b")[-1])
    assert len(res.errors) == 1 and res.errors[0].message().startswith("max_tokens")
    assert "request id 'bad'" in res.errors[0].message()

    # The raw protocol: an error carries the request's id in infer_response.id.
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reqs = []
        for rid, version, n in (("e1", "", 0), ("e2", "7", 4), ("ok", "1", 3)):
            r = pb.ModelInferRequest(model_name="ensemble", model_version=version, id=rid)
            for t in text_inputs("xyz", n, stream=True):
                r.inputs.append(t._get_tensor())
                r.raw_input_contents.append(t._get_content())
            reqs.append(r)
        out = list(stub.ModelStreamInfer(iter(reqs), timeout=30))
    errors = {o.infer_response.id: o.error_message for o in out if o.error_message}
    assert errors["e1"].startswith("max_tokens") and errors["e2"].startswith("model_version")
    ok = [o.infer_response for o in out if not o.error_message]
    assert all(r.id == "ok" for r in ok) and ok[-1].parameters["triton_final_response"].bool_param


def test_stream_serves_its_requests_without_a_thread_each(fake: Any) -> None:
    """The core hands a stream's outputs to one queue (a sink), so eight requests on a stream
    start no more threads than one does; all of them still complete."""
    server, core, client = fake
    core.hold()
    texts: dict[str, list[bytes]] = {}
    finals: set[str] = set()

    def on_response(result: Any, error: Any) -> None:
        assert error is None, error
        rid = result.get_response().id
        texts.setdefault(rid, []).append(result.as_numpy("text_output")[0])
        if is_final(result):
            finals.add(rid)

    client.start_stream(callback=on_response)
    try:
        client.async_stream_infer("ensemble", text_inputs("req-0", 16, stream=True, exclude_input_in_output=True),
                                  request_id="0")
        wait_until(lambda: len(core.submitted) == 1)
        threads = threading.active_count()
        for i in range(1, 8):
            client.async_stream_infer("ensemble", text_inputs(f"req-{i}", 16, stream=True, exclude_input_in_output=True),
                                      request_id=str(i))
        wait_until(lambda: len(core.submitted) == 8)
        assert threading.active_count() == threads
        core.release()
        wait_until(lambda: len(finals) == 8)
    finally:
        core.release()
        client.stop_stream()
    assert {rid: b"".join(parts) for rid, parts in texts.items()} == {str(i): f"req-{i}".encode() for i in range(8)}


def test_token_model(fake: Any) -> None:
    server, core, client = fake
    ids = list(b"tok")
    r = client.infer("tensorrt_llm", token_inputs(ids, 16))
    assert r.as_numpy("output_ids").tolist() == [[ids + ids]]  # prompt ids + generated (TRT-LLM default)
    assert r.as_numpy("sequence_length").tolist() == [[6]]
    r = client.infer("tensorrt_llm", token_inputs(ids, 2, exclude_input_in_output=True, return_log_probs=True,
                                                  runtime_top_k=1, beam_width=1))
    assert r.as_numpy("output_ids").tolist() == [[ids[:2]]]
    assert r.as_numpy("output_log_probs").shape == (1, 1, 2)

    res = stream_infer(client, "tensorrt_llm", token_inputs(ids, 16, streaming=True))
    got = [t for x in res.results for t in x.as_numpy("output_ids").reshape(-1).tolist()]
    assert got == ids and is_final(res.results[-1])

    stop = tensor("stop_words_list", np.array([[[ord("o")], [1]]], dtype=np.int32))
    r = client.infer("tensorrt_llm", token_inputs(ids, 16, stop_words_list=stop, exclude_input_in_output=True))
    assert r.as_numpy("output_ids").tolist() == [[[ord("t")]]]
    expect_error(lambda: client.infer("tensorrt_llm", token_inputs([EOS + 100], 4)), "INVALID_ARGUMENT", "input_ids")
    bad_len = token_inputs(ids, 4)
    bad_len[1] = tensor("input_lengths", np.array([[7]], dtype=np.int32))
    expect_error(lambda: client.infer("tensorrt_llm", bad_len), "INVALID_ARGUMENT", "input_lengths")


# -- bad input ------------------------------------------------------------------------------------------


def _shape_lie() -> list[grpcclient.InferInput]:
    inputs = text_inputs("abc", 4)
    inputs[0].set_shape([1, 3])  # three elements declared, one sent
    return inputs


def _without(name: str) -> list[grpcclient.InferInput]:
    return [t for t in text_inputs("abc", 4) if t.name() != name]


def _replace(name: str, t: grpcclient.InferInput) -> list[grpcclient.InferInput]:
    return [t if x.name() == name else x for x in text_inputs("abc", 4)]


BAD = {
    "max_tokens wrong dtype": (lambda: _replace("max_tokens", tensor("max_tokens", np.array([[4.0]], np.float32))),
                               "max_tokens"),
    "text_input wrong dtype": (lambda: _replace("text_input", tensor("text_input", np.array([[1]], np.int32))),
                               "text_input"),
    "stream wrong dtype": (lambda: text_inputs("abc", 4, stream=3), "stream"),
    # Two rows of text_input are a batch of 2 (max_batch_size > 0); max_tokens' one row disagrees.
    "batch sizes differ": (lambda: _replace("text_input", tensor("text_input", np.array([[b"a"], [b"b"]], object))),
                           "max_tokens"),
    "max_tokens wrong shape": (lambda: _replace("max_tokens", tensor("max_tokens", np.array([[4, 4]], np.int32))),
                               "max_tokens"),
    "shape does not match data": (_shape_lie, "text_input"),
    "missing text_input": (lambda: _without("text_input"), "text_input"),
    "missing max_tokens": (lambda: _without("max_tokens"), "max_tokens"),
    "max_tokens zero": (lambda: text_inputs("abc", 0), "max_tokens"),
    "max_tokens negative": (lambda: text_inputs("abc", -3), "max_tokens"),
    "prompt + max_tokens over context": (lambda: text_inputs("a" * 100, 200), "max_tokens"),
    "prompt alone over context": (lambda: text_inputs("a" * 300, 1), "text_input"),
    "invalid utf-8": (lambda: text_inputs(b"ab\xff\xfecd", 4), "text_input"),
    "invalid utf-8 stop word": (lambda: text_inputs("abc", 4) + [tensor("stop_words", np.array([[b"\xc3"]], object))],
                                "stop_words"),
    "unknown input": (lambda: text_inputs("abc", 4, lora_task_id=3), "lora_task_id"),
    "unary stream": (lambda: text_inputs("abc", 4, stream=True), "stream"),
    "beam width zero": (lambda: text_inputs("abc", 4, beam_width=0), "beam_width"),
    "no sequences": (lambda: text_inputs("abc", 4, num_return_sequences=0), "num_return_sequences"),
    "top_p out of range": (lambda: text_inputs("abc", 4, top_p=1.5), "top_p"),
    "negative temperature": (lambda: text_inputs("abc", 4, temperature=-1.0), "temperature"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_invalid_argument_naming_the_field(fake: Any, case: str) -> None:
    server, core, client = fake
    make, field = BAD[case]
    e = expect_error(lambda: client.infer("ensemble", make()), "INVALID_ARGUMENT", field)
    assert e.message().startswith(field), e.message()
    assert_serves(client)


def test_bad_parameters_outputs_model_version_and_size(fake: Any) -> None:
    server, core, client = fake
    expect_error(lambda: client.infer("ensemble", text_inputs("abc", 4), parameters={"foo": 1}),
                 "INVALID_ARGUMENT", "parameters.foo")
    expect_error(lambda: client.infer("ensemble", text_inputs("abc", 4), sequence_id=5),
                 "INVALID_ARGUMENT", "parameters.sequence_id")
    client.infer("ensemble", text_inputs("abc", 4), priority=2, timeout=10_000_000)  # accepted, ignored
    expect_error(lambda: client.infer("ensemble", text_inputs("abc", 4),
                                      outputs=[grpcclient.InferRequestedOutput("logits")]), "INVALID_ARGUMENT", "outputs")
    expect_error(lambda: client.infer("nope", text_inputs("abc", 4)), "NOT_FOUND", "model_name")
    expect_error(lambda: client.infer("ensemble", text_inputs("abc", 4), model_version="2"), "NOT_FOUND",
                 "model_version")
    # Over the 1 MiB receive limit of this server: refused by gRPC, the server carries on.
    expect_error(lambda: client.infer("ensemble", text_inputs("a" * (2 << 20), 4)), "RESOURCE_EXHAUSTED")
    assert_serves(client)
    # Under it: parsed, then refused for its length.
    expect_error(lambda: client.infer("ensemble", text_inputs("a" * 1000, 4)), "INVALID_ARGUMENT", "text_input")
    assert_serves(client)


# -- queueing, cancellation, metrics --------------------------------------------------------------------------


def test_queue_full_is_resource_exhausted_at_once(fake: Any) -> None:
    server, core, client = fake
    core.hold()
    clients = [grpc_client(server) for _ in range(core.config.max_queue)]
    results: list[Any] = []
    threads = [threading.Thread(target=lambda c=c: results.append(c.infer("ensemble", text_inputs("q", 4))))
               for c in clients]
    for t in threads:
        t.start()
    wait_until(lambda: core.stats()["waiting"] == core.config.max_queue)
    t0 = time.monotonic()
    expect_error(lambda: client.infer("ensemble", text_inputs("one too many", 4)), "RESOURCE_EXHAUSTED", "queue")
    assert time.monotonic() - t0 < 2.0
    res = stream_infer(client, "ensemble", text_inputs("on a stream", 4, stream=True))
    assert "queue" in res.errors[0].message()
    core.release()
    for t in threads:
        t.join(timeout=20)
    assert len(results) == core.config.max_queue
    assert_serves(client)
    assert 'llamaforge_requests_total{outcome="rejected"} 2.0' in scrape_metrics(server)


def test_client_cancel_and_disconnect_cancel_in_the_core(fake: Any) -> None:
    server, core, client = fake
    core.step_s = 0.02  # ~50 tokens/s: requests outlive the client's patience
    long_prompt = "z" * 200

    # Unary: the client gives up (deadline); the server cancels the request in the core.
    expect_error(lambda: client.infer("ensemble", text_inputs(long_prompt, 50), client_timeout=0.3),
                 "DEADLINE_EXCEEDED")
    wait_until(lambda: len(core.cancelled) == 1 and core.stats()["running"] == 0)

    # Stream: cancelled by the client after the first piece.
    got = threading.Event()
    client.start_stream(callback=lambda result, error: got.set())
    client.async_stream_infer("ensemble", text_inputs(long_prompt, 50, stream=True), request_id="c1")
    assert got.wait(10)
    client.stop_stream(cancel_requests=True)
    wait_until(lambda: len(core.cancelled) == 2 and core.stats()["running"] == 0)
    assert core.stats()["kv_used_tokens"] == 0

    # Stream: the client's connection goes away.
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    req = pb.ModelInferRequest(model_name="ensemble", id="gone")
    for t in text_inputs(long_prompt, 50, stream=True):
        req.inputs.append(t._get_tensor())
        req.raw_input_contents.append(t._get_content())
    responses = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([req]))
    assert next(responses).infer_response.id == "gone"
    channel.close()
    wait_until(lambda: len(core.cancelled) == 3 and core.stats()["running"] == 0)
    assert_serves(client)
    assert 'llamaforge_requests_total{outcome="cancelled"} 3.0' in scrape_metrics(server)


def test_metrics_scrape(fake: Any) -> None:
    server, core, client = fake
    client.infer("ensemble", text_inputs("abc", 8))
    stream_infer(client, "ensemble", text_inputs("abcdef", 3, stream=True))
    expect_error(lambda: client.infer("ensemble", text_inputs("abc", 0)), "INVALID_ARGUMENT")
    text = scrape_metrics(server)
    for name in METRIC_NAMES:
        assert name in text, name
    assert 'llamaforge_requests_total{outcome="stop"} 1.0' in text
    assert 'llamaforge_requests_total{outcome="length"} 1.0' in text
    assert 'llamaforge_requests_total{outcome="invalid"} 1.0' in text
    assert "llamaforge_generated_tokens_total 7.0" in text  # 3 + EOS, 3
    assert "llamaforge_time_to_first_token_seconds_count 2.0" in text
    assert "llamaforge_kv_cache_total_tokens 4096.0" in text


def test_two_servers_in_one_process() -> None:
    with running_server(FakeCore()) as a, running_server(FakeCore()) as b:
        assert a.port != b.port and a.metrics_port != b.metrics_port
        for s in (a, b):
            grpc_client(s).infer("ensemble", text_inputs("x", 2))
            assert 'llamaforge_requests_total{outcome="stop"} 1.0' in scrape_metrics(s)


def test_cli_serve_arguments() -> None:
    from llamaforge.cli import parser

    args = parser().parse_args(["serve", "engines/x", "--port", "9001", "--metrics-port", "9002",
                                "--kv-budget-tokens", "4096", "--max-num-seqs", "8", "--max-num-batched-tokens",
                                "256", "--max-queue", "16"])
    assert (args.engine, args.port, args.metrics_port, args.kv_budget_tokens, args.max_num_seqs,
            args.max_num_batched_tokens, args.max_queue) == ("engines/x", 9001, 9002, 4096, 8, 256, 16)


# -- the real engine core -------------------------------------------------------------------------------------


# `tiny_engine` (tiny_config(), seed 0, fp32 ONNX Runtime) is a session fixture: tests/conftest.py.


@pytest.fixture
def real(tiny_engine: Path) -> Any:
    from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
    from llamaforge.runtime.core.engine_core import EngineCore

    metrics = ServerMetrics()
    core = EngineCore(tiny_engine, CoreConfig(KVCacheConfig(budget_tokens=2048), SchedulerConfig(max_num_seqs=4),
                                              max_queue=4, threads=1),
                      observer=metrics)
    with running_server(core, metrics=metrics) as server:
        yield server, core, grpc_client(server)


@pytest.mark.slow
def test_real_core_stream_equals_unary_and_greedy(real: Any) -> None:
    server, core, client = real
    prompt = "def f(x):\n    return"
    unary = client.infer("ensemble", text_inputs(prompt, 24, exclude_input_in_output=True, min_tokens=24))
    text = unary.as_numpy("text_output")[0]
    assert unary.as_numpy("num_output_tokens").tolist() == [[24]]
    res = stream_infer(client, "ensemble", text_inputs(prompt, 24, stream=True, min_tokens=24))
    assert not res.errors and is_final(res.results[-1])
    assert res.text() == text
    full = client.infer("ensemble", text_inputs(prompt, 24, min_tokens=24)).as_numpy("text_output")[0]
    assert full == prompt.encode() + text
    # The token model generates the same tokens for the same prompt ids.
    ids = core.tokenizer.encode(prompt, add_bos=True, allow_special=True)
    r = client.infer("tensorrt_llm", token_inputs(ids, 24, exclude_input_in_output=True, min_tokens=24))
    gen = r.as_numpy("output_ids").reshape(-1).tolist()
    assert core.tokenizer.decode(gen).encode() == text
    assert core.stats()["kv_used_tokens"] == 0


@pytest.mark.slow
def test_real_core_disconnect_frees_kv_and_context_limit(real: Any) -> None:
    server, core, client = real
    got = threading.Event()
    client.start_stream(callback=lambda result, error: got.set())
    client.async_stream_infer("ensemble", text_inputs("hello", 400, stream=True, min_tokens=400))
    assert got.wait(30)
    assert core.stats()["kv_used_tokens"] > 0
    client.stop_stream(cancel_requests=True)
    wait_until(lambda: core.stats()["running"] == 0 and core.stats()["kv_used_tokens"] == 0, timeout=30)
    assert 'llamaforge_requests_total{outcome="cancelled"} 1.0' in scrape_metrics(server)
    expect_error(lambda: client.infer("ensemble", text_inputs("hello", 600)), "INVALID_ARGUMENT", "max_tokens")
    assert_serves_real(client)


@pytest.mark.slow
def test_real_core_min_length_holds_back_the_end_id(real: Any) -> None:
    """`min_length` (TensorRT-LLM's name of min_tokens, which genai-perf's deterministic output
    length sends) reaches the real core: with the greedy first token as end id a request ends at
    once, and with min_length it runs to max_tokens without that token."""
    server, core, client = real
    ids = core.tokenizer.encode("def f(x):", add_bos=True, allow_special=True)
    greedy = {"exclude_input_in_output": True, "temperature": 0.0}
    first = client.infer("tensorrt_llm", token_inputs(ids, 1, **greedy)).as_numpy("output_ids").reshape(-1).tolist()
    assert len(first) == 1
    stopped = client.infer("tensorrt_llm", token_inputs(ids, 6, end_id=first[0], **greedy))
    assert stopped.as_numpy("num_output_tokens").tolist() == [[0]]
    r = client.infer("tensorrt_llm", token_inputs(ids, 6, end_id=first[0], min_length=6, **greedy))
    out = r.as_numpy("output_ids").reshape(-1).tolist()
    assert r.as_numpy("num_output_tokens").tolist() == [[6]] and len(out) == 6 and first[0] not in out
    assert core.stats()["kv_used_tokens"] == 0


@pytest.mark.slow
def test_real_core_presence_and_frequency_penalties(real: Any) -> None:
    """TensorRT-LLM's presence_penalty / frequency_penalty inputs from a stock tritonclient reach the
    core: greedy, every token is the argmax of its raw logits row (generation_logits) after OpenAI's
    formula over the tokens generated before it, the output differs from the unpenalised one, and
    a value outside [-2, 2] is INVALID_ARGUMENT naming the input, the server serving on."""
    server, core, client = real
    ids = core.tokenizer.encode("def f(x):", add_bos=True, allow_special=True)
    greedy = {"exclude_input_in_output": True, "temperature": 0.0, "end_id": 0}
    plain = client.infer("tensorrt_llm", token_inputs(ids, 32, **greedy)).as_numpy("output_ids").reshape(-1).tolist()
    r = client.infer("tensorrt_llm", token_inputs(ids, 32, presence_penalty=0.5, frequency_penalty=1.0,
                                                  return_generation_logits=True, **greedy))
    out = r.as_numpy("output_ids").reshape(-1).tolist()
    rows = r.as_numpy("generation_logits").reshape(len(out), -1).astype(np.float64)
    assert len(out) == 32 and out != plain, plain
    for i, token in enumerate(out):
        counts = np.bincount(out[:i], minlength=rows.shape[1])
        assert token == int(np.argmax(rows[i] - counts * 1.0 - (counts > 0) * 0.5)), i
    # The text model takes them under the same names.
    text = client.infer("ensemble", text_inputs("def f(x):", 32, presence_penalty=0.5, frequency_penalty=1.0,
                                                 **greedy)).as_numpy("text_output")[0]
    assert text == core.tokenizer.decode(out).encode()
    for name in ("presence_penalty", "frequency_penalty"):
        expect_error(lambda name=name: client.infer("ensemble", text_inputs("hi", 4, **{name: 2.5})),
                     "INVALID_ARGUMENT", name)
    assert_serves_real(client)


@pytest.mark.slow
def test_real_core_guided_decoding(real: Any) -> None:
    """TensorRT-LLM's guided_decoding_guide_type / guided_decoding_guide from a stock tritonclient,
    text and token models, unary and streamed: the output is held to a JSON schema or a regex; a
    guide that does not compile (or an unknown type) is INVALID_ARGUMENT naming the input, with
    llguidance's message, and the server serves on."""
    import json

    import jsonschema

    server, core, client = real
    schema = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "ok": {"type": "boolean"}},
              "required": ["id", "ok"], "additionalProperties": False}
    sampled = {"exclude_input_in_output": True, "temperature": 1.0, "top_p": 1.0}
    for seed in range(3):
        inputs = text_inputs("def f(x):", 48, seed=seed, guided_decoding_guide_type=["json_schema"],
                             guided_decoding_guide=[json.dumps(schema)], **sampled)
        text = client.infer("ensemble", inputs).as_numpy("text_output")[0]
        jsonschema.validate(json.loads(text), schema)
        res = stream_infer(client, "ensemble", text_inputs("def f(x):", 48, seed=seed, stream=True,
                                                          guided_decoding_guide_type=["json_schema"],
                                                          guided_decoding_guide=[json.dumps(schema)], **sampled))
        assert not res.errors and res.text() == text
    ids = core.tokenizer.encode("import os", add_bos=True, allow_special=True)
    guide = [tensor("guided_decoding_guide_type", np.array([[b"regex"]], dtype=np.object_)),
             tensor("guided_decoding_guide", np.array([[rb"[0-9]{2}:[0-9]{2}"]], dtype=np.object_))]
    out = client.infer("tensorrt_llm", token_inputs(ids, 16, exclude_input_in_output=True, temperature=0.0) + guide)
    gen = out.as_numpy("output_ids").reshape(-1).tolist()
    assert re.fullmatch(r"[0-9]{2}:[0-9]{2}", core.tokenizer.decode(gen))
    for kind, bad, message in (("json_schema", '{"type": "objectx"}', "objectx"), ("regex", "[a-", "unclosed"),
                               ("xml", "<a/>", "guided_decoding_guide_type")):
        e = expect_error(lambda kind=kind, bad=bad: client.infer("ensemble", text_inputs(
            "hi", 4, guided_decoding_guide_type=[kind], guided_decoding_guide=[bad])), "INVALID_ARGUMENT",
            "guided_decoding_guide")
        assert message in e.message(), e.message()
    assert_serves_real(client)


def assert_serves_real(client: grpcclient.InferenceServerClient) -> None:
    r = client.infer("ensemble", text_inputs("ok", 4, min_tokens=4))
    assert r.as_numpy("num_output_tokens").tolist() == [[4]]


@pytest.mark.slow
def test_cli_serve_process_serves_and_stops_on_sigterm(tiny_engine: Path) -> None:
    """`llamaforge serve` end to end: free ports, one request, metrics, SIGTERM -> exit 0 (serve_process)."""
    with serve_process(tiny_engine, "--max-num-seqs", "2", "--max-queue", "4", "--kv-budget-tokens", "1024") as server:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        r = client.infer("ensemble", text_inputs("hi", 3, min_tokens=3))
        assert r.as_numpy("num_output_tokens").tolist() == [[3]]
        assert 'llamaforge_requests_total{outcome="length"} 1.0' in server.metrics()
