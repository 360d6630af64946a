"""The batch dimension and TensorRT-LLM's full output set on the standalone server (issue 17, 4):
requests built exactly as tensorrtllm_backend's clients build them
(`inflight_batcher_llm/client/end_to_end_grpc_client.py` for the text model,
`inflight_batcher_llm_client.py` for the token model: shapes, dtypes, requested outputs, RPC), and
read the way those clients read the answers (`batch_index[0][0]`, `sequence_index[0][0]`,
`text_output[0]`, each perf metric `[0][0]`). The fake core echoes the prompt, so every row's
expected text is known."""

from __future__ import annotations

import queue
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from fake_core import EOS, FakeConfig, FakeCore
from server_utils import grpc_client, inflight_batcher_client_inputs, running_server, tensor, wait_until
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from llamaforge.runtime.serving.model_interface import MAX_BATCH_SIZE, PERF_METRIC_OUTPUTS, TEXT_MODEL, TOKEN_MODEL

PERF_NAMES = [t.name for t in PERF_METRIC_OUTPUTS]


@pytest.fixture
def client() -> Any:
    core = FakeCore(FakeConfig(max_num_seqs=4, max_queue=16), context_length=256)
    with running_server(core) as server:
        yield grpc_client(server)


def _input(name: str, arr: np.ndarray) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr)
    return t


def e2e_row(prompt: str, output_len: int, *, streaming: bool, num_return_sequences: int | None = None,
            return_perf_metrics: bool = False, beam_width: int = 1) -> dict[str, np.ndarray]:
    """One prompt's inputs as end_to_end_grpc_client's prepare_inputs builds them with its default
    flags (temperature 1.0, beam width 1, exclude_input_in_output false) plus the given ones."""
    text = np.array([[prompt]]).astype(object)
    inputs = {
        "text_input": text,
        "max_tokens": np.ones_like(text).astype(np.int32) * output_len,
        "stream": np.array([[streaming]], dtype=bool),
        "beam_width": np.array([[beam_width]], dtype=np.int32),
        "temperature": np.array([[1.0]], dtype=np.float32),
    }
    if num_return_sequences is not None:
        inputs["num_return_sequences"] = np.array([[num_return_sequences]], dtype=np.int32)
    inputs["exclude_input_in_output"] = np.array([[False]], dtype=bool)
    if return_perf_metrics:
        inputs["return_perf_metrics"] = np.array([[True]], dtype=bool)
    return inputs


def e2e_outputs(*, batch_inputs: bool, num_return_sequences: int | None,
                return_perf_metrics: bool) -> list[grpcclient.InferRequestedOutput]:
    """The outputs end_to_end_grpc_client asks for. Its `-n N` asks for sequence_index (the
    versions this issue quotes did for any N; newer ones for N > 1): asked for whenever -n is given."""
    names = ["text_output"]
    if num_return_sequences is not None:
        names.append("sequence_index")
    if batch_inputs:
        names.append("batch_index")
    if return_perf_metrics:
        names.extend(PERF_NAMES)
    return [grpcclient.InferRequestedOutput(n) for n in names]


