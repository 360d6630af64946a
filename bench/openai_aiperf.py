"""The HTTP side of `make bench-openai`: AIPerf (NVIDIA's LLM load generator, the successor of
genai-perf) against the OpenAI-compatible route, pinned and installed in its own virtualenv.

AIPerf runs offline here: prompts are its synthetic ones, sized with the engine checkpoint's own
tokenizer (`--tokenizer DIR`, a local path: nothing is fetched from a hub), and every run exports
`inputs.json` (the payloads it sent, in order) and `profile_export_aiperf.json` (the summary).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from openai_drivers import RunStats

__all__ = ["AIPERF_VERSION", "PY_SPY_VERSION", "ensure_venv", "aiperf_command", "read_prompts", "read_export",
           "read_window"]

# Pinned: the flags and the export's field names below are this release's. AIPerf does not depend on
# torch (checked after the install), so nothing can bring a CUDA torch into its virtualenv.
AIPERF_VERSION = "0.13.0"
PY_SPY_VERSION = "0.4.3"  # the sampling profiler behind --profile


def ensure_venv(venv: Path) -> Path:
    """The `aiperf` executable of `venv`, creating it (and installing the pinned AIPerf and py-spy)
    once; a marker names the versions, so a pin change reinstalls."""
    marker = venv / f".installed-aiperf-{AIPERF_VERSION}-py-spy-{PY_SPY_VERSION}"
    exe = venv / "bin" / "aiperf"
    if marker.exists() and exe.exists():
        return exe
    print(f"installing aiperf=={AIPERF_VERSION} and py-spy=={PY_SPY_VERSION} into {venv} (once; ~2 min) ...",
          flush=True)
    if not (venv / "bin" / "pip").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, f"aiperf=={AIPERF_VERSION}", f"py-spy=={PY_SPY_VERSION}"], check=True)
    torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; "
                            "print(u.find_spec('torch') is not None)"], capture_output=True, text=True, check=True)
    if torch.stdout.strip() != "False":
        raise SystemExit(f"{venv}: installing AIPerf brought in torch; remove the venv and pin its dependency")
    marker.touch()
    return exe


def aiperf_command(exe: Path, *, url: str, model: str, tokenizer: Path, isl: int, osl: int, concurrency: int,
                   requests: int, artifacts: Path, seed: int = 0, temperature: float = 0.0) -> list[str]:
    """`aiperf profile` for one closed-loop streaming run against /v1/completions.

    Every request asks for exactly `osl` tokens with `max_tokens` (the server refuses parameters it
    does not honour, so no `ignore_eos` / `min_tokens`; the output lengths are checked instead),
    greedy, and counts tokens as the server reports them (`usage`, which the route sends with
    `stream_options.include_usage`): re-tokenizing streamed text need not give the ids back."""
    return [str(exe), "profile", "--model", model, "--url", url, "--endpoint-type", "completions", "--streaming",
            "--tokenizer", str(tokenizer), "--isl", str(isl), "--isl-stddev", "0", "--osl", str(osl),
            "--osl-stddev", "0", "--use-legacy-max-tokens", "--use-server-token-count",
            "--extra-inputs", f"temperature:{temperature}", "--concurrency", str(concurrency),
            "--request-count", str(requests), "--random-seed", str(seed), "--artifact-dir", str(artifacts),
            # one worker and one record processor: enough at these rates, and the fewest processes
            # competing with the server for the cores
            "--workers-max", "1", "--record-processors", "1",
            "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry"]


def read_prompts(artifacts: Path) -> list[str]:
    """The prompts of a run, in the order AIPerf sent them (its synthetic dataset is sampled
    sequentially): `inputs.json` -> data[i].payloads[0].prompt."""
    path = artifacts / "inputs.json"
    data = json.loads(path.read_text())
    prompts = []
    for i, session in enumerate(data.get("data", [])):
        prompt = session["payloads"][0].get("prompt")
        if not isinstance(prompt, str):
            raise ValueError(f"{path}: data[{i}].payloads[0].prompt: expected a string, got {type(prompt).__name__}")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def _metric(summary: dict[str, Any], name: str, stat: str, path: Path) -> float:
    try:
        return float(summary[name][stat])
    except (KeyError, TypeError):
        raise ValueError(f"{path}: {name}.{stat} missing (not an aiperf=={AIPERF_VERSION} export?)") from None


def read_export(artifacts: Path) -> RunStats:
    """AIPerf's own numbers for a run (`profile_export_aiperf.json`): output tok/s and requests/s
    over its benchmark duration, TTFT and ITL (per request: (latency - TTFT) / (output tokens - 1))
    percentiles, and the output / input lengths the server reported."""
    path = artifacts / "profile_export_aiperf.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no export (see {artifacts / 'aiperf.log'})")
    summary = json.loads(path.read_text())
    errors = summary.get("error_summary") or []
    count = int(_metric(summary, "request_count", "avg", path))
    duration = _metric(summary, "benchmark_duration", "avg", path)
    stats = RunStats(
        requests=count, output_tokens=int(_metric(summary, "total_output_tokens", "avg", path)), duration_s=duration,
        ttft_ms={q: _metric(summary, "time_to_first_token", q, path) for q in ("p50", "p99")},
        itl_ms={q: _metric(summary, "inter_token_latency", q, path) for q in ("p50", "p99")},
        osl=(int(_metric(summary, "output_sequence_length", "min", path)),
             int(_metric(summary, "output_sequence_length", "max", path))),
        isl=(int(_metric(summary, "usage_prompt_tokens", "min", path)),
             int(_metric(summary, "usage_prompt_tokens", "max", path))),
        errors=sum(int(e.get("count", 1)) for e in errors) if isinstance(errors, list) else 0)
    # AIPerf's own throughputs, which RunStats recomputes from the same tokens, requests and duration
    stats.extra["aiperf_tok_s"] = _metric(summary, "output_token_throughput", "avg", path)
    stats.extra["aiperf_req_s"] = _metric(summary, "request_throughput", "avg", path)
    if summary.get("was_cancelled"):
        stats.extra["first_error"] = "the run was cancelled"
    return stats


def read_window(artifacts: Path) -> tuple[float, float]:
    """The run's wall-clock window (time.time() seconds): the first request's start to the last
    request's end, from the per-request records (`profile_export.jsonl`)."""
    path = artifacts / "profile_export.jsonl"
    starts, ends = [], []
    for line in path.read_text().splitlines():
        meta = json.loads(line).get("metadata", {}) if line.strip() else {}
        if "request_start_ns" in meta and "request_end_ns" in meta:
            starts.append(int(meta["request_start_ns"]))
            ends.append(int(meta["request_end_ns"]))
    if not starts:
        return math.nan, math.nan
    return min(starts) / 1e9, max(ends) / 1e9
