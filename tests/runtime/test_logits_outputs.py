"""Returned logits in the engine core (TensorRT-LLM's return_context_logits /
return_generation_logits): the prompt's logits and each returned token's sampling logits equal
transformers' logits of the same tokens (the oracle, computed here), through chunked prefill, a
batch of requests, preemption, streams and a repetition penalty (the rows are raw); only requests
that ask pay for them; a request whose logits would pass the limit is refused naming the flag.
The gRPC and Triton front ends are tested in tests/serving/test_logits_e2e.py and
tests/triton_repo/test_logits_repo.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import load_hf_oracle

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
from llamaforge.runtime.core.engine_core import EngineCore, run_to_completion
from llamaforge.runtime.core.requests import GenerationOutput, GenerationRequest, RequestError
from llamaforge.runtime.core.sampling import SamplingParams, apply_repetition_penalty

ATOL = 1e-4  # fp32 parity tolerance of tests/runtime/test_parity.py
CHUNK = 16  # max_num_batched_tokens: prompts longer than this are prefilled over several steps


@pytest.fixture(scope="module")
def hf(tiny_hf_checkpoint: Path) -> torch.nn.Module:
    return load_hf_oracle(tiny_hf_checkpoint)


def make_core(engine: Path, kv_budget_tokens: int = 1024, start: bool = True, **config: int) -> EngineCore:
    core = EngineCore(engine, CoreConfig(KVCacheConfig(budget_tokens=kv_budget_tokens),
                                         SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=CHUNK), **config))
    if start:
        core.start()
    return core


def prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 600, (n,), generator=g).tolist() for n in lengths]


def hf_logits(hf: torch.nn.Module, ids: list[int]) -> np.ndarray:
    """transformers' logits at every position of `ids` [len(ids), vocab]."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def check_against_hf(hf: torch.nn.Module, prompt: list[int], out: GenerationOutput) -> None:
    """context_logits are the prompt's logits; generation row i is the logits at the position
    before returned token i (what it was sampled from), one row per returned token."""
    want = hf_logits(hf, prompt + out.token_ids)
    assert out.context_logits is not None and out.generation_logits is not None
    assert out.context_logits.dtype == np.float32 and out.context_logits.shape == (len(prompt), want.shape[1])
    diff = np.abs(out.context_logits - want[: len(prompt)]).max()
    assert diff <= ATOL, f"context logits (prompt {len(prompt)}): max |diff| {diff:.2e}"
    n = len(out.token_ids)
    assert out.generation_logits.dtype == np.float32 and out.generation_logits.shape == (n, want.shape[1])
    diff = np.abs(out.generation_logits - want[len(prompt) - 1 : len(prompt) - 1 + n]).max()
    assert diff <= ATOL, f"generation logits (prompt {len(prompt)}): max |diff| {diff:.2e}"


@pytest.mark.parametrize("budget", [1024, 96], ids=["roomy", "preempting"])
def test_logits_equal_transformers_chunked_batched_and_preempted(tiny_engine: Path, hf: torch.nn.Module,
                                                                   budget: int) -> None:
    """Prompts of 5 to 45 tokens (up to 3 chunks of 16) run together with a request that asks for
    nothing; with a 96-token KV budget the newest sequences are preempted and recomputed."""
    # not started: run_to_completion starts it with all four queued, so the schedule (and with a
    # 96-token budget, the preemption) does not depend on how fast the step thread picks them up
    core = make_core(tiny_engine, kv_budget_tokens=budget, start=False)
    preempted: list[str] = []
    preempt = core.scheduler._preempt_last

    def spy(out: object, protect: str | None = None) -> object:
        victim = preempt(out, protect)  # type: ignore[arg-type]
        preempted.append(victim.seq_id)
        return victim

    core.scheduler._preempt_last = spy  # type: ignore[method-assign]
    try:
        ps = prompts((45, 5, 33, 20), seed=3)
        requests = [GenerationRequest(f"r{i}", p, 12, end_ids=(), return_context_logits=True,
                                      return_generation_logits=True) for i, p in enumerate(ps[:3])]
        requests.append(GenerationRequest("plain", ps[3], 12, end_ids=()))
        outs = run_to_completion(core, requests)
        for p, out in zip(ps[:3], outs[:3]):
            assert out.finish_reason == "length" and len(out.token_ids) == 12
            check_against_hf(hf, p, out)
            assert out.generation_logits is not None
            assert np.argmax(out.generation_logits, axis=1).tolist() == out.token_ids  # greedy picks from them
        assert outs[3].context_logits is None and outs[3].generation_logits is None  # not asked, not kept
        assert (budget < 1024) == bool(preempted), preempted
        assert not core.runner.context_logits and core.kv.all_free()
    finally:
        core.stop()