def run_e2e(client: grpcclient.InferenceServerClient, prompts: list[str], output_len: int, *, streaming: bool,
            batch_inputs: bool, num_return_sequences: int | None = None,
            return_perf_metrics: bool = False, beam_width: int = 1) -> tuple[list[list[str]], list[Any], list[Any]]:
    """end_to_end_grpc_client's run_inference: one stream per request (all prompts stacked along
    axis 0 with --batch-inputs), outputs parsed by batch_index / sequence_index (num_return_sequences
    of them, or beam_width when it is not given). Returns the texts per row and sequence, the
    results and the errors."""
    rows = [e2e_row(p, output_len, streaming=streaming, num_return_sequences=num_return_sequences,
                    return_perf_metrics=return_perf_metrics, beam_width=beam_width) for p in prompts]
    num_generations = beam_width if num_return_sequences is None else num_return_sequences
    if batch_inputs:
        requests = [[_input(k, np.concatenate([r[k] for r in rows], axis=0)) for k in rows[0]]]
    else:
        requests = [[_input(k, v) for k, v in r.items()] for r in rows]
    outputs = e2e_outputs(batch_inputs=batch_inputs, num_return_sequences=num_return_sequences,
                          return_perf_metrics=return_perf_metrics)
    texts: list[list[str]] = []
    results, errors = [], []
    for inputs in requests:
        done: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error, done=done: done.put((result, error)))
        batch_size = inputs[0].shape()[0]
        client.async_stream_infer("ensemble", inputs, outputs=outputs, request_id="")
        client.stop_stream()  # waits for the server to end the stream
        batch_text = [[""] * num_generations for _ in range(batch_size)]
        while not done.empty():
            result, error = done.get()
            if error is not None:
                errors.append(error)
                continue
            results.append(result)
            output = result.as_numpy("text_output")
            batch_index = result.as_numpy("batch_index")
            batch_index = 0 if batch_index is None else batch_index[0][0]
            seq_index = result.as_numpy("sequence_index")
            seq_index = 0 if seq_index is None else seq_index[0][0]
            if streaming and beam_width == 1:
                batch_text[batch_index][seq_index] += output[0].decode("utf-8")
            else:
                batch_text[batch_index][seq_index] = output[0].decode("utf-8")
        texts.extend(batch_text)
    return texts, results, errors


# -- the text model, as end_to_end_grpc_client sends ---------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_e2e_client_default_flags(client: Any, streaming: bool) -> None:
    texts, results, errors = run_e2e(client, ["abc"], 8, streaming=streaming, batch_inputs=False)
    assert not errors
    assert texts == [["abc" if streaming else "abcabc"]]  # unary: the prompt, then the echo
    assert all(r.as_numpy("batch_index") is None for r in results)  # not asked for, not sent


@pytest.mark.parametrize("streaming", [False, True])
def test_e2e_client_batch_inputs_each_row_its_own_sequence(client: Any, streaming: bool) -> None:
    prompts = ["abc", "hello wörld", "xy"]
    texts, results, errors = run_e2e(client, prompts, 32, streaming=streaming, batch_inputs=True)
    assert not errors
    assert texts == [[p if streaming else p + p] for p in prompts]
    indices = [int(r.as_numpy("batch_index")[0][0]) for r in results]
    assert sorted(set(indices)) == [0, 1, 2]
    for r in results:
        assert r.as_numpy("batch_index").shape == (1, 1) and r.as_numpy("batch_index").dtype == np.int32
    finals = [r for r in results if r.get_response().parameters["triton_final_response"].bool_param]
    assert len(finals) == 1 and finals[0] is results[-1]  # the request ends once, after its last row
    if not streaming:
        assert len(results) == len(prompts)  # one whole answer per row


def test_e2e_client_batch_rows_are_in_flight_together() -> None:
    """Each row is its own sequence in the running batch, not a queue of one-row requests."""
    core = FakeCore(FakeConfig(max_num_seqs=4, max_queue=16), context_length=256)
    with running_server(core) as server:
        client = grpc_client(server)
        core.hold()
        done: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: done.put((result, error)))
        rows = [e2e_row(p, 4, streaming=True) for p in ("aa", "bb")]
        client.async_stream_infer("ensemble", [_input(k, np.concatenate([r[k] for r in rows])) for k in rows[0]])
        wait_until(lambda: len(core.submitted) == 2)
        assert [list(r.prompt_ids) for r in core.submitted] == [[256, 97, 97], [256, 98, 98]]
        core.release()
        client.stop_stream()
        assert done.qsize() >= 2 and all(error is None for result, error in list(done.queue))


def test_e2e_client_num_return_sequences_1(client: Any) -> None:
    for streaming in (False, True):
        texts, results, errors = run_e2e(client, ["abc"], 8, streaming=streaming, batch_inputs=False,
                                         num_return_sequences=1)
        assert not errors and texts == [["abc" if streaming else "abcabc"]]
        assert all(r.as_numpy("sequence_index").tolist() == [[0]] for r in results)


