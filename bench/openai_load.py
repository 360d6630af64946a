"""make bench-openai: the OpenAI-compatible HTTP route under AIPerf against the same workload over
Triton's gRPC streaming, on one server process.

One `llamaforge serve ENGINE` process serves both front ends on one engine core (gRPC: Triton's
protocol; HTTP: runtime/serving/openai_server.py). At each concurrency (default 1, 4, 8, 16) the
same closed-loop workload runs through:

  HTTP (AIPerf)  AIPerf (pinned, in its own virtualenv under --workdir/openai/; bench/openai_aiperf.py):
                 POST /v1/completions, stream=true (server-sent events), its synthetic prompts of
                 exactly --isl tokens by the checkpoint's own tokenizer, max_tokens --osl, greedy;
  gRPC           the same prompts (AIPerf's inputs.json, in the order it sent them), max_tokens and
                 temperature, streamed to the text model "ensemble" over ModelStreamInfer by the
                 stock tritonclient.grpc.aio client, one stream per concurrency slot;
  HTTP (openai)  the control (--no-control: skipped): the same requests as AIPerf's through the
                 official openai client, driven by the same in-process loop as the gRPC side
                 (bench/openai_drivers.py), so HTTP vs gRPC without AIPerf's own processes.

The server refuses OpenAI parameters it does not honour, so no side sends `ignore_eos` or
`min_tokens`: each request asks for --osl tokens with max_tokens, and the output lengths the server
reported are printed (on the default random-weight model greedy decoding does not reach EOS
within 64 tokens, so every request generates exactly --osl).

Each round runs every side once, in an order that reverses from round to round (A B C, C B A, ...:
a steady drift in the machine's speed weighs on all sides alike); medians over --rounds rounds are
reported. Per concurrency: output tok/s and requests/s, the HTTP/gRPC throughput ratio against the
0.95 target (AIPerf's; the control's is printed beside it), TTFT and ITL p50/p99 (AIPerf's
definitions; the in-process drivers compute the same ones), and the CPU the server process and
each load generator used during the run (from /proc, bench/cpu_sampler.py), and the server's CPU
per output token, which says what each front end costs it.

Cores: the server and the load generators are pinned to separate halves of the CPUs this process
may use (sched_setaffinity; the server gets `--threads` = its half for ONNX Runtime), as a load
generator on another machine would be: otherwise a heavier client (AIPerf's Python processes use
about half a core at these rates) takes its CPU from the model and measures itself, not the route.
--shared-cores lets every process use every core instead.

--profile records the server with py-spy (installed with AIPerf) through one more run of each side
at the highest concurrency and prints where its time went, by thread and by function.

Model (default): bench-serve's random-weight 125M Llama-3-shaped fp32 checkpoint and engine
(bench/serve.py's `prepare`, cached in --workdir), so each step is real model work on 2 cores.
--model tiny serves bench-serve's 2-layer model of the same vocabulary instead: its steps take
about a millisecond, so the front ends' own cost per token decides the throughput (a stress test
of the serving stack, not a serving workload). --engine DIR --tokenizer DIR serve another engine.

  python bench/openai_load.py [--concurrency 1 4 8 16] [--isl 128] [--osl 64] [--rounds 4] [--waves 2]
                              [--no-control] [--profile] [--shared-cores] [--model bench|tiny | --engine DIR --tokenizer DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
from cpu_sampler import CpuSampler, proc_cpu_seconds
from openai_aiperf import aiperf_command, ensure_venv, read_export, read_prompts, read_window
from openai_drivers import RunStats, run_grpc_load, run_openai_load
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.95  # HTTP/SSE output throughput over gRPC's at the same load
AIPERF, CONTROL, GRPC = "HTTP (AIPerf)", "HTTP (openai)", "gRPC (tritonclient)"


# -- the server ---------------------------------------------------------------------------------------

class Server:
    """`llamaforge serve ENGINE` on free ports (gRPC, HTTP; no metrics), its output in `log`."""

    def __init__(self, engine: Path, log: Path, max_num_seqs: int, cpus: set[int] | None = None) -> None:
        exe = Path(sys.executable).parent / "llamaforge"
        cmd = [str(exe), "serve", str(engine), "--port", "0", "--http-port", "0", "--metrics-port", "-1",
               "--max-num-seqs", str(max_num_seqs), *(["--threads", str(len(cpus))] if cpus else [])]
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                         preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        deadline = time.monotonic() + 300
        while True:  # the serve command prints its ports once both front ends listen
            line = next((ln for ln in log.read_text().splitlines() if "llama-forge: serving" in ln), None)
            if line is not None:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start; see {log}")
            time.sleep(0.2)
        self.grpc_url = line.split(" on grpc ")[1].split(",")[0].strip()
        self.http_url = line.split("openai ")[1].strip().removesuffix("/v1")
        with urllib.request.urlopen(f"{self.http_url}/v1/models", timeout=30) as r:
            self.model = json.load(r)["data"][0]["id"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def split_cpus() -> tuple[set[int] | None, set[int] | None]:
    """(the server's CPUs, the load generators'): the first and second half of those this process may
    use; (None, None) with a single CPU, where nothing can be split."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