def test_generation_logits_are_raw_under_a_repetition_penalty(tiny_engine: Path, hf: torch.nn.Module) -> None:
    """The rows are the model's logits, not the penalised ones the token was picked from."""
    core = make_core(tiny_engine)
    try:
        prompt = prompts((24,), seed=5)[0]
        out, = run_to_completion(core, [GenerationRequest("p", prompt, 16, end_ids=(), return_generation_logits=True,
                                                          sampling=SamplingParams(repetition_penalty=1.5))])
        assert out.generation_logits is not None and out.context_logits is None
        want = hf_logits(hf, prompt + out.token_ids)[len(prompt) - 1 : -1]
        assert np.abs(out.generation_logits - want).max() <= ATOL
        seen = list(prompt)
        for row, token in zip(out.generation_logits, out.token_ids):
            penalised = apply_repetition_penalty(row.astype(np.float64), np.array(seen), 1.5)
            assert int(np.argmax(penalised)) == token
            seen.append(token)
        # The penalty changed the rows' values: raw rows differ from the penalised ones.
        assert not np.allclose(apply_repetition_penalty(out.generation_logits[0], np.array(prompt), 1.5),
                               out.generation_logits[0])
    finally:
        core.stop()


def test_a_stream_carries_each_pieces_rows_and_the_context_in_every_output(tiny_engine: Path,
                                                                           hf: torch.nn.Module) -> None:
    core = make_core(tiny_engine)
    try:
        prompt = prompts((40,), seed=7)[0]
        stream = list(core.submit(GenerationRequest("s", prompt, 10, end_ids=(), stream=True, detokenize=False,
                                                    return_context_logits=True, return_generation_logits=True)))
        unary, = run_to_completion(core, [GenerationRequest("u", prompt, 10, end_ids=(), return_context_logits=True,
                                                            return_generation_logits=True)])
        assert len(stream) == 10  # a piece per token (the last one is the final output)
        for piece in stream:
            assert piece.generation_logits is not None and len(piece.generation_logits) == len(piece.token_ids) == 1
            assert piece.context_logits is not None
            np.testing.assert_array_equal(piece.context_logits, unary.context_logits)
        assert [t for p in stream for t in p.token_ids] == unary.token_ids
        np.testing.assert_array_equal(np.concatenate([p.generation_logits for p in stream if p.generation_logits is
                                                      not None]), unary.generation_logits)
        check_against_hf(hf, prompt, unary)
    finally:
        core.stop()


def test_an_end_id_ends_the_rows_with_the_returned_tokens(tiny_engine: Path, hf: torch.nn.Module) -> None:
    """The token sampled as an end id is not returned, and neither is the row it came from."""
    core = make_core(tiny_engine)
    try:
        prompt = prompts((12,), seed=9)[0]
        free, = run_to_completion(core, [GenerationRequest("free", prompt, 8, end_ids=())])
        end = free.token_ids[3]  # greedy: the 4th token, made an end id, ends the request there
        out, = run_to_completion(core, [GenerationRequest("e", prompt, 8, end_ids=(end,),
                                                          return_generation_logits=True)])
        assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:3]
        assert out.generation_logits is not None and out.generation_logits.shape[0] == 3
        want = hf_logits(hf, prompt + out.token_ids)[len(prompt) - 1 : -1]
        assert np.abs(out.generation_logits - want).max() <= ATOL
    finally:
        core.stop()


def test_only_requests_that_ask_compute_more_than_one_position(tiny_engine: Path) -> None:
    """Prefill calls ask the engine for each row's last position; a chunk keeping context logits
    asks for all of its own, in a call of its own."""
    core = make_core(tiny_engine)
    calls: list[tuple[list[int], int]] = []  # (first token of each row, positions asked per row) of prefills
    step = core.engine.step

    def spy(input_ids: np.ndarray, past_lengths: np.ndarray, past: list[np.ndarray],
            logits_index: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        if input_ids.shape[1] > 1:
            assert logits_index is not None
            calls.append((input_ids[:, 0].tolist(), logits_index.shape[1]))
        return step(input_ids, past_lengths, past, logits_index)

    core.engine.step = spy  # type: ignore[method-assign]
    try:
        asks, plain = prompts((10, 9), seed=11)
        run_to_completion(core, [GenerationRequest("asks", asks, 2, return_context_logits=True),
                                 GenerationRequest("plain", plain, 2, return_generation_logits=True)])
        assert ([asks[0]], 10) in calls and ([plain[0]], 1) in calls, calls
        assert all(width == 1 for rows, width in calls if asks[0] not in rows), calls
    finally:
        core.stop()


def test_logits_past_the_limit_are_refused_naming_the_flag(tiny_engine: Path) -> None:
    vocab = 640
    core = EngineCore(tiny_engine, CoreConfig(max_logits_bytes=20 * vocab * 4))  # 20 rows
    prompt = list(range(3, 15))  # 12 tokens
    core.submit(GenerationRequest("ok", prompt, 8, return_context_logits=True, return_generation_logits=True))
    with pytest.raises(RequestError) as info:
        core.submit(GenerationRequest("c", list(range(3, 25)), 4, return_context_logits=True))
    assert info.value.field == "return_context_logits" and "22 tokens" in str(info.value)
    with pytest.raises(RequestError) as info:
        core.submit(GenerationRequest("g", prompt, 9, return_context_logits=True, return_generation_logits=True))
    assert info.value.field == "return_generation_logits" and "max_tokens (9)" in str(info.value)
    core.submit(GenerationRequest("g-alone", prompt, 20, return_generation_logits=True))
    core.submit(GenerationRequest("plain", prompt, 400))  # no logits asked: no limit
