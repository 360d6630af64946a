"""make bench-triton-tools: NVIDIA's perf_analyzer and genai-perf, run with their stock command
lines (no `-x`, no wrapper around the protocol), against `llamaforge serve`.

Tools (pinned, in their own virtualenv under --workdir, bench/triton_tools_setup.py): perf_analyzer
2.60.0 (pip package perf-analyzer; run through Debian 13's glibc, as its wheel needs glibc 2.38)
and genai-perf 0.0.16 (the last release; it drives perf_analyzer as a subprocess).

Server: `llamaforge serve ENGINE --port 0 --http-port -1 --metrics-port 0` in a subprocess (the ports
it binds are read from its start line), decoupled (the default: streaming) for the streaming runs,
then restarted with `--no-decoupled` (one response per request, unary ModelInfer) for
perf_analyzer's non-streaming runs: a decoupled model needs --streaming in perf_analyzer.

Runs, in the command shapes TensorRT-LLM's Triton backend documents:
  perf_analyzer -m MODEL -i grpc -u HOST:PORT --input-data FILE [--streaming] [-b N]
                --concurrency-range 1:8 --measurement-interval MS --stability-percentage 999
                -f CSV --profile-export-file JSON
    on "ensemble" (text in: text_input, max_tokens, min_tokens [, stream]) and "tensorrt_llm"
    (token ids in: input_ids, input_lengths, request_output_len, min_tokens [, streaming]), streaming
    and not; plus "ensemble" non-streaming with -b 4 (four rows a request) at concurrency 1:2.
    The input data is --prompts windows of --isl tokens of this Python's stdlib sources (the text;
    for tensorrt_llm its token ids by the engine's tokenizer), max_tokens = min_tokens = --osl, so
    every request generates exactly --osl tokens. Stability 999% (genai-perf's own setting): on a
    shared 2-core VM the default 10% is rarely met within 10 windows, and perf_analyzer then
    reports nothing; with 999 it reports the last 3 windows. Each server is warmed up first by a
    perf_analyzer run of 4 requests (--request-count 4 --concurrency-range 1), not reported.
  genai-perf profile -m MODEL --backend tensorrtllm --endpoint-type kserve --streaming -u HOST:PORT
                --tokenizer ENGINE_DIR --num-prompts 100 --random-seed 123
                --synthetic-input-tokens-mean ISL --synthetic-input-tokens-stddev 0
                --output-tokens-mean OSL --output-tokens-stddev 0 --output-tokens-mean-deterministic
                --concurrency N
                --measurement-interval MS --artifact-dir DIR --profile-export-file profile_export.json
    on "ensemble" and "tensorrt_llm_bls" at each --gp-concurrency. --output-tokens-mean-deterministic
    makes genai-perf 0.0.16 send `min_length` = OSL, TensorRT-LLM's older name of `min_tokens`, which
    our models declare as an optional input beside `min_tokens` (as tensorrtllm_backend's do), so
    every request generates OSL tokens (the output sequence length genai-perf measured is printed).

Printed: perf_analyzer's throughput (inferences/s: rows/s) and latency percentiles (its CSV; with
--streaming its latency is that of the whole request, to the last response), with the first
response's p50 latency (TTFT) and output tokens/s from its profile export; genai-perf's request
and output-token throughput, TTFT, inter-token latency and request latency (its
profile_export_genai_perf.json). Everything (commands, numbers, machine) goes to
--workdir/results.json; each tool's output to --workdir/logs/.

  python bench/triton_tools.py [--engine DIR] [--isl 128] [--osl 64] [--pa-interval-ms 3000]
                               [--gp-concurrency 1 8] [--gp-interval-ms 6000] [--workdir DIR] [--only pa|gp]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "checkpoints" / "stdlib-5m"
STABILITY = "999"  # see the docstring: report the last 3 windows whatever their spread
TOOL_TIMEOUT_S = 900


@dataclass(frozen=True)
class PARun:
    """One perf_analyzer invocation."""
    model: str  # "ensemble" (text) or "tensorrt_llm" (token ids)
    streaming: bool
    batch: int = 1
    concurrency: str = "1:8"

    @property
    def name(self) -> str:
        return f"pa-{self.model}-{'stream' if self.streaming else 'unary'}-b{self.batch}"


@dataclass(frozen=True)
class GPRun:
    """One genai-perf invocation (streaming)."""
    model: str  # "ensemble" or "tensorrt_llm_bls"
    concurrency: int

    @property
    def name(self) -> str:
        return f"gp-{self.model}-c{self.concurrency}"


@dataclass
class Outcome:
    name: str
    command: list[str]
    seconds: float = 0.0
    rows: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None


# -- command lines -------------------------------------------------------------------------------

def perf_analyzer_command(exe: str, run: PARun, url: str, input_data: Path, interval_ms: int, csv_out: Path,
                          export: Path) -> list[str]:
    cmd = [exe, "-m", run.model, "-i", "grpc", "-u", url, "--input-data", str(input_data)]
    if run.streaming:
        cmd.append("--streaming")
    if run.batch != 1:
        cmd += ["-b", str(run.batch)]
    return cmd + ["--concurrency-range", run.concurrency, "--measurement-interval", str(interval_ms),
                  "--stability-percentage", STABILITY, "-f", str(csv_out), "--profile-export-file", str(export)]


def warmup_command(exe: str, url: str, input_data: Path, streaming: bool) -> list[str]:
    """A few requests before the measured runs (ONNX Runtime's first runs allocate): perf_analyzer
    2.60 refuses --warmup-request-count with a concurrency range, so it is a run of its own."""
    return [exe, "-m", "ensemble", "-i", "grpc", "-u", url, "--input-data", str(input_data),
            *(["--streaming"] if streaming else []), "--concurrency-range", "1", "--request-count", "4"]


def genai_perf_command(exe: str, run: GPRun, url: str, tokenizer: Path, isl: int, osl: int, interval_ms: int,
                       artifacts: Path) -> list[str]:
    return [exe, "profile", "-m", run.model, "--backend", "tensorrtllm", "--endpoint-type", "kserve", "--streaming",
            "-u", url, "--tokenizer", str(tokenizer), "--num-prompts", "100", "--random-seed", "123",
            "--synthetic-input-tokens-mean", str(isl), "--synthetic-input-tokens-stddev", "0",
            "--output-tokens-mean", str(osl), "--output-tokens-stddev", "0",
            "--output-tokens-mean-deterministic", "--concurrency", str(run.concurrency),
            "--measurement-interval", str(interval_ms), "--artifact-dir", str(artifacts),
            "--profile-export-file", "profile_export.json"]


# -- perf_analyzer's input data ------------------------------------------------------------------

def stdlib_text(limit: int = 40) -> str:
    """Python source to cut prompts from: this interpreter's first `limit` stdlib modules."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:limit]
    return "".join(p.read_text(errors="replace") for p in files)


def text_input_data(prompts: Sequence[str], osl: int, streaming: bool) -> dict[str, Any]:
    """perf_analyzer --input-data for the text model (TensorRT-LLM ensemble names). min_tokens =
    max_tokens: every request generates exactly `osl` tokens, EOS or not."""
    data = []
    for text in prompts:
        entry: dict[str, Any] = {"text_input": [text], "max_tokens": [osl], "min_tokens": [osl]}
        if streaming:
            entry["stream"] = [True]
        data.append(entry)
    return {"data": data}


def token_input_data(prompts: Sequence[Sequence[int]], osl: int, streaming: bool) -> dict[str, Any]:
    """perf_analyzer --input-data for the token model (TensorRT-LLM's tensorrt_llm names);
    input_ids has a variable length, so each entry gives its shape."""
    data = []
    for ids in prompts:
        entry: dict[str, Any] = {"input_ids": {"content": list(ids), "shape": [len(ids)]},
                                 "input_lengths": [len(ids)], "request_output_len": [osl], "min_tokens": [osl]}
        if streaming:
            entry["streaming"] = [True]
        data.append(entry)
    return {"data": data}


def make_prompts(engine: Path, n: int, isl: int, seed: int = 0) -> tuple[list[str], list[list[int]]]:
    """`n` windows of `isl` tokens (BOS included) of stdlib source: their text, and their ids as
    the engine's tokenizer encodes that text (what the ensemble sends its token model)."""
    from llamaforge.runtime.core.engine import read_manifest
    from llamaforge.runtime.core.tokenizer import load_tokenizer

    info = read_manifest(engine).tokenizer
    if info is None:
        raise SystemExit(f"{engine}: the engine has no tokenizer; the ensemble and genai-perf need one")
    tok = load_tokenizer(engine, info.to_json())
    corpus = tok.encode(stdlib_text(), add_bos=False)
    rng = np.random.default_rng(seed)
    texts, ids = [], []
    for start in rng.integers(0, len(corpus) - isl, n):
        text = tok.decode(corpus[int(start):int(start) + isl - 1])
        texts.append(text)
        ids.append(tok.encode(text, add_bos=True))
    return texts, ids


# -- parsing the tools' outputs ------------------------------------------------------------------

def read_perf_analyzer_csv(path: Path) -> list[dict[str, float]]:
    """perf_analyzer's -f CSV: one row per concurrency (it sorts them by throughput; returned by
    concurrency); latencies are in microseconds."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row = {"concurrency": float(r["Concurrency"]), "infer_s": float(r["Inferences/Second"])}
            if r.get("Response Throughput"):
                row["responses_s"] = float(r["Response Throughput"])
            for q in (50, 90, 95, 99):
                row[f"p{q}_ms"] = float(r[f"p{q} latency"]) / 1e3
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return sorted(rows, key=lambda r: r["concurrency"])


def _flat(value: Any) -> list[float]:
    if isinstance(value, list):
        return [x for v in value for x in _flat(v)]
    return [] if value == "" else [float(value)]  # "": an output the response did not carry


def request_tokens(request: dict[str, Any]) -> tuple[float, int]:
    """Generated tokens of one request of perf_analyzer's profile export, and its rows: each
    response's num_output_tokens is its row's count so far (batch_index says which row)."""
    last: dict[int, float] = {}
    for out in request.get("response_outputs", []):
        counts = _flat(out.get("num_output_tokens", ""))
        if not counts:
            continue  # a stream's closing response carries no outputs (exported as "")
        rows = [int(r) for r in _flat(out.get("batch_index", ""))] or list(range(len(counts)))
        for row, n in zip(rows, counts):
            last[row] = max(last.get(row, 0.0), n)
    return sum(last.values()), len(last)


def read_perf_analyzer_export(path: Path) -> dict[int, dict[str, float]]:
    """Per concurrency, from perf_analyzer's --profile-export-file: the first response's latency
    p50 (ms; the time to first token when streaming) and the mean generated tokens per row, over
    every request of that level."""
    # perf_analyzer writes a BYTES output of several rows (-b N) as its raw serialization, length
    # prefixes and all: not UTF-8. Only the numbers are read here.
    doc = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
    out = {}
    for exp in doc["experiments"]:
        if exp["experiment"]["mode"] != "concurrency":
            continue
        reqs = [r for r in exp["requests"] if r.get("response_timestamps")]
        if not reqs:
            continue
        first = [(r["response_timestamps"][0] - r["timestamp"]) / 1e6 for r in reqs]
        tokens = [request_tokens(r) for r in reqs]
        rows = sum(n for _, n in tokens)
        out[int(exp["experiment"]["value"])] = {
            "first_response_p50_ms": float(np.percentile(first, 50)),
            "tokens_per_row": sum(t for t, _ in tokens) / rows if rows else float("nan")}
    return out


GP_METRICS = {  # genai-perf's profile_export_genai_perf.json: our column -> (metric, statistic)
    "request_s": ("request_throughput", "avg"), "tok_s": ("output_token_throughput", "avg"),
    "ttft_p50_ms": ("time_to_first_token", "p50"), "ttft_p99_ms": ("time_to_first_token", "p99"),
    "itl_p50_ms": ("inter_token_latency", "p50"), "itl_p99_ms": ("inter_token_latency", "p99"),
    "latency_p50_ms": ("request_latency", "p50"), "latency_p99_ms": ("request_latency", "p99"),
    "osl_avg": ("output_sequence_length", "avg"), "isl_avg": ("input_sequence_length", "avg"),
    "requests": ("request_count", "avg"),
}


def read_genai_perf(path: Path) -> dict[str, float]:
    doc = json.loads(path.read_text())
    missing = [m for m, _ in GP_METRICS.values() if m not in doc]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)}")
    return {col: float(doc[m][stat]) for col, (m, stat) in GP_METRICS.items()}


SERVING_LINE = re.compile(r"llama-forge: serving .* on grpc (\S+):(\d+)")


def served_address(line: str) -> str | None:
    """HOST:PORT from `llamaforge serve`'s start line (it names the port it bound, also for --port 0)."""
    m = SERVING_LINE.search(line)
    return f"{m.group(1)}:{m.group(2)}" if m else None


# -- the server and the tools as subprocesses ----------------------------------------------------

@contextmanager
def served(engine: Path, decoupled: bool, log: Path) -> Iterator[str]:
    """`llamaforge serve` on free ports; yields its gRPC HOST:PORT; stopped (SIGINT: its drain)
    and waited for on exit, so the next server starts on a machine this one has left."""
    exe = Path(sys.executable).with_name("llamaforge")
    cmd = [str(exe), "serve", str(engine), "--host", "127.0.0.1", "--port", "0", "--http-port", "-1",
           "--metrics-port", "0", "--decoupled" if decoupled else "--no-decoupled"]
    with open(log, "w") as logf:
        logf.write(f"$ {shlex.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline, url = time.monotonic() + 300, None
        while url is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llamaforge serve did not start (exit {proc.returncode}); its log {log}:\n"
                                   + log.read_text()[-2000:])
            time.sleep(0.25)
            url = next((a for a in map(served_address, log.read_text().splitlines()) if a), None)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_tool(cmd: list[str], env: dict[str, str], log: Path, on_line: Callable[[str], None]) -> int:
    """Runs `cmd`, its output to `log` (with the command first), each line also to `on_line`
    (progress); killed after TOOL_TIMEOUT_S. Returns its exit status."""
    with open(log, "w") as logf:
        logf.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=log.parent)
        timer = threading.Timer(TOOL_TIMEOUT_S, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                on_line(line)
            return proc.wait()
        finally:
            timer.cancel()


def failure(status: int, log: Path) -> str:
    """The tool's own error lines (or its last lines) for the report."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"error|failed|exception", ln, re.I)]
    return f"exit {status}: " + " | ".join((errors or lines)[-4:])[-800:] + f" (log: {log})"


# -- the benchmark -------------------------------------------------------------------------------

def prepare_engine(work: Path) -> Path:
    """The default model (checkpoints/stdlib-5m) built as `make engine` builds it (fp32, ORT),
    cached under the work folder."""
    engine = work / "engine-stdlib-5m"
    from engine_cache import ensure_engine

    from llamaforge.build.builder import BuildOptions, build_engine

    def build() -> None:
        print(f"building {engine} from {CHECKPOINT} ...", flush=True)
        build_engine(BuildOptions(checkpoint=CHECKPOINT, out=engine, precision="fp32", backend="ort"))

    ensure_engine(engine, f"{CHECKPOINT.resolve()}|fp32", build)
    return engine


def pa_runs() -> list[PARun]:
    return [PARun("ensemble", True), PARun("tensorrt_llm", True), PARun("ensemble", False),
            PARun("tensorrt_llm", False), PARun("ensemble", False, batch=4, concurrency="1:2")]


def run_perf_analyzer(run: PARun, exe: str, url: str, data: Path, args: argparse.Namespace, env: dict[str, str],
                      work: Path, step: Callable[[str], None]) -> Outcome:
    csv_out, export, log = (work / "out" / f"{run.name}.csv", work / "out" / f"{run.name}.json",
                            work / "logs" / f"{run.name}.log")
    for stale in (csv_out, export):
        stale.unlink(missing_ok=True)
    cmd = perf_analyzer_command(exe, run, url, data, args.pa_interval_ms, csv_out, export)
    out, t0 = Outcome(run.name, cmd), time.monotonic()
    top = run.concurrency.split(":")[1]

    def on_line(line: str) -> None:
        m = re.match(r"\s*Request concurrency: (\d+)", line)
        if m:
            step(f"perf_analyzer {run.name[3:]}: concurrency {m.group(1)}/{top}")

    status = run_tool(cmd, env, log, on_line)
    out.seconds = time.monotonic() - t0
    if status or not csv_out.exists():
        out.error = failure(status, log)
        return out
    out.rows = read_perf_analyzer_csv(csv_out)
    extra = read_perf_analyzer_export(export) if export.exists() else {}
    for row in out.rows:
        more = extra.get(int(row["concurrency"]), {})
        row.update(more)
        if "tokens_per_row" in more:
            row["tok_s"] = row["infer_s"] * more["tokens_per_row"]
    return out


def run_genai_perf(run: GPRun, exe: str, url: str, args: argparse.Namespace, env: dict[str, str], work: Path,
                   step: Callable[[str], None]) -> Outcome:
    import shutil

    artifacts, log = work / "out" / run.name, work / "logs" / f"{run.name}.log"
    shutil.rmtree(artifacts, ignore_errors=True)
    cmd = genai_perf_command(exe, run, url, args.tokenizer, args.isl, args.osl, args.gp_interval_ms, artifacts)
    out, t0 = Outcome(run.name, cmd), time.monotonic()
    step(f"genai-perf {run.model}: concurrency {run.concurrency}")
    status = run_tool(cmd, env, log, lambda line: None)
    out.seconds = time.monotonic() - t0
    found = sorted(artifacts.glob("**/profile_export_genai_perf.json"))
    if status or not found:
        out.error = failure(status, log)
        return out
    out.rows = [{"concurrency": float(run.concurrency), **read_genai_perf(found[0])}]
    return out


def print_results(outcomes: list[Outcome]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)  # a log keeps every column
    pa = Table(title="perf_analyzer 2.60.0 (latency: whole request; TTFT and tok/s from its profile export)")
    for col in ("model", "mode", "b", "conc.", "infer/s", "tok/s", "p50 ms", "p90 ms", "p99 ms", "TTFT p50 ms",
                "tok/row"):
        pa.add_column(col, justify="left" if col in ("model", "mode") else "right")
    gp = Table(title="genai-perf 0.0.16 (streaming)")
    for col in ("model", "conc.", "req/s", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "latency p50",
                "latency p99", "OSL avg", "ISL avg", "requests"):
        gp.add_column(col, justify="left" if col == "model" else "right")
    for o in outcomes:
        kind, _, rest = o.name.partition("-")
        if kind == "pa":
            model, mode, b = rest.rsplit("-", 2)
            for r in o.rows:
                pa.add_row(model, mode, b[1:], f"{r['concurrency']:.0f}", f"{r['infer_s']:.2f}",
                           f"{r.get('tok_s', float('nan')):.1f}", f"{r['p50_ms']:.0f}", f"{r['p90_ms']:.0f}",
                           f"{r['p99_ms']:.0f}", f"{r['first_response_p50_ms']:.0f}" if mode == "stream" else "",
                           f"{r.get('tokens_per_row', float('nan')):.1f}")
        else:
            for r in o.rows:
                gp.add_row(rest.rsplit("-c", 1)[0], f"{r['concurrency']:.0f}", f"{r['request_s']:.2f}",
                           f"{r['tok_s']:.1f}", *(f"{r[k]:.0f}" for k in ("ttft_p50_ms", "ttft_p99_ms")),
                           *(f"{r[k]:.1f}" for k in ("itl_p50_ms", "itl_p99_ms")),
                           *(f"{r[k]:.0f}" for k in ("latency_p50_ms", "latency_p99_ms")),
                           f"{r['osl_avg']:.1f}", f"{r['isl_avg']:.1f}", f"{r['requests']:.0f}")
    console.print(pa)
    console.print(gp)
    for o in outcomes:
        if o.error:
            console.print(f"[red]FAILED[/red] {o.name}: {o.error}\n  command: {shlex.join(o.command)}", soft_wrap=True)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / ".work" / "triton-tools")
    ap.add_argument("--engine", type=Path, help="an engine to serve (default: checkpoints/stdlib-5m, built here)")
    ap.add_argument("--tokenizer", type=Path, help="genai-perf's --tokenizer directory (default: the engine)")
    ap.add_argument("--isl", type=int, default=128, help="prompt tokens")
    ap.add_argument("--osl", type=int, default=64, help="new tokens a request")
    ap.add_argument("--prompts", type=int, default=16, help="perf_analyzer's input data entries")
    ap.add_argument("--pa-interval-ms", type=int, default=3000, help="perf_analyzer --measurement-interval")
    ap.add_argument("--gp-interval-ms", type=int, default=6000, help="genai-perf --measurement-interval")
    ap.add_argument("--gp-concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--only", choices=("pa", "gp"), help="run one tool only")
    ap.add_argument("--debian-mirror", default=None, help="the Debian mirror for the glibc packages")
    return ap


def main(argv: list[str] | None = None) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from triton_tools_setup import DEBIAN_MIRROR, ensure_tools

    args = parser().parse_args(argv)
    for name in ("isl", "osl", "prompts", "pa_interval_ms", "gp_interval_ms"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be > 0 (got {getattr(args, name)})")
    work: Path = args.workdir.resolve()
    for d in ("out", "logs", "data"):
        (work / d).mkdir(parents=True, exist_ok=True)
    tools = ensure_tools(work, args.debian_mirror or DEBIAN_MIRROR)
    env = tools.env()
    engine = args.engine.resolve() if args.engine else prepare_engine(work)
    args.tokenizer = (args.tokenizer or engine).resolve()
    if not (args.tokenizer / "tokenizer.json").exists() and not (args.tokenizer / "tokenizer.model").exists():
        raise SystemExit(f"--tokenizer {args.tokenizer}: no tokenizer.json or tokenizer.model for genai-perf")
    texts, ids = make_prompts(engine, args.prompts, args.isl)
    data = {}
    for model, streaming in ((m, s) for m in ("ensemble", "tensorrt_llm") for s in (True, False)):
        doc = (text_input_data(texts, args.osl, streaming) if model == "ensemble"
               else token_input_data(ids, args.osl, streaming))
        data[model, streaming] = path = work / "data" / f"{model}-{'stream' if streaming else 'unary'}.json"
        path.write_text(json.dumps(doc, indent=1))
    pas = pa_runs() if args.only != "gp" else []
    gps = [GPRun(m, c) for m in ("ensemble", "tensorrt_llm_bls") for c in args.gp_concurrency] if args.only != "pa" else []
    print(f"engine {engine}; prompts {args.isl} tokens, {args.osl} new tokens; {len(pas)} perf_analyzer and "
          f"{len(gps)} genai-perf runs; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    outcomes: list[Outcome] = []
    started = time.time()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("starting", total=len(pas) + len(gps))

        def step(text: str) -> None:
            progress.update(task, description=text)

        # Decoupled first: the streaming runs of both tools; then --no-decoupled for the unary ones.
        for decoupled in (True, False):
            mine = [r for r in pas if r.streaming == decoupled]
            theirs = gps if decoupled else []
            if not mine and not theirs:
                continue
            step(f"starting llamaforge serve ({'decoupled' if decoupled else '--no-decoupled'})")
            with served(engine, decoupled, work / "logs" / f"server-{'decoupled' if decoupled else 'unary'}.log") as url:
                step("warm-up (perf_analyzer, 4 requests)")
                warm = warmup_command(str(tools.perf_analyzer), url, data["ensemble", decoupled], decoupled)
                log = work / "logs" / f"warmup-{'decoupled' if decoupled else 'unary'}.log"
                if status := run_tool(warm, env, log, lambda line: None):
                    raise SystemExit(f"the warm-up run failed: {failure(status, log)}")
                for run in mine:
                    outcomes.append(run_perf_analyzer(run, str(tools.perf_analyzer), url, data[run.model, run.streaming],
                                                      args, env, work, step))
                    progress.advance(task)
                for gp_run in theirs:
                    outcomes.append(run_genai_perf(gp_run, str(tools.genai_perf), url, args, env, work, step))
                    progress.advance(task)
        step("done")
    print_results(outcomes)
    failed = [o.name for o in outcomes if o.error]
    record = {"date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)), "seconds": time.time() - started,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                          "load_average_end": os.getloadavg()[0]},
              "engine": str(engine), "args": {k: str(v) for k, v in vars(args).items()},
              "outcomes": [asdict(o) for o in outcomes]}
    (work / "results.json").write_text(json.dumps(record, indent=1))
    print(f"{len(outcomes) - len(failed)}/{len(outcomes)} runs succeeded in {time.time() - started:.0f} s; "
          f"results {work / 'results.json'}, logs {work / 'logs'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
