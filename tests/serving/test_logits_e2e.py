"""context_logits and generation_logits through the real gRPC server, the real engine core and the
stock `tritonclient.grpc`, with requests built exactly as tensorrtllm_backend's clients build them
for --return-context-logits / --return-generation-logits (`end_to_end_grpc_client.py` on the text
model: the flags as [[True]] BOOL inputs and the two outputs requested by name;
`inflight_batcher_llm_client.py` on the token model: the flags, no outputs named, unary calls with
its "Streaming" parameter) and read the way they read them (`as_numpy(...)`, a stream's
`generation_logits[0]` on every response that has output_ids). Every tensor is checked against
transformers' logits of the same tokens (the oracle, computed here): the prompt's, and those of
the position before each returned token."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from server_utils import grpc_client, inflight_batcher_client_inputs, running_server, tensor
from tiny_models import load_hf_oracle
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
from llamaforge.runtime.core.engine_core import EngineCore

ATOL = 1e-4  # fp32 parity tolerance of tests/runtime/test_parity.py
CHUNK = 16  # the server's max_num_batched_tokens: longer prompts are prefilled in chunks
VOCAB = 640  # tiny_config()'s
LIMIT_ROWS = 300  # the server's max_logits_bytes, in vocabulary rows
# Longer than CHUNK tokens (checked below), and a short one.
TEXT_PROMPTS = ["import os\nimport sys\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n",
                "def f(x):"]


@pytest.fixture(scope="module")
def setup(tiny_hf_checkpoint: Path, tiny_engine: Path) -> Any:
    core = EngineCore(tiny_engine, CoreConfig(KVCacheConfig(budget_tokens=2048), SchedulerConfig(4, CHUNK),
                                              max_queue=16, max_logits_bytes=LIMIT_ROWS * VOCAB * 4))
    with running_server(core) as server:
        yield core, grpc_client(server), load_hf_oracle(tiny_hf_checkpoint)


def hf_logits(hf: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def check(hf: torch.nn.Module, prompt: list[int], context: np.ndarray, generation: np.ndarray,
          tokens: list[int]) -> None:
    """context [P, V] is the prompt's logits; generation [N, V] row i the logits token i was sampled from."""
    want = hf_logits(hf, prompt + tokens)
    assert context.dtype == generation.dtype == np.float32
    assert context.shape == (len(prompt), VOCAB) and generation.shape == (len(tokens), VOCAB)
    assert np.abs(context - want[: len(prompt)]).max() <= ATOL
    assert np.abs(generation - want[len(prompt) - 1 : -1]).max() <= ATOL


def _input(name: str, arr: np.ndarray) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr)
    return t


# -- the text model, as end_to_end_grpc_client sends -----------------------------------------------------


def e2e_inputs(prompt: str, output_len: int, streaming: bool) -> dict[str, np.ndarray]:
    """end_to_end_grpc_client's prepare_inputs with its default flags and --return-context-logits
    --return-generation-logits, in its order."""
    text = np.array([[prompt]]).astype(object)
    return {
        "text_input": text,
        "max_tokens": np.ones_like(text).astype(np.int32) * output_len,
        "stream": np.array([[streaming]], dtype=bool),
        "beam_width": np.array([[1]], dtype=np.int32),
        "temperature": np.array([[1.0]], dtype=np.float32),
        "return_context_logits": np.array([[True]], dtype=bool),
        "return_generation_logits": np.array([[True]], dtype=bool),
        "exclude_input_in_output": np.array([[False]], dtype=bool),
    }


