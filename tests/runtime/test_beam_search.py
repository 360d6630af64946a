"""Beam search in the engine core: token for token transformers' `generate(num_beams=...,
length_penalty=..., early_stopping=...)`, in the in-flight batch with other requests, with KV blocks
forked and freed as beams are pruned, restarted when preempted, and refused where it cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import hf_greedy, load_hf_oracle

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
from llamaforge.runtime.core.engine_core import EngineCore, run_to_completion
from llamaforge.runtime.core.requests import GenerationOutput, GenerationRequest, RequestError
from llamaforge.runtime.core.sampling import SamplingParams

# (beam width, returned, length_penalty, early_stopping, end id): end ids the tiny model emits
# often, so beams finish early and the finished set, the length penalty and the stopping rules all
# take part.
CASES = {
    "w4-lp1-false": (4, 4, 1.0, False, 7),
    "w3-lp0.5-true": (3, 2, 0.5, True, 259),
    "w2-lp2-never": (2, 2, 2.0, "never", 7),
    "w3-lp-1-false": (3, 1, -1.0, False, 7),
    "w4-lp1-never": (4, 3, 1.0, "never", 443),
}
NEW_TOKENS = 12


def hf_beams(hf: torch.nn.Module, prompt: list[int], width: int, n: int, lp: float, es: bool | str, eos: int) -> list[list[int]]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, num_beams=width, num_return_sequences=n, max_new_tokens=NEW_TOKENS,
                          length_penalty=lp, early_stopping=es, eos_token_id=eos, pad_token_id=eos)
    beams = []
    for row in out[:, len(prompt):].tolist():
        beams.append(row[: row.index(eos)] if eos in row else row)
    return beams


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 600, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def beam_request(rid: str, p: list[int], case: tuple, **kw: object) -> GenerationRequest:
    width, n, lp, es, eos = case
    return GenerationRequest(rid, p, NEW_TOKENS, beam_width=width, n=n, length_penalty=lp, early_stopping=es,
                             end_ids=(eos,), **kw)  # type: ignore[arg-type]


def core_for(engine: Path, budget: int = 2048, max_num_seqs: int = 8) -> EngineCore:
    return EngineCore(engine, CoreConfig(KVCacheConfig(budget_tokens=budget), SchedulerConfig(max_num_seqs, 64)))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_beams_are_transformers_beams(tiny_engine: Path, tiny_hf_checkpoint: Path, case: tuple) -> None:
    p = prompt(21, hash(case) % 1000)
    core = core_for(tiny_engine)
    try:
        outs = run_to_completion(core, [beam_request("b", p, case)])
        assert core.kv.all_free()
    finally:
        core.stop()
    want = hf_beams(load_hf_oracle(tiny_hf_checkpoint), p, *case)
    assert [o.token_ids for o in outs] == want
    assert [o.sequence_index for o in outs] == list(range(case[1]))
    for o in outs:
        assert o.finish_reason == ("length" if len(o.token_ids) == NEW_TOKENS else "stop")
        assert o.cum_log_prob < 0 and o.num_output_tokens == len(o.token_ids)


def test_beams_share_the_batch_and_fork_and_free_their_blocks(tiny_engine: Path, tiny_hf_checkpoint: Path) -> None:
    """A beam request and two greedy ones in flight together: the prompt of the beams is computed
    once, some decode calls carry beams and other rows, and every block is free at the end."""
    core = core_for(tiny_engine)
    widths: list[tuple[int, int]] = []
    prefills: list[int] = []
    run_decode, run_prefill = core.runner.run_decode, core.runner.run_prefill

    def decode_spy(seqs, static_batch):  # type: ignore[no-untyped-def]
        widths.append((sum(s.group is not None for s in seqs), sum(s.group is None for s in seqs)))
        return run_decode(seqs, static_batch)

    def prefill_spy(chunks):  # type: ignore[no-untyped-def]
        prefills.extend(c.count for c in chunks if c.seq.group is not None)
        return run_prefill(chunks)

    core.runner.run_decode, core.runner.run_prefill = decode_spy, prefill_spy  # type: ignore[method-assign]
    case = CASES["w4-lp1-false"]
    pb, pg1, pg2 = prompt(37, 1), prompt(9, 2), prompt(50, 3)
    try:
        outs = run_to_completion(core, [GenerationRequest("g1", pg1, 20, end_ids=()), beam_request("b", pb, case),
                                        GenerationRequest("g2", pg2, 16, end_ids=())])
        assert core.kv.all_free()
    finally:
        core.stop()
    hf = load_hf_oracle(tiny_hf_checkpoint)
    assert outs[0].token_ids == hf_greedy(hf, pg1, 20) and outs[-1].token_ids == hf_greedy(hf, pg2, 16)
    assert [o.token_ids for o in outs[1:-1]] == hf_beams(hf, pb, *case)
    assert prefills == [37], "the beams' prompt is computed once"
    assert any(beams == 4 and others for beams, others in widths), widths


def test_a_preempted_beam_group_restarts_and_gives_the_same_beams(tiny_engine: Path, tiny_hf_checkpoint: Path) -> None:
    """A KV budget too small for an older greedy request and the four beams together: the beams
    (the newest) are preempted as a group, start again when there is room, and end as they would."""
    core = core_for(tiny_engine, budget=160)
    restarts: list[str] = []
    restart = core._restart_group

    def spy(group, also=None):  # type: ignore[no-untyped-def]
        restarts.append(group.request.request_id)
        return restart(group, also)

    core._restart_group = spy  # type: ignore[method-assign]
    case = CASES["w4-lp1-never"]
    pb, pg = prompt(30, 4), prompt(60, 5)
    try:
        outs = run_to_completion(core, [GenerationRequest("g", pg, 40, end_ids=()), beam_request("b", pb, case)])
        assert core.kv.all_free()
    finally:
        core.stop()
    hf = load_hf_oracle(tiny_hf_checkpoint)
    assert restarts, "the budget was meant to force a preemption of the beams"
    assert outs[0].token_ids == hf_greedy(hf, pg, 40)
    assert [o.token_ids for o in outs[1:]] == hf_beams(hf, pb, *case)


def test_cancelling_a_beam_request_ends_its_n_outputs(tiny_engine: Path) -> None:
    core = core_for(tiny_engine)
    core.start()
    try:
        handle = core.submit(GenerationRequest("c", prompt(20, 6), 200, beam_width=3, n=2, end_ids=()))
        while not core.scheduler.running:
            pass
        handle.cancel()
        finals: list[GenerationOutput] = list(handle)
        assert sorted(o.sequence_index for o in finals) == [0, 1]
        assert {o.finish_reason for o in finals} == {"cancelled"}
        core.drain()
        assert core.kv.all_free()
    finally:
        core.stop()


@pytest.mark.parametrize("field,kw", [
    ("beam_width", dict(beam_width=9)),
    ("num_return_sequences", dict(beam_width=2, n=3)),
    ("early_stopping", dict(beam_width=2, early_stopping="sometimes")),
    ("stream", dict(beam_width=2, stream=True)),
    ("temperature", dict(beam_width=2, sampling=SamplingParams(temperature=0.7))),
    ("min_tokens", dict(beam_width=2, min_tokens=3)),
])
def test_what_beam_search_cannot_take_is_refused_naming_it(tiny_engine: Path, field: str, kw: dict) -> None:
    core = core_for(tiny_engine)
    try:
        with pytest.raises(RequestError, match=f"^{field}: "):
            core.submit(GenerationRequest("x", [5, 6, 7], 4, **kw))
    finally:
        core.stop()


def test_beams_through_the_token_model_as_tensorrt_llm_returns_them(tiny_engine: Path, tiny_hf_checkpoint: Path) -> None:
    """Stock tritonclient, beam_width / num_return_sequences / len_penalty / early_stopping on the
    token model: one response holding the beams, output_ids and output_log_probs [1, beam, len]
    padded, sequence_length and cum_log_probs [1, beam]; unary and on a stream the same transformers beams."""
    from server_utils import grpc_client, running_server, stream_infer, token_inputs

    case = CASES["w3-lp0.5-true"]
    width, n, lp, es, eos = case
    p = prompt(17, 5)
    want = hf_beams(load_hf_oracle(tiny_hf_checkpoint), p, *case)
    with running_server(core_for(tiny_engine)) as server:
        client = grpc_client(server)
        inputs = token_inputs(p, NEW_TOKENS, beam_width=width, num_return_sequences=n, len_penalty=lp,
                              early_stopping=es, end_id=eos, exclude_input_in_output=True, return_log_probs=True)
        unary = client.infer("tensorrt_llm", inputs)
        (streamed,) = [r for r in stream_infer(client, "tensorrt_llm", inputs).results if r.get_response().outputs]
        for r in (unary, streamed):
            ids, lengths = r.as_numpy("output_ids"), r.as_numpy("sequence_length")
            assert ids.shape == (1, n, max(len(b) for b in want)) and lengths.shape == (1, n)
            assert [ids[0, i, : lengths[0, i]].tolist() for i in range(n)] == want
            cum, per_token = r.as_numpy("cum_log_probs"), r.as_numpy("output_log_probs")
            assert cum.shape == (1, n) and (cum < 0).all() and per_token.shape == ids.shape
            for i in range(n):  # a beam's score is its tokens' log probs summed (the end id's too)
                logp = per_token[0, i, : lengths[0, i]]
                assert (logp < 0).all() and cum[0, i] <= logp.sum() + 1e-4
                if lengths[0, i] == NEW_TOKENS:  # ended by length: no end id in the score
                    assert cum[0, i] == pytest.approx(logp.sum(), rel=1e-5)
