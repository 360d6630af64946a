"""The generated Triton repository with a batch dimension (issue 17, 4): every model declares
max_batch_size > 0, the stand-in checks shapes as Triton does then (the batch dimension first,
one batch size per request), and a request of B rows (end_to_end_grpc_client's --batch-inputs:
text_input [B, 1]) is B sequences in llama's running batch, each of whose responses carries its
batch_index, through the ensemble and bls, streamed or not, decoupled or not; the rows' texts are
the texts the same prompts get one by one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pb_utils_standin as pb
import pytest

from llamaforge import cli
from llamaforge.runtime.serving.model_interface import PERF_METRIC_OUTPUTS

pb.install()

PROMPTS = ["def main(args):\n", "The quick brown fox", "x"]
NEW_TOKENS = 8


def _repo(tiny_engine: Path, out: Path, *flags: str) -> Path:
    assert cli.main(["repo", str(tiny_engine), "--out", str(out), "--device", "cpu", "--kv-budget-tokens", "2048",
                     "--max-num-seqs", "4", *flags]) == 0
    return out


@pytest.fixture(scope="module")
def server(tiny_engine: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = pb.StandInServer(_repo(tiny_engine, tmp_path_factory.mktemp("repos") / "batch"))
    yield s
    s.stop()


def e2e_batch(prompts: list[str], max_tokens: int, **flags: bool) -> dict[str, np.ndarray]:
    """end_to_end_grpc_client's --batch-inputs: each prompt's [1, 1] tensors stacked along axis 0."""
    rows = []
    for p in prompts:
        text = np.array([[p]]).astype(object)
        row = {"text_input": np.array([[p.encode()]], dtype=object),
               "max_tokens": np.ones_like(text).astype(np.int32) * max_tokens,
               "beam_width": np.array([[1]], dtype=np.int32), "temperature": np.array([[1.0]], dtype=np.float32)}
        row.update({name: np.array([[value]], dtype=bool) for name, value in flags.items()})
        rows.append(row)
    return {name: np.concatenate([r[name] for r in rows], axis=0) for name in rows[0]}


def texts_by_row(call: pb.Call, rows: int) -> list[bytes]:
    assert not call.errors, [e.message() for e in call.errors]
    texts = [b""] * rows
    for out in call.outputs:
        assert out["batch_index"].shape == (1, 1) and out["batch_index"].dtype == np.int32
        texts[int(out["batch_index"][0][0])] += bytes(out["text_output"][0])
    return texts


@pytest.mark.parametrize("model", ["ensemble", "bls"])
@pytest.mark.parametrize("stream", [False, True])
def test_batch_rows_equal_the_prompts_one_by_one(server: Any, model: str, stream: bool) -> None:
    one_by_one = [texts_by_row(server.infer(model, e2e_batch([p], NEW_TOKENS, stream=stream)).wait(), 1)[0]
                  for p in PROMPTS]
    call = server.infer(model, e2e_batch(PROMPTS, NEW_TOKENS, stream=stream)).wait()
    assert texts_by_row(call, len(PROMPTS)) == one_by_one
    assert call.finals == 1  # the stand-in fails a response after the final one
    if not stream:
        assert len(call.outputs) == len(PROMPTS)  # one whole answer per row
        assert all(t.startswith(p.encode()) for t, p in zip(one_by_one, PROMPTS))  # prompt first
    assert server.models["llama"].core.kv.all_free()


def test_batch_rows_share_the_running_batch(server: Any) -> None:
    core = server.models["llama"].core
    call = server.infer("ensemble", e2e_batch(PROMPTS[:2], 200, stream=True, exclude_input_in_output=True)
                        | {"min_tokens": np.array([[200], [200]], dtype=np.int32)})
    for n in range(2, 200):  # until both rows have answered
        call.wait_for(n)
        if {int(o["batch_index"][0][0]) for o in call.outputs} == {0, 1}:
            break
    assert core.stats()["running"] == 2  # both rows in flight at once (each has 200 tokens to go)
    call.cancel()
    call.wait(30)
    assert call.errors and call.errors[-1].code() == pb.TritonError.CANCELLED
    assert core.kv.all_free()


def test_perf_metrics_come_through_the_ensemble(server: Any) -> None:
    call = server.infer("ensemble", e2e_batch(PROMPTS[:2], NEW_TOKENS, return_perf_metrics=True)).wait()
    assert not call.errors
    for out in call.outputs:
        for spec in PERF_METRIC_OUTPUTS:
            assert out[spec.name].shape == (1, 1), spec.name
        assert 0 < out["arrival_time_ns"][0][0] <= out["first_scheduled_time_ns"][0][0] \
            <= out["first_token_time_ns"][0][0] <= out["last_token_time_ns"][0][0]
        assert out["kv_cache_alloc_total_blocks"][0][0] >= 1 and out["kv_cache_reused_blocks"][0][0] == 0
        assert out["sequence_index"].tolist() == [[0]]


def test_token_model_batch_with_padded_ids(server: Any) -> None:
    core = server.models["llama"].core
    ids = [core.tokenizer.encode(p, add_bos=True) for p in PROMPTS[:2]]
    width = max(len(i) for i in ids)
    padded = np.array([i + [0] * (width - len(i)) for i in ids], dtype=np.int32)

    def request(rows: np.ndarray, lengths: list[int]) -> dict[str, np.ndarray]:
        n = len(lengths)
        return {"input_ids": rows, "input_lengths": np.array([[x] for x in lengths], dtype=np.int32),
                "request_output_len": np.full((n, 1), NEW_TOKENS, dtype=np.int32),
                "exclude_input_in_output": np.ones((n, 1), dtype=bool)}

    alone = [server.infer("llama", request(np.array([i], dtype=np.int32), [len(i)])).wait().outputs[-1]["output_ids"]
             for i in ids]
    call = server.infer("llama", request(padded, [len(i) for i in ids])).wait()
    assert not call.errors and call.finals == 1
    got = {int(o["batch_index"][0][0]): o["output_ids"] for o in call.outputs}
    assert [got[0].tolist(), got[1].tolist()] == [a.tolist() for a in alone]


@pytest.mark.parametrize("tensors, field", [
    # Triton itself refuses these before any model runs: the batch dimension is part of the shape.
    ({"text_input": np.array([b"abc"], dtype=object), "max_tokens": np.array([[4]], dtype=np.int32)}, "text_input"),
    ({"text_input": np.array([[b"a"], [b"b"]], dtype=object), "max_tokens": np.array([[4]], dtype=np.int32)},
     "max_tokens"),
])
def test_triton_checks_the_batch_dimension(server: Any, tensors: dict[str, np.ndarray], field: str) -> None:
    call = server.infer("ensemble", tensors).wait()
    assert call.errors and field in call.errors[0].message()


def test_non_decoupled_batch_is_one_stacked_response(tiny_engine: Path, tmp_path: Path) -> None:
    s = pb.StandInServer(_repo(tiny_engine, tmp_path / "unary", "--no-decoupled"))
    try:
        for model in ("ensemble", "bls"):
            one_by_one = [bytes(s.infer(model, e2e_batch([p], NEW_TOKENS)).wait().outputs[0]["text_output"][0])
                          for p in PROMPTS]
            call = s.infer(model, e2e_batch(PROMPTS, NEW_TOKENS)).wait()
            assert not call.errors, [e.message() for e in call.errors]
            # One response stacks the rows (ensemble: llama's stacked answer, postprocessed row by row).
            (out,) = call.outputs
            assert out["batch_index"].tolist() == [[0], [1], [2]]
            assert [bytes(t) for t in out["text_output"]] == one_by_one
    finally:
        s.stop()
