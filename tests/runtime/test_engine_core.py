"""The engine core under in-flight batching: parity with transformers, preemption, cancellation,
seeds, stops, bounds. The gRPC layer is tested in test_server.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import hf_greedy, load_hf_oracle, make_hf_checkpoint, tiny_config

from llamaforge.build.builder import BuildOptions, build_engine
from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
from llamaforge.runtime.core.engine_core import EngineCore, padding_groups, run_to_completion
from llamaforge.runtime.core.requests import GenerationRequest, QueueFullError, RequestError
from llamaforge.runtime.core.sampling import SamplingParams, sample
from llamaforge.runtime.core.scheduler import Chunk, Sequence


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("core")
    ckpt = make_hf_checkpoint(base / "ckpt", tiny_config(max_position_embeddings=256), seed=21)
    build_engine(BuildOptions(checkpoint=ckpt, out=base / "engine"))
    return ckpt, base / "engine"


def core_config(kv_budget_tokens: int = 1024, max_num_batched_tokens: int = 64, policy: str = "inflight") -> CoreConfig:
    return CoreConfig(KVCacheConfig(budget_tokens=kv_budget_tokens), SchedulerConfig(8, max_num_batched_tokens, policy))


def make_core(engine: Path, kv_budget_tokens: int = 1024) -> EngineCore:
    core = EngineCore(engine, core_config(kv_budget_tokens))
    core.start()
    return core


def prompts(n: int, seed: int, lengths: tuple[int, ...] = (5, 70, 33, 12, 50, 9, 41, 3)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 600, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]


@pytest.mark.parametrize("budget", [1024, 160], ids=["roomy", "preempting"])
def test_greedy_matches_transformers_under_inflight_batching(built: tuple[Path, Path], budget: int) -> None:
    ckpt, engine = built
    core = make_core(engine, kv_budget_tokens=budget)
    try:
        ps = prompts(8, seed=1)
        outs = run_to_completion(core, [GenerationRequest(f"r{i}", p, 24, end_ids=()) for i, p in enumerate(ps)])
        assert core.engine.decode_in_place and core.counters.decode_steps > 0  # decodes updated the cache in place
        hf = load_hf_oracle(ckpt)
        for p, o in zip(ps, outs):
            assert o.finish_reason == "length"
            assert o.token_ids == hf_greedy(hf, p, 24)
        assert core.kv.all_free(), "every block must be free after the run"
    finally:
        core.stop()


def record_decode_widths(core: EngineCore) -> list[tuple[int, int]]:
    """(live sequences, rows computed) of each decode call the core makes from now on."""
    widths: list[tuple[int, int]] = []
    run_decode = core.runner.run_decode

    def spy(seqs: list[Sequence], static_batch: int | None) -> list[np.ndarray]:
        logits = run_decode(seqs, static_batch)
        assert core.runner.decode_batch is not None
        widths.append((len(seqs), len(core.runner.decode_batch.rows)))
        return logits

    core.runner.run_decode = spy  # type: ignore[method-assign]
    return widths


@pytest.mark.parametrize("policy,in_place", [("inflight", True), ("inflight", False), ("static", True)],
                         ids=["inflight", "inflight-copying", "static"])
def test_finished_rows_leave_the_decode_batch_only_in_flight(built: tuple[Path, Path], policy: str, in_place: bool) -> None:
    """Requests of different lengths, so rows finish while others decode. In flight, the last live
    row moves into a finished one and every decode call computes live rows only; static keeps the
    batch's shape until all of it has finished. Either way the tokens are transformers' greedy ones."""
    ckpt, engine = built
    core = EngineCore(engine, core_config(policy=policy))
    core.engine.decode_in_place = in_place
    widths = record_decode_widths(core)
    ps, lengths = prompts(6, seed=7), [3, 17, 6, 25, 9, 12]
    handles = [core.submit(GenerationRequest(f"m{i}", p, n, end_ids=())) for i, (p, n) in enumerate(zip(ps, lengths))]
    core.start()  # after submitting: static batching takes all six as one batch
    try:
        hf = load_hf_oracle(ckpt)
        for p, n, h in zip(ps, lengths, handles):
            assert [t for out in h for t in out.token_ids] == hf_greedy(hf, p, n)
        assert core.kv.all_free()
    finally:
        core.stop()
    if policy == "inflight":
        assert all(live == rows for live, rows in widths), widths
        assert widths[-1] == (1, 1)
    else:  # one batch: its rows never shrink, and the longest request finishes among dead rows
        assert [rows for _, rows in widths] == sorted(rows for _, rows in widths), widths
        assert widths[-1][0] == 1 and widths[-1][1] >= 5, widths


def test_static_batch_keeps_its_rows_when_the_cache_grows(built: tuple[Path, Path]) -> None:
    """The decode arrays are rebuilt from blocks when the longest row outgrows them (64 positions
    here); a static batch's finished rows stay in it across that rebuild."""
    ckpt, engine = built
    core = EngineCore(engine, core_config(max_num_batched_tokens=SchedulerConfig.max_num_batched_tokens, policy="static"))
    widths = record_decode_widths(core)
    ps = prompts(2, seed=8, lengths=(5, 40))
    handles = [core.submit(GenerationRequest(f"g{i}", p, n, end_ids=())) for i, (p, n) in enumerate(zip(ps, (2, 40)))]
    core.start()
    try:
        hf = load_hf_oracle(ckpt)
        for p, n, h in zip(ps, (2, 40), handles):
            assert [t for out in h for t in out.token_ids] == hf_greedy(hf, p, n)
    finally:
        core.stop()
    assert core.runner.decode_batch is not None and core.runner.decode_batch.capacity > 64  # the arrays were rebuilt
    assert widths[-1] == (1, 2), widths  # g0 finished after 2 tokens and kept its row to the end