def warm_up(server: Server, concurrency: int) -> None:
    """The first runs of each batch shape allocate in ONNX Runtime and both front ends import
    lazily: a short burst through each at the highest concurrency, untimed."""
    prompts = ["def main(" * 40]
    run_openai_load(server.http_url, server.model, prompts, 16, concurrency, concurrency)
    run_grpc_load(server.grpc_url, "ensemble", prompts, 16, concurrency, concurrency)


# -- the sides ----------------------------------------------------------------------------------------------

class Sides:
    """Runs one side at one concurrency and attaches the CPU it and the server used."""

    def __init__(self, exe: Path, server: Server, args: argparse.Namespace, sampler: CpuSampler) -> None:
        self.exe, self.server, self.args, self.sampler = exe, server, args, sampler

    def aiperf(self, c: int, requests: int, artifacts: Path) -> RunStats:
        a, s = self.args, self.server
        cmd = aiperf_command(self.exe, url=s.http_url, model=s.model, tokenizer=a.tokenizer, isl=a.isl, osl=a.osl,
                             concurrency=c, requests=requests, artifacts=artifacts, seed=a.seed)
        artifacts.mkdir(parents=True, exist_ok=True)
        with open(artifacts / "aiperf.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            self.sampler.watch_tree("aiperf", proc.pid)
            rc = proc.wait()
            self.sampler.unwatch("aiperf")
        if rc != 0:
            raise RuntimeError(f"aiperf exited {rc}; see {artifacts / 'aiperf.log'}\n  {' '.join(cmd)}")
        stats = read_export(artifacts)
        t0, t1 = read_window(artifacts)  # its requests' window: its start-up is not the run's
        stats.client_cpu_s = self.sampler.used("aiperf", t0, t1)
        stats.server_cpu_s = self.sampler.used("server", t0, t1)
        return stats

    def in_process(self, run: Callable[[], RunStats]) -> RunStats:
        t0 = time.time()
        stats = run()
        t1 = time.time()
        self.sampler.sample()
        stats.server_cpu_s = self.sampler.used("server", t0, t1)
        stats.client_cpu_s = self.sampler.used("self", t0, t1)  # this process, less the sampling thread
        return stats

    def grpc(self, c: int, requests: int, prompts: list[str]) -> RunStats:
        return self.in_process(lambda: run_grpc_load(self.server.grpc_url, "ensemble", prompts, self.args.osl, c,
                                                     requests))

    def control(self, c: int, requests: int, prompts: list[str]) -> RunStats:
        return self.in_process(lambda: run_openai_load(self.server.http_url, self.server.model, prompts,
                                                       self.args.osl, c, requests))


# -- profile --------------------------------------------------------------------------------------------

def summarize_profile(raw: Path, top: int = 25) -> str:
    """py-spy's raw (folded) stacks -> share of the samples by thread and by function (self, and
    with callees). py-spy counts a thread blocked in a C call (ORT's run, epoll) as active."""
    threads: dict[str, int] = {}
    leaf: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        threads[frames[0]] = threads.get(frames[0], 0) + n
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + n
        for f in set(frames[1:]):
            inclusive[f] = inclusive.get(f, 0) + n
    if not total:
        return f"{raw}: no samples"

    def block(title: str, counts: dict[str, int]) -> list[str]:
        rows = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [title] + [f"  {100 * n / total:5.1f}%  {name}" for name, n in rows]

    lines = [f"{raw.name}: {total} samples (threads not idle)"]
    lines += block(" by thread:", threads) + block(" by function, self:", leaf)
    lines += block(" by function, with callees:", inclusive)
    return "\n".join(lines)


def profile_runs(py_spy: Path, sides: Sides, c: int, requests: int, prompts: list[str], names: list[str],
                 out: Path, console: Console) -> None:
    """One more run of each side with py-spy recording the server (100 Hz, without pausing it)."""
    for side in names:
        tag = {AIPERF: "aiperf", CONTROL: "openai", GRPC: "grpc"}[side]
        raw = out / f"py-spy-{tag}-c{c}.txt"
        console.print(f"profile: c={c} {side}, py-spy -> {raw}")
        spy = subprocess.Popen([str(py_spy), "record", "--pid", str(sides.server.proc.pid), "--rate", "100",
                                "--nonblocking", "--threads", "--format", "raw", "--output", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            time.sleep(1.0)  # attached
            stats = (sides.aiperf(c, requests, out / f"profile-aiperf-c{c}") if side == AIPERF
                     else sides.grpc(c, requests, prompts) if side == GRPC else sides.control(c, requests, prompts))
        finally:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
            spy.wait(60)
        console.print(f"  {stats.tok_s:.1f} tok/s, server CPU {stats.server_ms_per_token:.2f} ms/token")
        console.print(summarize_profile(raw), markup=False, highlight=False)


# -- report ---------------------------------------------------------------------------------------------

def median(runs: list[RunStats], get: Callable[[RunStats], float]) -> float:
    values = [v for v in (get(r) for r in runs) if not math.isnan(v)]
    return float(np.median(values)) if values else math.nan


def report(console: Console, results: dict[int, dict[str, list[RunStats]]], rounds: int) -> bool:
    table = Table(title=f"OpenAI HTTP/SSE vs gRPC streaming, one server: medians of {rounds} rounds")
    for name in ("conc", "front end (client)", "out tok/s", "req/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
                 "OSL", "server CPU ms/tok", "client CPU", "vs gRPC", "target 0.95"):
        table.add_column(name, justify="left" if name.startswith("front") else "right")
    ok = True
    for c, sides in results.items():
        tok = {side: median(runs, lambda r: r.tok_s) for side, runs in sides.items()}
        passed = tok[AIPERF] / tok[GRPC] >= TARGET
        ok &= passed
        for k, (side, runs) in enumerate(sides.items()):
            osl = f"{min(r.osl[0] for r in runs)}" + (f"-{max(r.osl[1] for r in runs)}"
                                                     if any(r.osl[0] != r.osl[1] for r in runs) else "")
            ms = "{:.0f} ms".format
            table.add_row(
                str(c) if k == 0 else "", side, f"{tok[side]:.1f}", f"{median(runs, lambda r: r.req_s):.3f}",
                ms(median(runs, lambda r: r.ttft_ms["p50"])), ms(median(runs, lambda r: r.ttft_ms["p99"])),
                ms(median(runs, lambda r: r.itl_ms["p50"])), ms(median(runs, lambda r: r.itl_ms["p99"])),
                osl, f"{median(runs, lambda r: r.server_ms_per_token):.1f}",
                f"{median(runs, lambda r: 100 * r.client_cpu_s / r.duration_s):.0f}%",
                "" if side == GRPC else f"{tok[side] / tok[GRPC]:.3f}",
                ("[green]PASS" if passed else "[red]FAIL") if side == AIPERF else "",
                end_section=k == len(sides) - 1)
    console.print(table)
    console.print("client CPU: the load generator's CPU over the run's duration (AIPerf: all its processes); "
                  "server CPU: the server process's, per output token (ORT's threads included)")
    for c, sides in results.items():
        per_round = "; ".join(f"{side}: " + " ".join(f"{r.tok_s:.1f}" for r in runs) for side, runs in sides.items())
        console.print(f"  c={c} out tok/s by round: {per_round}")
    return ok


# -- main -----------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--isl", type=int, default=128, help="prompt tokens (exact)")
    ap.add_argument("--osl", type=int, default=64, help="max_tokens of every request")
    ap.add_argument("--rounds", type=int, default=4,
                    help="runs of every side per concurrency (medians; at concurrency 1 the drift from round "
                         "to round is as large as a 10%% effect)")
    ap.add_argument("--waves", type=int, default=2, help="requests per run = waves x concurrency (at least 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-control", action="store_true", help="skip the openai-client HTTP control")
    ap.add_argument("--profile", action="store_true", help="py-spy the server through one more run of each side")
    ap.add_argument("--model", choices=("bench", "tiny"), default="bench",
                    help="bench-serve's model: bench (125M, default) or tiny (2 layers, hidden 128: a step costs "
                         "about a millisecond, so the front ends' own cost dominates)")
    ap.add_argument("--engine", type=Path, help="another engine directory (with --tokenizer)")
    ap.add_argument("--tokenizer", type=Path, help="HF tokenizer directory for AIPerf (default: the checkpoint's)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / ".work")
    ap.add_argument("--shared-cores", action="store_true",
                    help="let the server and the load generators share every core (default: separate halves)")
    args = ap.parse_args()
    for name in ("isl", "osl", "rounds", "waves"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if min(args.concurrency) < 1:
        ap.error(f"--concurrency must be >= 1, got {min(args.concurrency)}")
    if (args.engine is None) != (args.tokenizer is None):
        ap.error("--engine and --tokenizer go together (AIPerf sizes its prompts with the engine's tokenizer)")
    console = Console(width=None if sys.stdout.isatty() else 180)
    work = args.workdir / "openai"
    work.mkdir(parents=True, exist_ok=True)
    exe = ensure_venv(work / "aiperf-venv")
    if args.engine is None:
        from serve import prepare  # a sibling script, as cpu_sampler above: this folder is on sys.path

        args.tokenizer, args.engine, _, _ = prepare(args.workdir, args.model, genai=False)
    out = work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir()
    names = [AIPERF, GRPC] if args.no_control else [AIPERF, CONTROL, GRPC]
    console.print(f"engine {args.engine}; ISL {args.isl}, OSL {args.osl} (max_tokens), greedy; concurrency "
                  f"{args.concurrency}; {args.rounds} rounds of {', '.join(names)}; {os.cpu_count()} CPUs, load "
                  f"average {os.getloadavg()[0]:.2f}; artifacts in {out}")
    server_cpus, client_cpus = split_cpus() if not args.shared_cores else (None, None)
    server = Server(args.engine, out / "server.log", max(args.concurrency), server_cpus)
    if client_cpus:  # this process's drivers and AIPerf (its child) on the other half
        os.sched_setaffinity(0, client_cpus)
        console.print(f"cores: server {sorted(server_cpus or ())} (--threads {len(server_cpus or ())}), "
                      f"load generators {sorted(client_cpus)}")
    sampler = CpuSampler().start()
    sampler.watch("server", lambda: proc_cpu_seconds(server.proc.pid))
    sampler.watch("self", lambda: proc_cpu_seconds(os.getpid()) - sampler.own_cpu())
    sides = Sides(exe, server, args, sampler)
    results: dict[int, dict[str, list[RunStats]]] = {}
    ok = False
    try:
        console.print(f"server: grpc {server.grpc_url}, http {server.http_url} (model {server.model}); warming up ...")
        warm_up(server, max(args.concurrency))
        columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        prompts: dict[int, list[str]] = {}
        with Progress(*columns, console=console) as progress:
            overall = progress.add_task("runs", total=len(names) * args.rounds * len(args.concurrency))
            for c in args.concurrency:
                requests = max(4, args.waves * c)
                results[c] = {side: [] for side in names}
                for r in range(args.rounds):
                    # round 1 runs AIPerf first: the other sides replay the prompts it sent
                    for side in (names if r % 2 == 0 else names[::-1]):
                        progress.update(overall, description=f"c={c} round {r + 1}/{args.rounds}: {side}, "
                                                             f"{requests} requests")
                        if side == AIPERF:
                            artifacts = out / f"aiperf-c{c}-r{r + 1}"
                            stats = sides.aiperf(c, requests, artifacts)
                            sent = read_prompts(artifacts)
                            if c in prompts and sent != prompts[c]:
                                console.print(f"[yellow]c={c}: AIPerf's prompts differ between rounds (same seed)")
                            prompts.setdefault(c, sent)
                        else:
                            run = sides.grpc if side == GRPC else sides.control
                            stats = run(c, requests, prompts[c])
                        if stats.errors:
                            raise RuntimeError(f"c={c} {side}: {stats.errors} requests failed: "
                                               f"{stats.extra.get('first_error', '')}")
                        results[c][side].append(stats)
                        progress.console.print(
                            f"  c={c:<2} r{r + 1} {side:<19} {stats.tok_s:6.1f} tok/s  TTFT p50 "
                            f"{stats.ttft_ms['p50']:5.0f} ms  ITL p50 {stats.itl_ms['p50']:5.1f} ms  server CPU "
                            f"{stats.server_ms_per_token:5.1f} ms/tok  client CPU {stats.client_cpu_s:5.1f} s in "
                            f"{stats.duration_s:5.1f} s  OSL {stats.osl[0]}-{stats.osl[1]}", highlight=False)
                        progress.advance(overall)
        ok = report(console, results, args.rounds)
        if args.profile:
            c = max(args.concurrency)
            profile_runs(exe.parent / "py-spy", sides, c, max(4, args.waves * c), prompts[c], names, out, console)
    finally:
        sampler.stop()
        server.stop()
        (out / "results.json").write_text(json.dumps(
            {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
             "results": {c: {side: [asdict(r) | {"tok_s": r.tok_s, "req_s": r.req_s} for r in runs]
                             for side, runs in s.items()} for c, s in results.items()}}, indent=1))
    console.print(f"target: HTTP/SSE (AIPerf) output throughput >= {TARGET}x gRPC at every concurrency -> "
                  f"{'PASS' if ok else 'FAIL'}; load average at the end {os.getloadavg()[0]:.2f}; "
                  f"{out / 'results.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