@pytest.mark.parametrize("streaming", [False, True])
def test_e2e_client_num_return_sequences_each_its_own_responses(client: Any, streaming: bool) -> None:
    texts, results, errors = run_e2e(client, ["abc", "xy"], 8, streaming=streaming, batch_inputs=True,
                                     num_return_sequences=3)
    assert not errors
    assert texts == [["abc" if streaming else "abcabc"] * 3, ["xy" if streaming else "xyxy"] * 3]
    tags = {(int(r.as_numpy("batch_index")[0][0]), int(r.as_numpy("sequence_index")[0][0])) for r in results}
    assert tags == {(b, i) for b in range(2) for i in range(3)}
    finals = [r for r in results if r.get_response().parameters["triton_final_response"].bool_param]
    assert len(finals) == 1 and finals[0] is results[-1]  # the request ends once, after its last sequence
    if not streaming:
        assert len(results) == 6  # one whole answer per row and sequence


def test_e2e_client_beam_width_reaches_the_core_as_beam_search() -> None:
    """end_to_end_grpc_client --beam-width 2: two beams (num_return_sequences defaults to the beam
    width), with the length penalty and early stopping Triton's inputs name, answered as TensorRT-LLM
    answers a beam search: one response per row, its beams stacked (text_output [beam], output_ids
    [1, beam, len]); the client prints the best, text_output[0]."""
    core = FakeCore(FakeConfig(max_num_seqs=4, max_queue=16), context_length=256)
    with running_server(core) as server:
        client = grpc_client(server)
        texts, results, errors = run_e2e(client, ["abc", "xy"], 8, streaming=False, batch_inputs=True, beam_width=2)
        assert not errors and texts == [["abcabc", ""], ["xyxy", ""]]
        assert len(results) == 2 and all(r.as_numpy("text_output").shape == (2,) for r in results)
        assert {r.as_numpy("text_output")[1] for r in results} == {b"abcabc", b"xyxy"}
        req = core.submitted[0]
        assert (req.beam_width, req.n, req.length_penalty, req.early_stopping) == (2, 2, 1.0, False)
        inputs = e2e_row("abc", 8, streaming=False, beam_width=3)
        inputs["num_return_sequences"] = np.array([[2]], dtype=np.int32)
        inputs["length_penalty"] = np.array([[0.5]], dtype=np.float32)
        inputs["early_stopping"] = np.array([[True]], dtype=bool)
        result = client.infer("ensemble", [_input(k, v) for k, v in inputs.items()])
        assert result.as_numpy("text_output").tolist() == [b"abcabc", b"abcabc"]  # the best two beams
        req = core.submitted[-1]
        assert (req.beam_width, req.n, req.length_penalty, req.early_stopping) == (3, 2, 0.5, True)


@pytest.mark.parametrize("streaming", [False, True])
def test_e2e_client_return_perf_metrics(client: Any, streaming: bool) -> None:
    texts, results, errors = run_e2e(client, ["abcdefghijklmnopqrst", "ab"], 64, streaming=streaming,
                                     batch_inputs=True, return_perf_metrics=True)
    assert not errors and texts[1] == [("ab" if streaming else "abab")]
    for r in results:
        m = {name: r.as_numpy(name) for name in PERF_NAMES}
        assert all(v is not None and v.shape == (1, 1) for v in m.values()), m
        assert m["arrival_time_ns"].dtype == np.int64 and m["acceptance_rate"].dtype == np.float32
        assert m["kv_cache_alloc_new_blocks"].dtype == np.int32
        v = {name: a[0][0] for name, a in m.items()}
        assert 0 < v["arrival_time_ns"] <= v["first_scheduled_time_ns"] <= v["first_token_time_ns"] \
            <= v["last_token_time_ns"]
        assert v["kv_cache_reused_blocks"] == 0 and v["kv_cache_alloc_new_blocks"] == v["kv_cache_alloc_total_blocks"]
        assert v["kv_cache_alloc_total_blocks"] >= 1
        assert v["acceptance_rate"] == 0 and v["total_accepted_draft_tokens"] == v["total_draft_tokens"] == 0
    last = {int(r.as_numpy("batch_index")[0][0]): r for r in results}
    # 1 BOS + 20 prompt + 20 echoed tokens in 16-token blocks of the fake: 3 blocks; the short row 1
    assert last[0].as_numpy("kv_cache_alloc_total_blocks")[0][0] == 3
    assert last[1].as_numpy("kv_cache_alloc_total_blocks")[0][0] == 1