def run_e2e(client: grpcclient.InferenceServerClient, prompts: list[str], output_len: int, streaming: bool,
            batch_inputs: bool) -> list[list[Any]]:
    """end_to_end_grpc_client's run_inference: a stream per request (the prompts stacked with
    --batch-inputs), the outputs it asks for; returns each row's results in order."""
    rows = [e2e_inputs(p, output_len, streaming) for p in prompts]
    requests = ([[_input(k, np.concatenate([r[k] for r in rows])) for k in rows[0]]] if batch_inputs
                else [[_input(k, v) for k, v in r.items()] for r in rows])
    names = ["text_output", "context_logits", "generation_logits"] + (["batch_index"] if batch_inputs else [])
    outputs = [grpcclient.InferRequestedOutput(n) for n in names]
    per_row: list[list[Any]] = [[] for _ in prompts]
    for i, inputs in enumerate(requests):
        done: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error, done=done: done.put((result, error)))
        client.async_stream_infer("ensemble", inputs, outputs=outputs, request_id="")
        client.stop_stream()
        while not done.empty():
            result, error = done.get()
            assert error is None, error
            index = result.as_numpy("batch_index")
            per_row[i if index is None else int(index[0][0])].append(result)
    return per_row


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streamed"])
@pytest.mark.parametrize("batch_inputs", [False, True], ids=["one-by-one", "batch-inputs"])
def test_e2e_client_text_model_logits(setup: Any, streaming: bool, batch_inputs: bool) -> None:
    core, client, hf = setup
    per_row = run_e2e(client, TEXT_PROMPTS, 10, streaming, batch_inputs)
    for prompt, results in zip(TEXT_PROMPTS, per_row):
        ids = core.tokenizer.encode(prompt, add_bos=True, allow_special=True)
        assert (len(ids) > CHUNK) == (prompt == TEXT_PROMPTS[0])  # one chunked prefill, one not
        contexts = [r.as_numpy("context_logits") for r in results]
        assert contexts and all(c is not None and c.shape == (1, len(ids), VOCAB) for c in contexts)
        if streaming:  # each piece: [1, its tokens, beam 1, vocab]
            pieces = [r.as_numpy("generation_logits") for r in results]
            assert all(g.ndim == 4 and g.shape[0] == 1 and g.shape[2:] == (1, VOCAB) for g in pieces)
            generation = np.concatenate([g[0, :, 0] for g in pieces])
            text = b"".join(r.as_numpy("text_output")[0] for r in results).decode()
        else:  # one whole answer: [1, beam 1, tokens, vocab]
            result, = results
            g = result.as_numpy("generation_logits")
            assert g.ndim == 4 and g.shape[:2] == (1, 1)
            generation = g[0, 0]
            text = result.as_numpy("text_output")[0].decode()
            assert text.startswith(prompt)  # exclude_input_in_output false
            text = text[len(prompt):]
        tokens = np.argmax(generation, axis=1).tolist()  # greedy (temperature alone samples nothing)
        assert len(tokens) >= 1 and text == core.tokenizer.decode(tokens)
        check(hf, ids, contexts[-1][0], generation, tokens)
        for c in contexts:
            np.testing.assert_array_equal(c, contexts[0])


# -- the token model, as inflight_batcher_llm_client sends -----------------------------------------------


def ib_inputs(ids: list[int], output_len: int, streaming: bool, eos: int) -> list[grpcclient.InferInput]:
    """inflight_batcher_llm_client's inputs (end and pad id its tokenizer's EOS) and the two logits flags."""
    return inflight_batcher_client_inputs(ids, output_len, streaming=streaming, end_id=eos, pad_id=eos,
                                          return_context_logits=True, return_generation_logits=True)


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streamed"])
def test_ib_client_token_model_logits(setup: Any, streaming: bool) -> None:
    core, client, hf = setup
    ids = torch.randint(3, 600, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    inputs = ib_inputs(ids, 12, streaming, core.eos_ids[0])
    got: queue.Queue[tuple[Any, Any]] = queue.Queue()
    if streaming:
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer("tensorrt_llm", inputs, outputs=None, request_id="12345")
        client.stop_stream()
    else:
        client.async_infer("tensorrt_llm", inputs, outputs=None, request_id="12345",
                           callback=lambda result, error: got.put((result, error)), parameters={"Streaming": False})
    results = []
    while streaming and not got.empty() or not streaming and not results:
        result, error = got.get(timeout=30)
        assert error is None, error
        results.append(result)
    tokens: list[int] = []
    rows = []
    for result in results:  # the client reads both on every response that has output_ids
        assert result.as_numpy("output_ids") is not None
        context = result.as_numpy("context_logits")
        generation = result.as_numpy("generation_logits")[0]
        assert context.shape == (1, len(ids), VOCAB)
        new = result.as_numpy("output_ids")[0][0].tolist()
        if streaming:  # [its tokens, beam 1, vocab]
            assert generation.shape == (len(new), 1, VOCAB)
            rows.append(generation[:, 0])
            tokens += new
        else:  # [beam 1, tokens, vocab]; output_ids start with the prompt (exclude_input_in_output unset)
            assert new[: len(ids)] == ids
            tokens = new[len(ids):]
            assert generation.shape == (1, len(tokens), VOCAB)
            rows.append(generation[0])
    assert len(tokens) >= 1
    check(hf, ids, context[0], np.concatenate(rows), tokens)


def test_unary_batch_stacks_rows_padded_with_zeros(setup: Any) -> None:
    """Two rows of a ModelInfer (prompts of 40 and 7 tokens, 6 and 3 new tokens): each tensor stacks
    the rows, the shorter row padded with 0 as output_ids are."""
    core, client, hf = setup
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 600, (n,), generator=g).tolist() for n in (40, 7)]
    r = client.infer("tensorrt_llm", [
        tensor("input_ids", np.array([prompts[0], prompts[1] + [0] * 33], dtype=np.int32)),
        tensor("input_lengths", np.array([[40], [7]], dtype=np.int32)),
        tensor("request_output_len", np.array([[6], [3]], dtype=np.int32)),
        tensor("min_tokens", np.array([[6], [3]], dtype=np.int32)),  # no end id before the length
        tensor("exclude_input_in_output", np.array([[True], [True]], dtype=bool)),
        tensor("return_context_logits", np.array([[True], [True]], dtype=bool)),
        tensor("return_generation_logits", np.array([[True], [True]], dtype=bool))])
    context, generation = r.as_numpy("context_logits"), r.as_numpy("generation_logits")
    assert context.shape == (2, 40, VOCAB) and generation.shape == (2, 1, 6, VOCAB)
    assert r.as_numpy("sequence_length").tolist() == [[6], [3]]
    for row, (prompt, n) in enumerate(zip(prompts, (6, 3))):
        tokens = r.as_numpy("output_ids")[row][0][:n].tolist()
        check(hf, prompt, context[row, : len(prompt)], generation[row, 0, :n], tokens)
    assert not context[1, 7:].any() and not generation[1, 0, 3:].any()