def test_late_arrivals_join_the_running_batch(built: tuple[Path, Path]) -> None:
    _, engine = built
    core = make_core(engine)
    try:
        early = core.submit(GenerationRequest("early", prompts(1, seed=2)[0], 200, stream=True, detokenize=False, end_ids=()))
        early.get(timeout=30)  # the early request is decoding now
        late = core.submit(GenerationRequest("late", [5, 6, 7], 4, end_ids=()))
        out = list(late)
        assert out[-1].finish_reason == "length"
        assert not early.done.is_set(), "the late request must not wait for the running batch to drain"
        early.cancel()
        assert list(early)[-1].finish_reason == "cancelled"
    finally:
        core.stop()


def test_cancel_frees_kv_within_a_step(built: tuple[Path, Path]) -> None:
    _, engine = built
    core = make_core(engine)
    try:
        handles = [core.submit(GenerationRequest(f"c{i}", p, 150, stream=True, detokenize=False, end_ids=()))
                   for i, p in enumerate(prompts(4, seed=3))]
        for h in handles:
            h.get(timeout=30)  # streaming: each has produced a token
        assert core.stats()["kv_used_tokens"] > 0
        handles[0].cancel()
        handles[2].cancel()
        for h in handles:
            if h.request_id in ("c0", "c2"):
                outs = list(h)
                assert outs[-1].finish_reason == "cancelled"
        for h in handles[1::2]:
            assert list(h)[-1].finish_reason == "length"
        core.drain()
        assert core.kv.all_free()
    finally:
        core.stop()


def test_seed_gives_same_output_whatever_the_batch(built: tuple[Path, Path]) -> None:
    _, engine = built
    core = make_core(engine)
    try:
        params = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=1234)
        target = prompts(1, seed=4)[0]
        alone = run_to_completion(core, [GenerationRequest("alone", target, 20, params, end_ids=())])[0]
        crowd = [GenerationRequest(f"n{i}", p, 30, SamplingParams(temperature=0.8, seed=i), end_ids=())
                 for i, p in enumerate(prompts(5, seed=5))]
        mixed = run_to_completion(core, crowd[:2] + [GenerationRequest("crowded", target, 20, params, end_ids=())] + crowd[2:])
        assert mixed[2].token_ids == alone.token_ids
        other_seed = run_to_completion(core, [GenerationRequest("other", target, 20, SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=99), end_ids=())])[0]
        assert other_seed.token_ids != alone.token_ids
    finally:
        core.stop()


