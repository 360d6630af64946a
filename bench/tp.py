"""make bench-tp: what tensor parallelism costs on this CPU, TP=2 (1 thread per rank) vs TP=1 (2 threads).

Model: the 125M random-weight checkpoint of `make bench-serve` (hidden 768, 12 layers, GQA 12/4, vocab
32000, fp32), its TP=1 engine and a TP=2 engine (`llamaforge build --tp 2`), built once under
--workdir (bench/.work/). Each configuration runs in its own processes: TP=1 as one process with 2
ONNX Runtime threads, TP=2 as `mpiexec -n 2` ranks of 1 thread each (MPICH's shared-memory path
between the two local ranks), the engine core on rank 0 as `llamaforge serve` runs it.

Workload: greedy decode of --new-tokens tokens after a 64-token prompt, 1 row and --rows rows
(min_tokens = max_tokens), timed from each row's first to its last token; the two configurations
take turns for --rounds rounds and the medians are reported. On TP=2's rank 0 the all-reduce kernel
(runtime/parallel/collective.py) counts its calls, bytes and the time spent inside it (waiting for
the other rank included), read over the decode steps only: the collective's share of a decode step,
and the bytes all-reduced per token against the analytic 2 x layers x hidden x 4 bytes (fp32).

On GPUs over NCCL is where TP pays: each rank reads 1/N of the weights at HBM bandwidth and the
all-reduce runs over NVLink. Here both ranks share 2 CPU cores and one memory bus, so the bench
measures TP's overhead (the collectives, the step broadcast, the logits gather), not a speed-up.

  python bench/tp.py [--rounds 3] [--new-tokens 64] [--rows 8] [--workdir bench/.work] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from serve import ROOT, prepare  # bench/ is on sys.path as the script's folder (`python bench/tp.py`)

PROMPT_TOKENS = 64


def rank_run(engine: Path, threads: int, rows_list: list[int], new_tokens: int, out: Path) -> None:
    """One configuration's process (every rank of TP=2 runs this; ranks >= 1 serve rank 0's steps)."""
    from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
    from llamaforge.runtime.core.engine_core import EngineCore
    from llamaforge.runtime.core.requests import GenerationRequest
    from llamaforge.runtime.parallel.launch import start_rank, watch_ranks

    if start_rank(engine, threads):
        return
    most = max(rows_list)
    core = EngineCore(engine, CoreConfig(KVCacheConfig(budget_tokens=most * 256),
                                         SchedulerConfig(max_num_seqs=most, max_num_batched_tokens=most * PROMPT_TOKENS),
                                         threads=threads))
    stop_ranks = watch_ranks(core, lambda reason: None)
    world = getattr(core.runner, "world", None)
    core.start()
    results: dict[str, Any] = {}
    try:
        for rows in [1, *rows_list]:  # the first: warm-up
            handles = []
            for r in range(rows):
                prompt = [0] + [int(t) for t in np.random.default_rng(r).integers(2, 32000, PROMPT_TOKENS - 1)]
                handles.append(core.submit(GenerationRequest(f"r{rows}-{r}", prompt, new_tokens, min_tokens=new_tokens,
                                                             detokenize=False)))
            firsts, lasts = [], []
            for h in handles:
                outs = list(h)
                assert outs[-1].num_output_tokens == new_tokens, outs[-1].finish_reason
                firsts.append(outs[-1].first_token_ns)
                lasts.append(outs[-1].last_token_ns)
            step_s = float(np.median([(b - a) / (new_tokens - 1) / 1e9 for a, b in zip(firsts, lasts)]))
            results[str(rows)] = {"step_ms": step_s * 1e3, "tok_s": rows / step_s}
        if world is not None:  # the decode-only collective figures: one more run, counters read at its edges
            rows = rows_list[-1]
            handles = [core.submit(GenerationRequest(f"c-{r}", [0] + list(range(2 + r, 2 + r + PROMPT_TOKENS - 1)),
                                                     new_tokens, min_tokens=new_tokens, detokenize=False,
                                                     stream=True)) for r in range(rows)]
            iters = [iter(h) for h in handles]
            for it in iters:
                next(it)  # every row's first token: the prompts are done
            s0 = (world.stats.all_reduce_s, world.stats.all_reduce_calls, world.stats.all_reduce_bytes)
            t0 = time.perf_counter()
            steps0 = core.counters.decode_steps
            for it in iters:
                for _ in it:
                    pass
            t1 = time.perf_counter()
            s1 = (world.stats.all_reduce_s, world.stats.all_reduce_calls, world.stats.all_reduce_bytes)
            steps = core.counters.decode_steps - steps0
            tokens = rows * (new_tokens - 1)
            results["collective"] = {"rows": rows, "decode_steps": steps, "wall_s": t1 - t0,
                                     "all_reduce_s": s1[0] - s0[0], "all_reduce_calls": s1[1] - s0[1],
                                     "all_reduce_bytes": s1[2] - s0[2], "tokens": tokens}
    finally:
        core.stop()
        stop_ranks()
    out.write_text(json.dumps(results))


def run_config(engine: Path, tp: int, threads: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--rank-run", str(engine), "--threads", str(threads), "--out", str(out),
           "--rows", str(args.rows), "--new-tokens", str(args.new_tokens)]
    if tp > 1:
        cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(tp), *cmd]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / ".work")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--shape", default="bench", choices=["bench", "tiny"], help="tiny: for developing this script")
    ap.add_argument("--rank-run", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_run is not None:
        rank_run(args.rank_run, args.threads, [args.rows], args.new_tokens, args.out)
        return 0

    ckpt, tp1, _, _ = prepare(args.workdir, args.shape, genai=False)
    tp2 = args.workdir / f"engine-{args.shape}-tp2"
    from engine_cache import ensure_engine

    from llamaforge.build.builder import BuildOptions, build_engine

    ensure_engine(tp2, f"{ckpt.resolve()}|fp32|tp2",
                  lambda: build_engine(BuildOptions(checkpoint=ckpt, out=tp2, precision="fp32", backend="ort", tp=2)))
    manifest = json.loads((tp2 / "manifest.json").read_text())
    layers, hidden = manifest["config"]["num_layers"], manifest["config"]["hidden_size"]
    load = " ".join(open("/proc/loadavg").read().split()[:3])
    runs: dict[str, list[dict[str, Any]]] = {"tp1": [], "tp2": []}
    for rnd in range(args.rounds):  # taking turns, so the shared VM's drift hits both alike
        order = [("tp1", tp1, 1, 2), ("tp2", tp2, 2, 1)]
        for name, engine, tp, threads in order if rnd % 2 == 0 else order[::-1]:
            runs[name].append(run_config(engine, tp, threads, args, args.workdir / f"tp-bench-{name}.json"))
            print(f"round {rnd + 1}/{args.rounds} {name}: "
                  + ", ".join(f"{rows} rows {runs[name][-1][str(rows)]['tok_s']:.1f} tok/s" for rows in (1, args.rows)),
                  flush=True)
    load_after = " ".join(open("/proc/loadavg").read().split()[:3])
    report: dict[str, Any] = {"model": args.shape, "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
                              f"{os.cpu_count()} cores", "load_before": load, "load_after": load_after,
                              "command": "make bench-tp", "rounds": args.rounds, "new_tokens": args.new_tokens}
    model = "125M bench model" if args.shape == "bench" else f"{args.shape} model (not the bench's numbers)"
    print(f"\n{model} (fp32), decode after a {PROMPT_TOKENS}-token prompt, {args.new_tokens} new tokens, "
          f"median of {args.rounds} rounds; load average {load} before, {load_after} after")
    print(f"{'rows':>5} {'TP=1 2 threads tok/s':>21} {'TP=2 1 thread/rank tok/s':>25} {'TP=2 / TP=1':>12}")
    for rows in (1, args.rows):
        a = statistics.median(r[str(rows)]["tok_s"] for r in runs["tp1"])
        b = statistics.median(r[str(rows)]["tok_s"] for r in runs["tp2"])
        report[f"{rows}_rows"] = {"tp1_tok_s": a, "tp2_tok_s": b, "ratio": b / a}
        print(f"{rows:>5} {a:>21.1f} {b:>25.1f} {b / a:>11.2f}x")
    coll = [r["collective"] for r in runs["tp2"]]
    share = statistics.median(c["all_reduce_s"] / c["wall_s"] for c in coll)
    calls_per_step = statistics.median(c["all_reduce_calls"] / c["decode_steps"] for c in coll)
    per_token = statistics.median(c["all_reduce_bytes"] / c["tokens"] for c in coll)
    analytic = 2 * layers * hidden * 4
    report["collective"] = {"share_of_decode": share, "all_reduce_calls_per_step": calls_per_step,
                            "bytes_per_token": per_token, "analytic_bytes_per_token": analytic,
                            "measured_over_analytic": per_token / analytic, "rows": coll[0]["rows"]}
    print(f"\nTP=2, {coll[0]['rows']} rows, decode steps only (rank 0's all-reduce kernel):")
    print(f"  time inside the all-reduce: {share:.1%} of the decode wall time ({calls_per_step:.0f} all-reduces a step)")
    print(f"  bytes all-reduced per token: {per_token:,.0f} measured vs {analytic:,} analytic "
          f"(2 x {layers} layers x {hidden} hidden x 4 bytes): {per_token / analytic:.3f}x")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