def test_text_model_declares_trtllm_output_set() -> None:
    want = {"text_output", "cum_log_probs", "output_log_probs", "context_logits", "generation_logits", "batch_index",
            "sequence_index", *PERF_NAMES, "num_input_tokens", "num_output_tokens"}
    assert set(TEXT_MODEL.output_names) == want
    assert set(TOKEN_MODEL.output_names) == (want - {"text_output"}) | {"output_ids", "sequence_length"}


# -- unary batches ---------------------------------------------------------------------------------------


def test_unary_batch_stacks_rows_with_batch_index(client: Any) -> None:
    prompts = [b"abc", b"hello"]
    inputs = [tensor("text_input", np.array([[p] for p in prompts], dtype=object)),
              tensor("max_tokens", np.array([[16], [16]], dtype=np.int32)),
              tensor("exclude_input_in_output", np.array([[True], [False]], dtype=bool))]
    r = client.infer("ensemble", inputs)
    assert r.as_numpy("text_output").tolist() == [b"abc", b"hellohello"]
    assert r.as_numpy("batch_index").tolist() == [[0], [1]]
    assert r.as_numpy("num_output_tokens").tolist() == [[3], [5]]
    tok = client.infer("tensorrt_llm", [
        tensor("input_ids", np.array([[97, 98, 99], [120, 0, 0]], dtype=np.int32)),
        tensor("input_lengths", np.array([[3], [1]], dtype=np.int32)),
        tensor("request_output_len", np.array([[8], [8]], dtype=np.int32)),
        tensor("exclude_input_in_output", np.array([[True], [True]], dtype=bool))])
    # Row 1's ids are padded with 0 to row 0's length; sequence_length gives each row's own.
    assert tok.as_numpy("output_ids").tolist() == [[[97, 98, 99]], [[120, 0, 0]]]
    assert tok.as_numpy("sequence_length").tolist() == [[3], [1]]


def test_max_tokens_one_by_one_and_batchless_shapes_both_work(client: Any) -> None:
    for shape in ((1, 1), (1,)):
        r = client.infer("ensemble", [tensor("text_input", np.array([b"abc"], dtype=object).reshape(shape)),
                                      tensor("max_tokens", np.array([2], dtype=np.int32).reshape(shape)),
                                      tensor("exclude_input_in_output", np.array([True]).reshape(shape))])
        assert r.as_numpy("text_output").tolist() == [b"ab"]


@pytest.mark.parametrize("case, field", [
    ("mismatch", "max_tokens"),
    ("too many rows", "text_input"),
    ("wrong rank", "max_tokens"),
])
def test_bad_batch_is_invalid_argument_naming_the_field(client: Any, case: str, field: str) -> None:
    rows = MAX_BATCH_SIZE + 1 if case == "too many rows" else 2
    max_tokens = np.full((rows if case != "mismatch" else 3, 1), 4, dtype=np.int32)
    if case == "wrong rank":
        max_tokens = max_tokens.reshape(rows, 1, 1)
    inputs = [tensor("text_input", np.array([[b"a"]] * rows, dtype=object)), tensor("max_tokens", max_tokens)]
    with pytest.raises(InferenceServerException) as info:
        client.infer("ensemble", inputs)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT" and info.value.message().startswith(field)


def test_one_bad_row_refuses_the_whole_request_and_submits_nothing() -> None:
    core = FakeCore(FakeConfig(), context_length=256)
    with running_server(core) as server:
        client = grpc_client(server)
        with pytest.raises(InferenceServerException) as info:
            client.infer("ensemble", [tensor("text_input", np.array([[b"ok"], [b"\xff"]], dtype=object)),
                                      tensor("max_tokens", np.array([[4], [4]], dtype=np.int32))])
        assert info.value.message().startswith("text_input") and core.submitted == []


# -- the token model, as inflight_batcher_llm_client sends -------------------------------------------------


