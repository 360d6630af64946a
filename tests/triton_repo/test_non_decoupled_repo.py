"""`make repo DECOUPLED=false`: the generated repository with llama and bls non-decoupled.

The configs carry `model_transaction_policy` with decoupled false for the two models that are
decoupled by default, and the Python-backend models, run in-process against the stand-in
(tests/helpers/pb_utils_standin.py, which requires a non-decoupled model's `execute` to return one
response per request and gives it no response sender, as Triton's Python backend does), answer each
request with one response: the whole text, equal to transformers' greedy output; a request that asks
to stream gets INVALID_ARG; the several requests of one `execute` call each get their own response, in order.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pb_utils_standin as pb
import pytest
import torch
from google.protobuf import text_format
from server_utils import wait_until
from tiny_models import load_hf_oracle
from tritonclient.grpc import model_config_pb2 as mc

from llamaforge import cli

pb.install()

NEW_TOKENS = 16
PROMPT = "def main(args):\n"


@pytest.fixture(scope="module")
def repo(tiny_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("repos") / "tiny-unary"
    assert cli.main(["repo", str(tiny_engine), "--out", str(out), "--device", "cpu", "--no-decoupled",
                     "--kv-budget-tokens", "2048", "--max-num-seqs", "4"]) == 0
    return out


@pytest.fixture(scope="module")
def server(repo: Path) -> Any:
    s = pb.StandInServer(repo)
    yield s
    s.stop()


def text_request(prompt: str, max_tokens: int, **flags: bool) -> dict[str, np.ndarray]:
    t = {"text_input": np.array([[prompt.encode()]], dtype=np.object_),
         "max_tokens": np.array([[max_tokens]], dtype=np.int32)}
    t.update({name: np.array([[value]], dtype=bool) for name, value in flags.items()})
    return t


def llama_request(ids: list[int], max_tokens: int, min_tokens: int = 0) -> pb.InferenceRequest:
    return pb.InferenceRequest(inputs=[
        pb.Tensor("input_ids", np.array([ids], dtype=np.int32)),
        pb.Tensor("request_output_len", np.array([[max_tokens]], dtype=np.int32)),
        pb.Tensor("min_tokens", np.array([[min_tokens]], dtype=np.int32)),
        pb.Tensor("exclude_input_in_output", np.array([[True]], dtype=bool)),
    ])


def greedy_ids(ckpt: Path, ids: list[int], eos: int) -> list[int]:
    hf = load_hf_oracle(ckpt)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                          max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    tokens = out[0, len(ids):].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_configs_make_llama_and_bls_non_decoupled(repo: Path) -> None:
    configs = {p.parent.name: p.read_text() for p in repo.glob("*/config.pbtxt")}
    for name in ("llama", "bls"):
        cfg = text_format.Parse(configs[name], mc.ModelConfig())
        assert cfg.HasField("model_transaction_policy") and not cfg.model_transaction_policy.decoupled, name
    for name in ("preprocessing", "postprocessing", "ensemble"):
        assert "model_transaction_policy" not in configs[name], name


def test_one_response_per_request_equals_transformers(server: Any, tiny_hf_checkpoint: Path) -> None:
    core = server.models["llama"].core
    ids = core.tokenizer.encode(PROMPT, add_bos=True, allow_special=True)
    want_ids = greedy_ids(tiny_hf_checkpoint, ids, core.eos_ids[0])
    want = core.tokenizer.decode(want_ids).encode()
    for model in ("ensemble", "bls"):
        call = server.infer(model, text_request(PROMPT, NEW_TOKENS, exclude_input_in_output=True)).wait(60)
        assert not call.errors and len(call.outputs) == 1, model
        assert bytes(call.outputs[0]["text_output"][0]) == want, model
        full = server.infer(model, text_request(PROMPT, NEW_TOKENS)).wait(60)
        assert bytes(full.outputs[0]["text_output"][0]) == PROMPT.encode() + want, model
    call = server.infer("llama", {t.name(): t.as_numpy() for t in llama_request(ids, NEW_TOKENS).inputs()}).wait(60)
    assert len(call.outputs) == 1 and call.outputs[0]["output_ids"].reshape(-1).tolist() == want_ids
    assert core.kv.all_free()


@pytest.mark.parametrize("model", ["ensemble", "bls"])
def test_num_return_sequences_come_stacked_in_the_one_response(server: Any, model: str) -> None:
    sampled = {**text_request(PROMPT, 8, exclude_input_in_output=True), "num_return_sequences": np.array([[2]], np.int32),
               "temperature": np.array([[1.0]], np.float32), "top_p": np.array([[1.0]], np.float32),
               "seed": np.array([[3]], np.uint64)}
    call = server.infer(model, sampled).wait(60)
    assert not call.errors and len(call.outputs) == 1, [e.message() for e in call.errors]
    out = call.outputs[0]
    assert out["text_output"].shape == (2,) and out["sequence_index"].reshape(-1).tolist() == [0, 1]
    assert out["text_output"][0] != out["text_output"][1], "each sequence samples on its own"
    assert server.models["llama"].core.kv.all_free()


@pytest.mark.parametrize("model", ["ensemble", "bls"])
def test_a_streaming_request_is_invalid_arg(server: Any, model: str) -> None:
    call = server.infer(model, text_request(PROMPT, 4, stream=True)).wait(30)
    assert not call.outputs and len(call.errors) == 1
    error = call.errors[0]
    assert error.code() == pb.TritonError.INVALID_ARG, error.message()
    assert "streaming (ensemble input stream)" in error.message() and "non-decoupled" in error.message()
    assert len(server.infer(model, text_request(PROMPT, 4)).wait(30).outputs) == 1  # still serving


def test_one_execute_answers_each_of_its_requests_in_order(server: Any) -> None:
    llama = server.models["llama"]
    ids = llama.core.tokenizer.encode(PROMPT, add_bos=True, allow_special=True)
    alone = llama.execute([llama_request(ids, 8, 8)])[0].output_tensors()
    responses = llama.execute([llama_request(ids, 40, 40), llama_request(ids[:3], 6, 6), llama_request(ids, 8, 8)])
    assert len(responses) == 3 and not any(r.has_error() for r in responses)
    lengths = [len(next(t for t in r.output_tensors() if t.name() == "output_ids").as_numpy().reshape(-1))
               for r in responses]
    assert lengths == [40, 6, 8]
    want = next(t for t in alone if t.name() == "output_ids").as_numpy()
    assert np.array_equal(next(t for t in responses[2].output_tensors() if t.name() == "output_ids").as_numpy(), want)
    assert llama.core.kv.all_free() and not llama._in_flight


def test_a_cancelled_request_gets_a_cancelled_response(server: Any) -> None:
    llama = server.models["llama"]
    ids = llama.core.tokenizer.encode(PROMPT, add_bos=True, allow_special=True)
    request = llama_request(ids, 400, 400)
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.extend(llama.execute([request])))
    thread.start()
    wait_until(lambda: llama.core.stats()["running"] == 1, timeout=30)
    request.cancelled.set()  # what the client's cancellation sets; the model polls it
    thread.join(60)
    assert len(result) == 1 and result[0].has_error()
    assert result[0].error().code() == pb.TritonError.CANCELLED
    assert llama.core.kv.all_free() and llama.core.stats()["running"] == 0
