"""The real server, the real engine core and the real `tritonclient.grpc` client together:
greedy parity with transformers, and many concurrent streams with cancellations."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from server_utils import (
    grpc_client,
    inflight_batcher_client_inputs,
    is_final,
    running_server,
    stream_infer,
    text_inputs,
    token_inputs,
    wait_until,
)
from tiny_models import load_hf_oracle
from tritonclient.utils import InferenceServerException

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
from llamaforge.runtime.core.engine_core import EngineCore

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def built(tiny_hf_checkpoint: Path, tiny_engine: Path) -> tuple[Path, Path]:
    """The session's tiny checkpoint and its fp32 engine (tests/conftest.py); read only."""
    return tiny_hf_checkpoint, tiny_engine


def hf_greedy(hf: torch.nn.Module, ids: list[int], eos: int) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    tokens = out[0, len(ids):].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_greedy_through_server_equals_transformers(built: tuple[Path, Path]) -> None:
    ckpt, engine = built
    hf = load_hf_oracle(ckpt)
    core = EngineCore(engine, CoreConfig(KVCacheConfig(budget_tokens=2048), SchedulerConfig(max_num_seqs=4), max_queue=16))
    eos = core.eos_ids[0]
    with running_server(core) as server:
        client = grpc_client(server)
        g = torch.Generator().manual_seed(0)
        for n in (4, 19, 45):  # token model: the client tokenizes
            ids = torch.randint(3, 600, (n,), generator=g).tolist()
            r = client.infer("tensorrt_llm", token_inputs(ids, NEW_TOKENS, exclude_input_in_output=True))
            assert r.as_numpy("output_ids").reshape(-1).tolist() == hf_greedy(hf, ids, eos)
        for prompt in ("def main(args):\n", "import os\nimport sys\n\nclass Config:"):  # text model
            ids = core.tokenizer.encode(prompt, add_bos=True, allow_special=True)
            r = client.infer("ensemble", text_inputs(prompt, NEW_TOKENS, exclude_input_in_output=True))
            want = core.tokenizer.decode(hf_greedy(hf, ids, eos)).encode()
            assert r.as_numpy("text_output")[0] == want
    assert core.kv.all_free()


def test_32_concurrent_streams_with_cancellations(built: tuple[Path, Path]) -> None:
    _, engine = built
    core = EngineCore(engine, CoreConfig(KVCacheConfig(budget_tokens=1024), SchedulerConfig(8, 128), max_queue=48))
    prompts = [f"def function_{i}(x, y):\n    return x" + " + y" * (i % 5) for i in range(32)]
    with running_server(core) as server:
        expected = {}
        client = grpc_client(server)
        for p in set(prompts):
            r = client.infer("ensemble", text_inputs(p, NEW_TOKENS, exclude_input_in_output=True, min_tokens=NEW_TOKENS))
            expected[p] = r.as_numpy("text_output")[0]
        results: dict[int, dict[str, Any]] = {}
        errors: list[BaseException] = []

        def client_thread(i: int) -> None:
            try:
                c = grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}")
                pieces: list[bytes] = []
                done = threading.Event()
                final = {"seen": False}
                cancel = i % 4 == 3

                def on_result(result: Any, error: Any) -> None:
                    if error is not None:
                        if not final.get("cancel_sent"):  # after our cancel, tritonclient reports it locally
                            final["error"] = error
                        done.set()
                        return
                    text = result.as_numpy("text_output")
                    if text is not None:
                        pieces.append(bytes(text[0]))
                    if is_final(result):
                        final["seen"] = True
                        done.set()
                    elif cancel and len(pieces) >= 3:
                        done.set()

                c.start_stream(callback=on_result)
                c.async_stream_infer("ensemble", text_inputs(prompts[i], NEW_TOKENS, stream=True, min_tokens=NEW_TOKENS),
                                     request_id=f"client-{i}")
                assert done.wait(120), f"client {i} got nothing"
                final["cancel_sent"] = cancel
                c.stop_stream(cancel_requests=cancel)
                results[i] = {"text": b"".join(pieces), "final": final["seen"], "cancel": cancel, "error": final.get("error")}
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors
        assert len(results) == 32
        for i, r in results.items():
            assert r["error"] is None, (i, r["error"])
            want = expected[prompts[i]]
            if r["cancel"] and not r["final"]:
                assert want.startswith(r["text"]) and r["text"], f"client {i}: cancelled stream is not a prefix"
            else:
                assert r["final"] and r["text"] == want, f"client {i}: stream differs from unary output"
        assert sum(r["cancel"] and not r["final"] for r in results.values()) >= 4, "cancellations must have happened mid-stream"
        wait_until(lambda: core.stats()["running"] == 0 and core.stats()["waiting"] == 0, timeout=60)
        assert core.kv.all_free(), "the KV manager must end fully free"
        assert np.isclose(core.stats()["kv_free_fraction"], 1.0)