def ib_client_inputs(ids: list[int], output_len: int, *, streaming: bool, num_return_sequences: int | None = None,
                     return_perf_metrics: bool = False) -> list[grpcclient.InferInput]:
    """The client's inputs with its default pad id and the end id its tokenizer gives."""
    flags: dict[str, bool | int] = {}
    if num_return_sequences is not None:
        flags["num_return_sequences"] = num_return_sequences
    if return_perf_metrics:
        flags["return_perf_metrics"] = True
    return inflight_batcher_client_inputs(ids, output_len, streaming=streaming, end_id=EOS, pad_id=50256, **flags)


def test_ib_client_unary_with_its_streaming_parameter(client: Any) -> None:
    ids = [72, 105, 33]
    r = client.infer("tensorrt_llm", ib_client_inputs(ids, 16, streaming=False, return_perf_metrics=True),
                     request_id="", parameters={"Streaming": False})
    assert list(r.as_numpy("output_ids")[0][0]) == ids + ids  # prompt, then the echo
    assert r.as_numpy("sequence_length")[0][0] == 6
    assert r.as_numpy("sequence_index") is None  # not asked for (no outputs named: the defaults)
    assert all(r.as_numpy(name)[0][0] is not None for name in PERF_NAMES)


def test_ib_client_stream_with_n_1_reads_sequence_index(client: Any) -> None:
    ids = [72, 105, 33]
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer("tensorrt_llm", ib_client_inputs(ids, 16, streaming=True, num_return_sequences=1),
                              request_id="", outputs=None)
    client.stop_stream()
    tokens: list[int] = []
    while not got.empty():
        result, error = got.get()
        assert error is None, error
        seq_idx = result.as_numpy("sequence_index")
        assert seq_idx is None or seq_idx[0][0] == 0
        if result.as_numpy("sequence_length")[0][0] > 0:
            tokens += list(result.as_numpy("output_ids")[0][0])
    assert tokens == ids


def test_token_model_stream_batch_rows_carry_batch_index(client: Any) -> None:
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    client.async_stream_infer("tensorrt_llm", [
        tensor("input_ids", np.array([[65, 66, 67, 68], [90, 0, 0, 0]], dtype=np.int32)),
        tensor("input_lengths", np.array([[4], [1]], dtype=np.int32)),
        tensor("request_output_len", np.array([[8], [8]], dtype=np.int32)),
        tensor("streaming", np.array([[True], [True]], dtype=bool))],
        outputs=[grpcclient.InferRequestedOutput("output_ids"), grpcclient.InferRequestedOutput("batch_index")])
    client.stop_stream()
    per_row: dict[int, list[int]] = {0: [], 1: []}
    while not got.empty():
        result, error = got.get()
        assert error is None, error
        per_row[int(result.as_numpy("batch_index")[0][0])] += result.as_numpy("output_ids")[0][0].tolist()
    assert per_row == {0: [65, 66, 67, 68], 1: [90]}


def test_queue_full_midway_refuses_the_request_and_cancels_its_admitted_rows() -> None:
    core = FakeCore(FakeConfig(max_num_seqs=1, max_queue=2), context_length=256)
    with running_server(core) as server:
        client = grpc_client(server)
        core.hold()  # nothing leaves the queue: the third row finds it full
        rows = [e2e_row(p, 4, streaming=True) for p in ("aa", "bb", "cc")]
        batch = [_input(k, np.concatenate([r[k] for r in rows])) for k in rows[0]]
        got: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer("ensemble", batch, request_id="full")
        result, error = got.get(timeout=10)
        assert result is None and "queue full" in error.message() and "'full'" in error.message()
        core.release()
        wait_until(lambda: len(core.cancelled) == 2)  # the two admitted rows, cancelled
        client.async_stream_infer("ensemble", [_input(k, v) for k, v in e2e_row("ok", 4, streaming=False).items()])
        result, error = got.get(timeout=10)
        assert error is None and result.as_numpy("text_output")[0] == b"okok"
        client.stop_stream()
        assert got.empty()  # the cancelled rows sent nothing
        unary_rows = [e2e_row(p, 4, streaming=False) for p in ("aa", "bb", "cc")]
        core.hold()
        with pytest.raises(InferenceServerException) as info:
            client.infer("ensemble", [_input(k, np.concatenate([r[k] for r in unary_rows])) for k in unary_rows[0]])
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        core.release()
        wait_until(lambda: len(core.cancelled) == 4)