def test_unary_batch_rows_that_did_not_ask_are_zeros(setup: Any) -> None:
    """The flags are per row: a row that did not ask has zeros where the other row's logits are."""
    _, client, hf = setup
    prompts = [[5, 6, 7, 8], [9, 10]]
    r = client.infer("tensorrt_llm", [
        tensor("input_ids", np.array([prompts[0], prompts[1] + [0, 0]], dtype=np.int32)),
        tensor("input_lengths", np.array([[4], [2]], dtype=np.int32)),
        tensor("request_output_len", np.array([[3], [3]], dtype=np.int32)),
        tensor("min_tokens", np.array([[3], [3]], dtype=np.int32)),
        tensor("exclude_input_in_output", np.array([[True], [True]], dtype=bool)),
        tensor("return_context_logits", np.array([[True], [False]], dtype=bool)),
        tensor("return_generation_logits", np.array([[False], [True]], dtype=bool))])
    context, generation = r.as_numpy("context_logits"), r.as_numpy("generation_logits")
    assert context.shape == (2, 4, VOCAB) and generation.shape == (2, 1, 3, VOCAB)
    assert not context[1].any() and not generation[0].any()
    check(hf, prompts[1], hf_logits(hf, prompts[1]), generation[1, 0], r.as_numpy("output_ids")[1][0].tolist())
    assert np.abs(context[0] - hf_logits(hf, prompts[0])).max() <= ATOL


def test_logits_not_asked_for_are_not_returned_even_when_named(setup: Any) -> None:
    """As TensorRT-LLM: the flags compute them; naming the outputs alone returns nothing."""
    _, client, _ = setup
    r = client.infer("ensemble", [tensor("text_input", np.array([[b"def f(x):"]], dtype=object)),
                                  tensor("max_tokens", np.array([[4]], dtype=np.int32))],
                     outputs=[grpcclient.InferRequestedOutput(n) for n in ("text_output", "context_logits",
                                                                           "generation_logits")])
    assert r.as_numpy("text_output") is not None
    assert r.as_numpy("context_logits") is None and r.as_numpy("generation_logits") is None


def test_logits_past_the_limit_are_invalid_argument_naming_the_flag(setup: Any) -> None:
    _, client, _ = setup
    with pytest.raises(InferenceServerException) as info:
        client.infer("tensorrt_llm", [tensor("input_ids", np.array([[5, 6, 7]], dtype=np.int32)),
                                      tensor("request_output_len", np.array([[LIMIT_ROWS + 1]], dtype=np.int32)),
                                      tensor("return_generation_logits", np.array([[True]], dtype=bool))])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message().startswith("return_generation_logits") and "max_tokens" in info.value.message()
