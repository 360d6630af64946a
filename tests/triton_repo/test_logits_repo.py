"""context_logits and generation_logits through the generated Triton repository, run in-process
against the stand-in (tests/helpers/pb_utils_standin.py): the `llama` model computes them for a
request whose return_*_logits flag is true, and the ensemble (llama -> postprocessing) and `bls`
hand them on unchanged, streamed or not, decoupled or not, one row or a batch (end_to_end_grpc_client's
--batch-inputs). Every tensor is checked against transformers' logits of the same tokens (the
oracle, computed here). The tensors' layouts are runtime/serving/protocol.py's ("Logits")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pb_utils_standin as pb
import pytest
import torch
from tiny_models import load_hf_oracle

from llamaforge import cli

pb.install()

ATOL = 1e-4  # fp32 parity tolerance of tests/runtime/test_parity.py
VOCAB = 640  # tiny_config()'s
CHUNK = 16  # llama's max_num_batched_tokens: the first prompt is prefilled in chunks
PROMPTS = ["import os\nimport sys\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n",
           "def f(x):"]
NEW_TOKENS = 8


def _repo(tiny_engine: Path, out: Path, *flags: str) -> Path:
    assert cli.main(["repo", str(tiny_engine), "--out", str(out), "--device", "cpu", "--kv-budget-tokens", "2048",
                     "--max-num-seqs", "4", "--max-num-batched-tokens", str(CHUNK), *flags]) == 0
    return out


@pytest.fixture(scope="module")
def hf(tiny_hf_checkpoint: Path) -> torch.nn.Module:
    return load_hf_oracle(tiny_hf_checkpoint)


@pytest.fixture(scope="module")
def server(tiny_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = pb.StandInServer(_repo(tiny_engine, tmp_path_factory.mktemp("repos") / "logits"))
    yield s
    s.stop()


def e2e_batch(prompts: list[str], stream: bool, **flags: bool) -> dict[str, np.ndarray]:
    """end_to_end_grpc_client's inputs for each prompt ([1, 1] tensors, with
    --return-context-logits --return-generation-logits), stacked along axis 0 (--batch-inputs)."""
    rows = [{"text_input": np.array([[p.encode()]], dtype=object), "max_tokens": np.array([[NEW_TOKENS]], np.int32),
             "stream": np.array([[stream]]), "beam_width": np.array([[1]], dtype=np.int32),
             "temperature": np.array([[1.0]], dtype=np.float32),
             **{name: np.array([[value]]) for name, value in flags.items()}} for p in prompts]
    return {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}


def check(hf: torch.nn.Module, prompt: list[int], context: np.ndarray, generation: np.ndarray) -> None:
    """context [P, V]: the prompt's logits; generation [N, V]: row i the logits its (greedy) token i
    was picked from, so the tokens are their argmax."""
    tokens = np.argmax(generation, axis=1).tolist()
    with torch.no_grad():
        want = hf(torch.tensor([prompt + tokens])).logits[0].numpy()
    assert context.dtype == generation.dtype == np.float32
    assert context.shape == (len(prompt), VOCAB) and len(tokens) >= 1
    assert np.abs(context - want[: len(prompt)]).max() <= ATOL
    assert np.abs(generation - want[len(prompt) - 1 : -1]).max() <= ATOL


def prompt_ids(server: Any, prompt: str) -> list[int]:
    ids: list[int] = server.models["llama"].core.tokenizer.encode(prompt, add_bos=True, allow_special=True)
    return ids


@pytest.mark.parametrize("model", ["ensemble", "bls"])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "streamed"])
def test_text_models_hand_the_logits_on(server: Any, hf: torch.nn.Module, model: str, stream: bool) -> None:
    call = server.infer(model, e2e_batch(PROMPTS, stream, return_context_logits=True,
                                         return_generation_logits=True)).wait()
    assert not call.errors, [e.message() for e in call.errors]
    by_row: dict[int, list[dict[str, np.ndarray]]] = {0: [], 1: []}
    for out in call.outputs:
        by_row[int(out["batch_index"][0][0])].append(out)
    for row, prompt in enumerate(PROMPTS):
        ids = prompt_ids(server, prompt)
        outs = by_row[row]
        assert outs and all(o["context_logits"].shape == (1, len(ids), VOCAB) for o in outs)  # every response
        if stream:  # each piece [1, its tokens, 1, vocab]
            assert all(o["generation_logits"].shape[2:] == (1, VOCAB) for o in outs)
            generation = np.concatenate([o["generation_logits"][0, :, 0] for o in outs])
        else:
            out, = outs
            assert out["generation_logits"].shape[:2] == (1, 1)
            generation = out["generation_logits"][0, 0]
        assert len(generation) == int(outs[-1]["num_output_tokens"][0][0])
        check(hf, ids, outs[-1]["context_logits"][0], generation)
    assert (len(prompt_ids(server, PROMPTS[0])) > CHUNK) and len(prompt_ids(server, PROMPTS[1])) <= CHUNK
    assert server.models["llama"].core.kv.all_free()


def test_logits_not_asked_for_do_not_leave_llama(server: Any) -> None:
    for model in ("ensemble", "bls"):
        call = server.infer(model, e2e_batch(PROMPTS[1:], True)).wait()
        assert not call.errors and call.outputs
        assert all("context_logits" not in o and "generation_logits" not in o for o in call.outputs)
    call = server.infer("ensemble", e2e_batch(PROMPTS[1:], False, return_generation_logits=True)).wait()
    out, = call.outputs
    assert "context_logits" not in out and out["generation_logits"].shape[:2] == (1, 1)


def test_llama_streams_the_token_models_logits(server: Any, hf: torch.nn.Module) -> None:
    ids = prompt_ids(server, PROMPTS[0])
    call = server.infer("llama", {"input_ids": np.array([ids], dtype=np.int32),
                                  "request_output_len": np.array([[NEW_TOKENS]], dtype=np.int32),
                                  "streaming": np.array([[True]]), "return_context_logits": np.array([[True]]),
                                  "return_generation_logits": np.array([[True]])}).wait()
    assert not call.errors and call.outputs
    tokens = [t for o in call.outputs for t in o["output_ids"][0][0].tolist()]
    generation = np.concatenate([o["generation_logits"][0, :, 0] for o in call.outputs])
    assert np.argmax(generation, axis=1).tolist() == tokens
    check(hf, ids, call.outputs[0]["context_logits"][0], generation)


def test_non_decoupled_batches_stack_the_rows_padded(tiny_engine: Path, tmp_path: Path, hf: torch.nn.Module) -> None:
    s = pb.StandInServer(_repo(tiny_engine, tmp_path / "unary", "--no-decoupled"))
    try:
        for model in ("ensemble", "bls"):
            call = s.infer(model, e2e_batch(PROMPTS, False, return_context_logits=True,
                                            return_generation_logits=True)).wait()
            assert not call.errors, [e.message() for e in call.errors]
            out, = call.outputs
            ids = [prompt_ids(s, p) for p in PROMPTS]
            lengths = [int(n[0]) for n in out["num_output_tokens"]]
            assert out["context_logits"].shape == (2, len(ids[0]), VOCAB)
            assert out["generation_logits"].shape == (2, 1, max(lengths), VOCAB)
            for row in range(2):
                check(hf, ids[row], out["context_logits"][row, : len(ids[row])],
                      out["generation_logits"][row, 0, : lengths[row]])
                assert not out["generation_logits"][row, 0, lengths[row]:].any()
            assert not out["context_logits"][1, len(ids[1]):].any()  # the shorter prompt's padding
    finally:
        s.stop()