def test_non_decoupled_serving_and_statistics_with_the_real_core(built: tuple[Path, Path]) -> None:
    """`make serve DECOUPLED=false` with the real engine core: unary ModelInfer answers every model
    with what the decoupled deployment streams, a streaming request is refused, and ModelStatistics
    counts every phase of every request, the queue time being what the scheduler made them wait
    (max_num_seqs 1: three requests wait while a long one runs)."""
    _, engine = built
    prompt, n = "def main(args):\n", 12
    core = EngineCore(engine, CoreConfig(KVCacheConfig(budget_tokens=1024), SchedulerConfig(max_num_seqs=1), max_queue=8))
    with running_server(core) as server:  # decoupled: what the stream says
        pieces = stream_infer(grpc_client(server), "ensemble", text_inputs(prompt, n, stream=True, min_tokens=n))
        streamed = pieces.text()
    assert len(pieces.results) > 1 and streamed

    core = EngineCore(engine, CoreConfig(KVCacheConfig(budget_tokens=1024), SchedulerConfig(max_num_seqs=1), max_queue=8))
    with running_server(core, decoupled=False) as server:
        client = grpc_client(server)
        assert not client.get_model_config("ensemble").config.model_transaction_policy.decoupled
        texts: dict[int, bytes] = {}

        # One connected client per request, made before the long request starts, so that the three
        # short ones queue at once and the long one still holds the slot for most of its run.
        clients = [grpcclient.InferenceServerClient(f"127.0.0.1:{server.port}") for _ in range(4)]
        for c in clients:
            assert c.is_server_ready()

        def one(i: int, tokens: int) -> None:
            r = clients[i].infer("ensemble", text_inputs(prompt, tokens, exclude_input_in_output=True, min_tokens=tokens))
            texts[i] = r.as_numpy("text_output")[0]

        # A long request (most of the 512-token context) holds the one slot; three more wait in the
        # queue until it ends.
        threads = [threading.Thread(target=one, args=(0, 480))]
        threads[0].start()
        wait_until(lambda: core.stats()["running"] == 1, timeout=60)
        threads += [threading.Thread(target=one, args=(i, n)) for i in (1, 2, 3)]
        for t in threads[1:]:
            t.start()
        wait_until(lambda: core.stats()["waiting"] == 3, timeout=60, interval=0.002)
        all_queued = time.monotonic()
        wait_until(lambda: core.stats()["waiting"] < 3, timeout=60, interval=0.002)
        first_admitted = time.monotonic()
        for t in threads:
            t.join(120)
        assert texts[1] == texts[2] == texts[3] == streamed and texts[0].startswith(streamed)
        ids = core.tokenizer.encode(prompt, add_bos=True, allow_special=True)
        r = client.infer("tensorrt_llm", token_inputs(ids, n, exclude_input_in_output=True, min_tokens=n))
        assert core.tokenizer.decode(r.as_numpy("output_ids").reshape(-1).tolist()).encode() == streamed
        with pytest.raises(InferenceServerException, match="non-decoupled"):
            client.infer("ensemble", text_inputs(prompt, n, stream=True))

        ms = client.get_inference_statistics("ensemble").model_stats[0]
        st = ms.inference_stats
        assert (ms.version, st.success.count, st.fail.count, ms.execution_count) == ("1", 4, 1, 4)
        for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
            assert getattr(st, phase).count == 4 and getattr(st, phase).ns > 0, phase
        # Each of the three was queued before `all_queued` and admitted after `first_admitted`
        # (less one poll of wait_until). The long request's 480 tokens take a tenth of a second or
        # so on the tiny engine, and the three queue within its first few dozen milliseconds.
        waited = first_admitted - all_queued - 0.004
        assert waited > 0.01, "the long request must hold the slot for a while"
        assert st.queue.ns >= 3 * waited * 1e9
        assert st.success.ns >= st.queue.ns + st.compute_input.ns + st.compute_infer.ns
        assert client.get_inference_statistics("tensorrt_llm").model_stats[0].inference_stats.queue.count == 1


def test_a_repeated_prompt_reuses_its_blocks_and_the_perf_metrics_say_so(built: tuple[Path, Path]) -> None:
    """Prefix caching through the stock client: TensorRT-LLM's kv_cache_* perf metrics count the
    blocks found cached, and the tokens stay transformers' greedy ones."""
    ckpt, engine = built
    core = EngineCore(engine, CoreConfig(KVCacheConfig(budget_tokens=2048, block_size=16), SchedulerConfig(max_num_seqs=4)))
    eos = core.eos_ids[0]
    ids = torch.randint(3, 600, (70,), generator=torch.Generator().manual_seed(8)).tolist()  # 4 full blocks + 6
    want = hf_greedy(load_hf_oracle(ckpt), ids, eos)
    with running_server(core) as server:
        client = grpc_client(server)
        metrics = []
        for _ in range(2):
            r = client.infer("tensorrt_llm", inflight_batcher_client_inputs(
                ids, NEW_TOKENS, streaming=False, end_id=eos, pad_id=eos, return_perf_metrics=True))
            assert r.as_numpy("output_ids").reshape(-1).tolist()[len(ids):] == want
            metrics.append({k: int(r.as_numpy(k).reshape(-1)[0]) for k in
                            ("kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks")})
    total = -(-(len(ids) + len(want)) // 16)
    assert metrics[0] == {"kv_cache_alloc_new_blocks": total, "kv_cache_reused_blocks": 0, "kv_cache_alloc_total_blocks": total}
    assert metrics[1] == {"kv_cache_alloc_new_blocks": total - 4, "kv_cache_reused_blocks": 4, "kv_cache_alloc_total_blocks": total}
    assert core.kv.all_free() and core.stats()["prefix_cache_hit_tokens"] == 64