def test_stops_and_token_rules(built: tuple[Path, Path]) -> None:
    _, engine = built
    core = make_core(engine)
    try:
        p = prompts(1, seed=6)[0]
        free = run_to_completion(core, [GenerationRequest("free", p, 16, end_ids=())])[0]
        # End id: the 4th greedy token ends the request before it is emitted.
        end = run_to_completion(core, [GenerationRequest("end", p, 16, end_ids=(free.token_ids[3],))])[0]
        assert end.finish_reason == "stop" and end.token_ids == free.token_ids[:3]
        # min_tokens suppresses the end id until reached.
        first = free.token_ids[0]
        mint = run_to_completion(core, [GenerationRequest("min", p, 6, end_ids=(first,), min_tokens=2)])[0]
        assert mint.token_ids[0] != first and len(mint.token_ids) >= 2
        # Bad words are never generated.
        bad = run_to_completion(core, [GenerationRequest("bad", p, 16, end_ids=(), bad_words=((first,),))])[0]
        assert first not in bad.token_ids
        # Stop words: text stops before the word; the word never appears.
        text = free.text
        word = next(text[i:i + 2] for i in range(len(text) // 3, len(text) - 1)
                    if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
        stop = run_to_completion(core, [GenerationRequest("stopw", p, 16, end_ids=(), stop_words=(word,))])[0]
        assert stop.finish_reason == "stop" and word not in stop.text and text.startswith(stop.text)
        assert len(stop.token_ids) < len(free.token_ids)
        assert core.kv.all_free() or (core.drain() is None and core.kv.all_free())
    finally:
        core.stop()


def test_stream_pieces_concatenate_to_unary_text(built: tuple[Path, Path]) -> None:
    _, engine = built
    core = make_core(engine)
    try:
        p = prompts(1, seed=7)[0]
        unary = run_to_completion(core, [GenerationRequest("u", p, 40, end_ids=())])[0]
        pieces = list(core.submit(GenerationRequest("s", p, 40, end_ids=(), stream=True)))
        assert len(pieces) > 1 and pieces[-1].finished
        assert "".join(x.text for x in pieces).encode() == unary.text.encode()
        assert [t for x in pieces for t in x.token_ids] == unary.token_ids
    finally:
        core.stop()


def test_bounds_and_validation(built: tuple[Path, Path]) -> None:
    _, engine = built
    core = EngineCore(engine, CoreConfig(KVCacheConfig(budget_tokens=512), max_queue=2))  # not started: the queue fills
    with pytest.raises(RequestError, match="max_tokens"):
        core.submit(GenerationRequest("long", [5] * 200, 100))
    with pytest.raises(RequestError, match="max_tokens"):
        core.submit(GenerationRequest("zero", [5], 0))
    with pytest.raises(RequestError, match="text_input"):
        core.submit(GenerationRequest("empty", [], 4))
    core.submit(GenerationRequest("q1", [5], 4))
    core.submit(GenerationRequest("q2", [5], 4))
    with pytest.raises(QueueFullError):
        core.submit(GenerationRequest("q3", [5], 4))
    core.start()
    core.drain()
    core.stop()
    assert core.kv.all_free()


def test_fresh_prompts_share_a_prefill_call_only_when_padding_is_small() -> None:
    def chunk(i: int, n: int) -> Chunk:
        return Chunk(Sequence(f"s{i}", list(range(n)), n, n + 1), 0, n)

    groups = padding_groups([chunk(0, 100), chunk(1, 20), chunk(2, 103), chunk(3, 24), chunk(4, 250)], max_padding=8)
    assert [[c.count for c in g] for g in groups] == [[20, 24], [100, 103], [250]]
    # Padding adds up over the group: 3 + 6 > 8 starts a new call.
    groups = padding_groups([chunk(0, 10), chunk(1, 13), chunk(2, 16)], max_padding=8)
    assert [[c.count for c in g] for g in groups] == [[10, 13], [16]]
    assert len(padding_groups([chunk(i, 50) for i in range(4)], max_padding=0)) == 1  # equal widths: one call


def test_greedy_pick_without_log_prob_is_the_float64_pick() -> None:
    """The greedy fast path (no log prob, no penalty) argmaxes the row as it comes; the float64 path
    must pick the same token, ties (first wins) and banned tokens included, and neither may change
    the caller's row."""
    rng = np.random.default_rng(3)
    greedy = SamplingParams(temperature=0.0)
    for trial in range(200):
        logits = rng.standard_normal(500).astype(np.float32)
        top = int(np.argmax(logits))
        if trial % 3 == 0:  # a tie for the top value, before or after the first
            logits[(top + 7) % 500] = logits[top]
        banned = [top] if trial % 4 == 0 else [int(rng.integers(500))] if trial % 4 == 1 else []
        row = logits.copy()
        fast, _ = sample(logits, greedy, np.random.default_rng(0), [1, 2, 3], banned, want_log_prob=False)
        slow, _ = sample(logits, greedy, np.random.default_rng(0), [1, 2, 3], banned, want_log_prob=True)
        assert fast == slow and fast not in banned
        np.testing.assert_array_equal(logits, row)
    # With a repetition penalty the pick takes the penalised float64 path and reads `seen`.
    logits = np.array([1.0, 3.0, 2.9], np.float32)
    penalised = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert sample(logits, penalised, np.random.default_rng(0), [1], want_log_prob=False)[0] == 2


def test_greedy_log_prob_only_when_asked() -> None:
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    greedy = SamplingParams(temperature=0.0)
    token, log_prob = sample(logits, greedy, np.random.default_rng(0))
    assert token == int(np.argmax(logits))
    assert log_prob == pytest.approx(float(torch.log_softmax(torch.from_numpy(logits).double(), -1)[token]))
    assert sample(logits, greedy, np.random.default_rng(0), want_log_prob=False) == (token, 0.0)
    sampled = SamplingParams(temperature=0.7, top_k=50)
    token, log_prob = sample(logits, sampled, np.random.default_rng(5))
    assert log_prob < 0 and sample(logits, sampled, np.random.default_rng(5), want_log_prob=False) == (token, 0.0)
