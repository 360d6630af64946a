"""The pure parts of `make bench-openai` (bench/openai_load.py and its helpers): AIPerf's command line
and exports as the bench reads them, the statistics both sides are reported in, the CPU sampler's
window arithmetic and the profile summary. No server, network or install here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from cpu_sampler import CpuSampler, proc_cpu_seconds, tree_pids
from openai_aiperf import aiperf_command, read_export, read_prompts, read_window
from openai_drivers import Trace, stats_from_traces
from openai_load import summarize_profile


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_aiperf_command_asks_for_the_workload(tmp_path: Path) -> None:
    cmd = aiperf_command(Path("/venv/bin/aiperf"), url="http://127.0.0.1:1234", model="m", tokenizer=tmp_path / "ckpt",
                         isl=128, osl=64, concurrency=8, requests=24, artifacts=tmp_path / "out", seed=3)
    assert cmd[:2] == ["/venv/bin/aiperf", "profile"]
    expected = {"--url": "http://127.0.0.1:1234", "--model": "m", "--endpoint-type": "completions",
                "--tokenizer": str(tmp_path / "ckpt"), "--isl": "128", "--isl-stddev": "0", "--osl": "64",
                "--osl-stddev": "0", "--concurrency": "8", "--request-count": "24", "--random-seed": "3",
                "--artifact-dir": str(tmp_path / "out"), "--extra-inputs": "temperature:0.0"}
    for flag, value in expected.items():
        assert _flag(cmd, flag) == value, flag
    for flag in ("--streaming", "--use-server-token-count", "--use-legacy-max-tokens", "--no-server-metrics"):
        assert flag in cmd
    # The route refuses parameters it does not honour: none may ride along in the payload.
    assert not any("ignore_eos" in a or "min_tokens" in a for a in cmd)


def _summary(**over: object) -> dict[str, object]:
    summary: dict[str, object] = {
        "request_count": {"avg": 24.0}, "benchmark_duration": {"avg": 12.5},
        "total_output_tokens": {"avg": 1536.0}, "output_token_throughput": {"avg": 122.9},
        "request_throughput": {"avg": 1.92},
        "time_to_first_token": {"p50": 210.0, "p99": 480.0}, "inter_token_latency": {"p50": 31.0, "p99": 44.0},
        "output_sequence_length": {"min": 64.0, "max": 64.0}, "usage_prompt_tokens": {"min": 128.0, "max": 128.0},
        "error_summary": [], "was_cancelled": False,
    }
    summary.update(over)
    return summary


def test_read_export_takes_aiperfs_numbers(tmp_path: Path) -> None:
    (tmp_path / "profile_export_aiperf.json").write_text(json.dumps(_summary()))
    stats = read_export(tmp_path)
    assert (stats.requests, stats.output_tokens, stats.duration_s) == (24, 1536, 12.5)
    assert stats.tok_s == pytest.approx(1536 / 12.5) and stats.req_s == pytest.approx(24 / 12.5)
    assert stats.ttft_ms == {"p50": 210.0, "p99": 480.0} and stats.itl_ms == {"p50": 31.0, "p99": 44.0}
    assert stats.osl == (64, 64) and stats.isl == (128, 128) and stats.errors == 0
    assert stats.extra["aiperf_tok_s"] == 122.9


def test_read_export_counts_errors_and_names_a_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "profile_export_aiperf.json"
    path.write_text(json.dumps(_summary(error_summary=[{"error_details": {"code": 400}, "count": 3}])))
    assert read_export(tmp_path).errors == 3
    broken = _summary()
    del broken["inter_token_latency"]
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="inter_token_latency.p50"):
        read_export(tmp_path)
    with pytest.raises(FileNotFoundError, match="no export"):
        read_export(tmp_path / "missing")


def test_read_prompts_keeps_the_order_sent(tmp_path: Path) -> None:
    data = {"data": [{"session_id": f"s{i}", "payloads": [{"prompt": f"p{i}", "max_tokens": 64}]} for i in range(3)]}
    (tmp_path / "inputs.json").write_text(json.dumps(data))
    assert read_prompts(tmp_path) == ["p0", "p1", "p2"]
    data["data"][1]["payloads"][0]["prompt"] = ["not", "text"]
    (tmp_path / "inputs.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"data\[1\]\.payloads\[0\]\.prompt"):
        read_prompts(tmp_path)


def test_read_window_spans_the_requests(tmp_path: Path) -> None:
    records = [{"metadata": {"request_start_ns": s, "request_end_ns": e}, "metrics": {}}
               for s, e in ((5_000_000_000, 9_000_000_000), (4_000_000_000, 7_000_000_000))]
    (tmp_path / "profile_export.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert read_window(tmp_path) == (4.0, 9.0)


def test_stats_from_traces_uses_aiperfs_definitions() -> None:
    rng = np.random.default_rng(0)
    traces, ttft, itl = [], [], []
    for i in range(9):
        sent = float(i)
        first = sent + rng.uniform(0.1, 0.5)
        n = int(rng.integers(2, 70))
        last = first + rng.uniform(0.5, 3.0)
        traces.append(Trace(sent=sent, first=first, last=last, output_tokens=n, input_tokens=128))
        ttft.append((first - sent) * 1e3)
        itl.append((last - first) * 1e3 / (n - 1))
    traces.append(Trace(sent=-1.0))  # sent, never answered: counts for the start, not as a request
    stats = stats_from_traces(traces)
    assert stats.requests == 9 and stats.output_tokens == sum(t.output_tokens for t in traces)
    assert stats.duration_s == pytest.approx(max(t.last for t in traces if t.last) + 1.0)
    assert stats.ttft_ms["p50"] == pytest.approx(np.percentile(ttft, 50))
    assert stats.ttft_ms["p99"] == pytest.approx(np.percentile(ttft, 99))
    assert stats.itl_ms["p50"] == pytest.approx(np.percentile(itl, 50))
    assert stats.itl_ms["p99"] == pytest.approx(np.percentile(itl, 99))
    assert stats.isl == (128, 128)
    with pytest.raises(RuntimeError, match="no request"):
        stats_from_traces([Trace(sent=0.0)])


def test_cpu_sampler_interpolates_to_the_window() -> None:
    sampler = CpuSampler()
    sampler.samples["x"] = [(10.0, 1.0), (11.0, 3.0), (12.0, 2.5), (13.0, 4.0)]  # 2.5: a child that exited
    assert sampler.used("x", 10.5, 11.5) == pytest.approx(1.0)  # 2.0 at 10.5 to 3.0 (held) at 11.5
    assert sampler.used("x", 10.0, 13.0) == pytest.approx(3.0)
    assert math.isnan(sampler.used("x", 9.0, 11.0))  # before the first sample
    assert math.isnan(sampler.used("y", 10.0, 11.0))


def test_proc_cpu_counts_this_process() -> None:
    import os

    pid = os.getpid()
    before = proc_cpu_seconds(pid)
    sum(i * i for i in range(2_000_000))
    assert proc_cpu_seconds(pid) > before
    assert pid in tree_pids(pid)
    assert proc_cpu_seconds(2**22 + 7) == 0.0  # no such process


def test_summarize_profile_shares(tmp_path: Path) -> None:
    raw = tmp_path / "spy.txt"
    raw.write_text("thread (1): engine-core;run (a.py:1);ort (b.py:2) 30\n"
                   "thread (1): engine-core;run (a.py:1);sink (c.py:3) 10\n"
                   "thread (2): http-server;loop (d.py:4);sink (c.py:3) 60\n")
    text = summarize_profile(raw)
    assert "100 samples" in text
    assert "  60.0%  thread (2): http-server" in text and "  40.0%  thread (1): engine-core" in text
    assert "  70.0%  sink (c.py:3)" in text  # self: 10 + 60
    assert "  40.0%  run (a.py:1)" in text  # with callees
