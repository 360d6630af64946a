"""make bench-prefix: automatic prefix caching on a chat workload, cache on against off.

Model: the 125M random-weight checkpoint of `make bench-serve` (hidden 768, 12 layers, GQA 12/4,
vocab 32000, fp32), with a 2048-token context, built once under --workdir (bench/.work/).
Requests go to an `EngineCore` in this process (the core of `llamaforge serve`), token ids in,
streamed outputs timed where they arrive: max_num_seqs 8, 512 tokens per step, a KV budget of
16384 tokens, greedy, min_tokens = max_tokens (nothing stops early).

Chat workload (the case prefix caching is for): --conversations conversations start at Poisson
arrivals (--rate per second). Every conversation's first prompt is one shared 1,024-token system
prompt plus its own user turn; each later turn re-sends the whole history (the previous prompt,
the answer it got, and a new user turn), the moment the previous answer has arrived. User turns
are U[32, 96] tokens, answers --answer-tokens. No-share workload (its overhead): the same arrivals,
single-turn requests with their own random 1,024-token prompts. Token ids are drawn uniformly from
the vocabulary (random weights: only the shapes matter).

Each workload runs with the cache on and off (`KVCacheConfig.prefix_caching`), each from a cold
cache after one warm-up request of unrelated tokens; the no-share pair is run --rounds times,
alternating which goes first, and the medians are reported (the difference is a few percent, under
this VM's drift). Printed: TTFT p50/p99, throughput (generated tokens / (last token - first
arrival)), prompt tokens computed and found cached.

Targets: chat TTFT p50 >= 5x better and throughput >= 2x with the cache; no-share throughput with
the cache >= 0.97x without.

  python bench/prefix.py [--conversations 8] [--turns 3] [--rate 1.0] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from serve import ROOT, VOCAB, make_checkpoint  # bench/ is on sys.path: `python bench/prefix.py`

SYSTEM_TOKENS = 1024
CONTEXT = 2048
TARGETS = {"ttft50": 5.0, "chat_tok_s": 2.0, "noshare_tok_s": 0.97}


@dataclass
class Turn:
    sent: float = 0.0
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    cached: int = 0


@dataclass
class Conversation:
    arrival: float  # seconds after the start
    turns: list[list[int]]  # each turn's new tokens; the first includes the system prompt
    answer_tokens: int
    log: list[Turn] = field(default_factory=list)


def chat_workload(n: int, turns: int, rate: float, answer: int, seed: int) -> list[Conversation]:
    rng = np.random.default_rng(seed)
    system = rng.integers(2, VOCAB, SYSTEM_TOKENS).tolist()
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n)) - 1.0 / rate
    convs = []
    for i in range(n):
        user = [rng.integers(2, VOCAB, int(rng.integers(32, 97))).tolist() for _ in range(turns)]
        convs.append(Conversation(float(max(arrivals[i], 0.0)), [system + user[0]] + user[1:], answer))
    return convs


def noshare_workload(n: int, rate: float, answer: int, seed: int) -> list[Conversation]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n)) - 1.0 / rate
    return [Conversation(float(max(a, 0.0)), [rng.integers(2, VOCAB, SYSTEM_TOKENS + 64).tolist()], answer)
            for a in arrivals]


def run(engine: Path, convs: list[Conversation], prefix_caching: bool, threads: int | None) -> dict[str, float]:
    """Replay `convs` into a fresh EngineCore; the conversations' logs are filled in."""
    from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
    from llamaforge.runtime.core.engine_core import EngineCore
    from llamaforge.runtime.core.requests import GenerationRequest

    core = EngineCore(engine, CoreConfig(KVCacheConfig(budget_tokens=16384, prefix_caching=prefix_caching),
                                         SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512),
                                         max_queue=256, threads=threads))
    rng = np.random.default_rng(99)

    def converse(c: Conversation, start: float, name: str) -> None:
        time.sleep(max(0.0, start + c.arrival - time.perf_counter()))
        history: list[int] = []
        c.log = []
        for k, new in enumerate(c.turns):
            prompt = history + new
            turn = Turn(sent=time.perf_counter())
            c.log.append(turn)
            handle = core.submit(GenerationRequest(f"{name}-{k}", prompt, c.answer_tokens, min_tokens=c.answer_tokens,
                                                   stream=True, detokenize=False))
            answer: list[int] = []
            for out in handle:
                if out.token_ids:
                    now = time.perf_counter()
                    turn.first = turn.first or now
                    turn.last = now
                    answer += out.token_ids
                if out.finished:
                    if out.error:
                        raise RuntimeError(f"{name}-{k}: {out.error}")
                    turn.cached = out.num_cached_tokens
            turn.tokens = len(answer)
            history = prompt + answer

    core.start()
    try:
        warm = rng.integers(2, VOCAB, 64).tolist()  # unrelated tokens: the cache stays cold for the run
        list(core.submit(GenerationRequest("warmup", warm, 8)))
        before = core.stats()
        start = time.perf_counter()
        workers = [threading.Thread(target=converse, args=(c, start, f"c{i}")) for i, c in enumerate(convs)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        after = core.stats()
    finally:
        core.stop()
    turns = [t for c in convs for t in c.log]
    ttft = [(t.first - t.sent) * 1e3 for t in turns if t.first is not None]
    span = max(t.last for t in turns if t.last is not None) - start
    prompt_tokens = after["prefix_cache_queries_tokens"] - before["prefix_cache_queries_tokens"]
    hits = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    return {"ttft50": float(np.percentile(ttft, 50)), "ttft99": float(np.percentile(ttft, 99)),
            "tok_s": sum(t.tokens for t in turns) / span, "span": span, "requests": len(turns),
            "cached_tokens": float(sum(t.cached for t in turns)), "lookup_tokens": prompt_tokens, "hit_tokens": hits}


def prompt_tokens(convs: list[Conversation]) -> int:
    """Prompt tokens of every request the workload sent (each turn re-sends the history)."""
    total = 0
    for c in convs:
        history = 0
        for new, turn in zip(c.turns, c.log):
            history += len(new)
            total += history
            history += turn.tokens
    return total


def bookkeeping_us(tokens: int = SYSTEM_TOKENS + 64, repeats: int = 50) -> float:
    """Microseconds of prefix-cache bookkeeping for one request of `tokens` prompt tokens that finds
    nothing cached: the lookup, and registering its full blocks (hashing them) as they are computed.
    What the no-share workload pays per request, measured apart from the run's noise."""
    from llamaforge.runtime.core.engine import KVSpec
    from llamaforge.runtime.core.kv_cache import KVCacheManager

    spec = KVSpec(num_layers=1, num_kv_heads=1, head_dim=1, dtype=np.dtype(np.float32), max_capacity=CONTEXT)
    rng = np.random.default_rng(5)
    best = float("inf")
    for _ in range(repeats):
        kv = KVCacheManager(spec, budget_tokens=2 * tokens + 64)
        prompt = rng.integers(2, VOCAB, tokens).tolist()
        t0 = time.perf_counter()
        kv.lookup("s", prompt)
        kv.grow("s", tokens)
        for done in range(512, tokens + 512, 512):  # chunked prefill: a commit per 512-token chunk
            kv.commit("s", prompt, min(done, tokens))
        kv.free("s")
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / ".work")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--rate", type=float, default=1.0, help="conversations (chat) or requests (no-share) per second")
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--noshare-requests", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3, help="alternated on/off pairs of the no-share workload")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("LLAMAFORGE_QUIET", "1")
    ckpt, engine = args.workdir / f"ckpt-bench-ctx{CONTEXT}", args.workdir / f"engine-bench-ctx{CONTEXT}"
    if not (ckpt / "config.json").exists():
        make_checkpoint(ckpt, "bench", max_position=CONTEXT)
    from engine_cache import ensure_engine

    from llamaforge.build.builder import BuildOptions, build_engine

    ensure_engine(engine, f"{ckpt.resolve()}|fp32",
                  lambda: build_engine(BuildOptions(checkpoint=ckpt, out=engine, precision="fp32", backend="ort")))
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    results: dict[str, dict[str, float]] = {}
    noshare: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    plan = [("chat", on) for on in (False, True)]
    for r in range(args.rounds):
        plan += [("noshare", on) for on in ((True, False) if r % 2 else (False, True))]
    sent: dict[str, int] = {}
    with tqdm(plan, desc="bench-prefix", unit="run") as bar:
        for kind, on in bar:
            label = f"{kind} {'on' if on else 'off'}"
            bar.set_postfix_str(label)
            convs = (chat_workload(args.conversations, args.turns, args.rate, args.answer_tokens, seed=0) if kind == "chat"
                     else noshare_workload(args.noshare_requests, args.rate, args.answer_tokens, seed=1))
            res = run(engine, convs, on, args.threads)
            sent[kind] = prompt_tokens(convs)
            if kind == "chat":
                results[label] = res
            else:
                noshare["on" if on else "off"].append(res)
    for side, runs in noshare.items():
        results[f"noshare {side}"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    table = Table(title=f"prefix caching: {args.conversations} conversations x {args.turns} turns sharing a "
                        f"{SYSTEM_TOKENS}-token system prompt, Poisson {args.rate}/s; no-share: "
                        f"{args.noshare_requests} requests of {SYSTEM_TOKENS + 64} tokens (median of {args.rounds})")
    for col in ("run", "requests", "prompt tokens sent", "found cached", "TTFT p50 ms", "TTFT p99 ms", "tok/s", "span s"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for label, r in results.items():
        kind = label.split()[0]
        table.add_row(label, f"{r['requests']:.0f}", str(sent[kind]), f"{r['cached_tokens']:.0f}", f"{r['ttft50']:.0f}",
                      f"{r['ttft99']:.0f}", f"{r['tok_s']:.1f}", f"{r['span']:.1f}")
    console = Console(width=150)
    console.print(table)
    on, off = results["chat on"], results["chat off"]
    ratios = {"ttft50": off["ttft50"] / on["ttft50"], "chat_tok_s": on["tok_s"] / off["tok_s"],
              "noshare_tok_s": results["noshare on"]["tok_s"] / results["noshare off"]["tok_s"]}
    saved = on["cached_tokens"] / sent["chat"]
    print(f"chat: prefill tokens saved {on['cached_tokens']:.0f} of {sent['chat']} ({saved:.0%}); "
          f"TTFT p99 {off['ttft99'] / on['ttft99']:.1f}x better")
    print(f"no-share: prefix-cache bookkeeping per {SYSTEM_TOKENS + 64}-token request (lookup, hashing its blocks): "
          f"{bookkeeping_us():.0f} us, against {results['noshare off']['span'] / args.noshare_requests * 1e3:.0f} ms of "
          "run per request")
    failed = False
    for key, label in (("ttft50", "chat TTFT p50, off / on"), ("chat_tok_s", "chat throughput, on / off"),
                       ("noshare_tok_s", "no-share throughput, on / off")):
        ok = ratios[key] >= TARGETS[key]
        failed |= not ok
        print(f"  {label}: {ratios[key]:.2f}x (target >= {TARGETS[key]}x) {'PASS' if ok else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
                                         "args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "prompt_tokens_sent": sent, "ratios": ratios, "noshare_rounds": noshare},
                                        indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
