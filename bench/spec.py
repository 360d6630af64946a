"""make bench-spec: speculative decoding (prompt lookup) on against off, single stream and 8 streams.

Model: `stdlib-5m-copy` (checkpoints/stdlib-5m-copy: the repo's trained 4.7M-parameter
Llama-3-architecture model of Python's standard library, fine-tuned to copy what its prompt holds;
`make demo-copy-model` reproduces it, export/demo/copy_tune.py), built once at fp32 under
--workdir; --checkpoint takes another (stdlib-5m itself never learned to copy). Speculation needs a
model whose output really follows its input, so random weights cannot measure it. Requests go to an
`EngineCore` in this process (the core of `llamaforge serve`), token ids in, timed where the
streamed tokens arrive.

Workloads (--new-tokens new tokens each, min_tokens = max_tokens so nothing stops early):
  * editing: the prompt holds --file-tokens tokens of a standard-library module from one of its
    top-level `def` lines on, then a blank line and the first 16 of those tokens again: the output
    rewrites that code, mostly as it was (what code editing and retrieval-style answers look
    like). Greedy. The model was trained on 256-token windows, so prompt and output stay within.
  * no-repeat: 64 random token ids, sampled at temperature 1 (seeded): an output with nothing to
    look up, where the proposer must stand back.
Each is run single-stream (the 8 requests one at a time; tok/s from a request's first to its last
token, averaged) and 8-concurrent (8 requests submitted together; tokens / span), with
`--speculative ngram` (k = --k, n-grams 2..4) and without: in each of --rounds rounds, each
request (1 stream) or batch of 8 runs with speculation on and off back to back, alternating which
goes first, and the ratio is the median of those pairs' ratios (drift cancels within a pair). Both
arms run on one core and one ORT session, "off" with its speculator detached (see main()).
Printed: tok/s (medians), ratio with the pairs' quartiles, acceptance rate (accepted / proposed
draft tokens), tokens accepted per verify step, and for editing how much of the output is the file's continuation (the
model's copying: what prompt lookup can find beyond the model's own repetitions). Greedy outputs
with and without speculation are compared token for token.
Then the verify call's cost against a decode call's, for 1 and 8 rows, on this model and on the
125M random-weight bench checkpoint of `make bench-serve` (weight-bound at one row; --no-weight-bound
skips it).

Targets: editing single-stream >= 1.5x; no-repeat single-stream >= 0.95x.

  python bench/spec.py [--rounds 10] [--k 4] [--new-tokens 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {("editing", 1): 1.5, ("no-repeat", 1): 0.95}


def editing_prompts(tokenizer: Any, n: int, file_tokens: int) -> list[list[int]]:
    """`n` prompts, each --file-tokens tokens of a standard-library module from one of its `def`
    lines on, a blank line, and the first 16 of them again. The modules are stdlib-5m's held-out
    ones, so the model has not been trained on the file it is asked to rewrite."""
    from llamaforge.export.demo.train import split_files

    prompts = []
    _, held_out = split_files()
    for path in held_out:
        text = path.read_text(encoding="utf-8", errors="replace")
        defs = [i + 1 for i in range(len(text)) if text.startswith("\ndef ", i)]
        if len(defs) < 3:
            continue
        ids = tokenizer.encode(text[defs[len(defs) // 2]:], add_bos=False)[:file_tokens]  # a def in the middle
        if len(ids) < file_tokens:
            continue
        prompts.append(tokenizer.encode("", add_bos=True) + ids + tokenizer.encode("\n\n", add_bos=False) + ids[:16])
        if len(prompts) == n:
            return prompts
    raise SystemExit(f"found only {len(prompts)} standard-library modules with 3 defs and {file_tokens} tokens after one")


def random_prompts(vocab: int, n: int) -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(2, vocab, 64).tolist() for _ in range(n)]


def timed(core: Any, prompts: list[list[int]], new: int, sampled: bool, concurrent: bool) -> tuple[float, list[list[int]]]:
    """tok/s of `prompts` through `core`, one at a time or all at once; and each one's tokens."""
    from llamaforge.runtime.core.requests import GenerationRequest
    from llamaforge.runtime.core.sampling import SamplingParams

    def request(i: int, p: list[int]) -> GenerationRequest:
        params = SamplingParams(temperature=1.0, seed=i) if sampled else SamplingParams()
        return GenerationRequest(f"{time.perf_counter_ns()}-{i}", p, new, params, min_tokens=new, stream=True,
                                 detokenize=False)

    def drain(handle: Any) -> tuple[list[float], list[int]]:
        times, tokens = [], []
        for out in handle:
            times += [time.perf_counter()] * len(out.token_ids)
            tokens += out.token_ids
        return times, tokens

    if concurrent:
        handles = [core.submit(request(i, p)) for i, p in enumerate(prompts)]
        runs = [drain(h) for h in handles]
        first = min(t[0] for t, _ in runs)
        last = max(t[-1] for t, _ in runs)
        return sum(len(tok) - 1 for _, tok in runs) / (last - first), [tok for _, tok in runs]
    rates, outs = [], []
    for i, p in enumerate(prompts):
        times, tokens = drain(core.submit(request(i, p)))
        rates.append((len(tokens) - 1) / (times[-1] - times[0]))
        outs.append(tokens)
    return float(np.mean(rates)), outs


def verify_costs(engine_dir: Path, k: int, past: int = 200) -> list[tuple[int, float, float]]:
    """(rows, ms of a decode call, ms of a verify call of 1 + k tokens per row) at `past` tokens of
    context: the decode as the engine core runs it (in place), the verify as it runs for several
    rows (`Engine.step`: one call per row, since ORT's GQA kernel refuses several rows of several
    tokens after a past in one call) and for one row (in place, on the GQA kernel). Best of 3 x 5."""
    from llamaforge.runtime.core.engine import Engine

    engine = Engine(engine_dir)
    capacity = -(-(past + k + 1) // 64) * 64

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            times.append((time.perf_counter() - t0) / 5)
        return min(times) * 1e3

    def costs(rows: int) -> tuple[int, float, float]:
        caches = engine.kv.empty(rows, capacity)
        lengths = np.full(rows, past, np.int32)
        decode = best(lambda: engine.decode_in_place_step(np.ones((rows, 1), np.int64), lengths, caches))
        if rows == 1:
            verify = best(lambda: engine.decode_in_place_step(np.ones((1, k + 1), np.int64), lengths, caches))
        else:
            verify = best(lambda: engine.step(np.ones((rows, k + 1), np.int64), lengths, caches))
        return rows, decode, verify

    return [costs(1), costs(8)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / ".work" / "spec")
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "stdlib-5m-copy")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--file-tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--weight-bound", action=argparse.BooleanOptionalAction, default=True,
                    help="also time verify calls on the 125M bench checkpoint of make bench-serve (built once)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("LLAMAFORGE_QUIET", "1")
    from engine_cache import ensure_engine
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from llamaforge.build.builder import BuildOptions, build_engine
    from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig, SpeculativeConfig
    from llamaforge.runtime.core.engine_core import EngineCore

    model = args.checkpoint.resolve().name
    engine = args.workdir / f"{model}-fp32"
    ensure_engine(engine, f"{args.checkpoint.resolve()}|fp32", lambda: build_engine(
        BuildOptions(checkpoint=args.checkpoint, out=engine, precision="fp32", backend="ort")))

    # One core and one ORT session for both arms: "off" runs with the core's speculator detached,
    # which is the step a core configured without speculation runs (EngineCore.step proposes only
    # when it has a speculator). Two cores, two sessions alternating in one process, measured each
    # arm about 40% slower and the pairs' ratios spread 0.7-1.5x, where one session spreads +-7%.
    core = EngineCore(engine, CoreConfig(KVCacheConfig(budget_tokens=8 * 1024, prefix_caching=False),
                                         SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024),
                                         speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=args.k),
                                         threads=args.threads))
    speculator = core.speculator
    core.start()

    def speculating(spec: bool) -> EngineCore:
        """The core with speculation on or off; set only while it is idle (between timed runs)."""
        assert core.idle()
        core.speculator = speculator if spec else None
        return core

    try:
        tok = core.tokenizer
        assert tok is not None and speculator is not None
        workloads = {"editing": (editing_prompts(tok, 8, args.file_tokens), False),
                     "no-repeat": (random_prompts(core.engine.vocab_size, 8), True)}
        for spec in (True, False):  # warm-up: first runs allocate
            timed(speculating(spec), workloads["editing"][0][:1], 8, False, False)
        rates: dict[tuple[str, int, bool], list[float]] = {}
        pairs: dict[tuple[str, int], list[float]] = {}  # on / off of back-to-back runs of the same requests
        accept: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
        outputs: dict[tuple[str, int, bool], list[list[int]]] = {}
        cells = [(w, streams) for w in workloads for streams in (1, 8)]
        # A unit is what one timed run sends: one request (1 stream) or all 8 at once. Each unit runs
        # with speculation on and off back to back, in alternating order, so the machine's drift
        # cancels in each pair's ratio; the ratio reported is the median over pairs.
        # A batch of 8 is over in a quarter of a second, so it is timed 4 times a round (as many
        # pairs, against the 8 a round of single requests gives).
        units = {(w, streams): ([[p] for p in workloads[w][0]] if streams == 1 else [workloads[w][0]] * 4)
                 for w, streams in cells}
        with tqdm(total=args.rounds * sum(len(u) for u in units.values()) * 2, desc="bench-spec", unit="run") as bar:
            for r in range(args.rounds):
                for w, streams in cells:
                    sampled = workloads[w][1]
                    outs_of: dict[bool, list[list[int]]] = {True: [], False: []}
                    for i, unit in enumerate(units[(w, streams)]):
                        rate_of = {}
                        for spec in ((True, False) if (r + i) % 2 else (False, True)):
                            bar.set_postfix_str(f"round {r + 1} {w} x{streams} {'on' if spec else 'off'}")
                            drafted, accepted = speculator.stats.draft_tokens, speculator.stats.accepted_tokens
                            steps = core.counters.verify_steps
                            rate, outs = timed(speculating(spec), unit, args.new_tokens, sampled, streams == 8)
                            rate_of[spec] = rate
                            rates.setdefault((w, streams, spec), []).append(rate)
                            outs_of[spec] += outs
                            if spec:
                                accept.setdefault((w, streams), []).append((
                                    speculator.stats.draft_tokens - drafted, speculator.stats.accepted_tokens - accepted,
                                    core.counters.verify_steps - steps))
                            bar.update()
                        pairs.setdefault((w, streams), []).append(rate_of[True] / rate_of[False])
                    for spec in (True, False):
                        outputs[(w, streams, spec)] = outs_of[spec]
    finally:
        core.stop()

    table = Table(title=f"speculative decoding (prompt lookup, k={args.k}) on {model} fp32, {args.new_tokens} new "
                        f"tokens per request, {args.rounds} rounds; tok/s: medians")
    for col in ("workload", "streams", "off tok/s", "on tok/s", "on / off (median of pairs)", "pairs' quartiles",
                "acceptance", "accepted per verify", "greedy tokens equal", "output = the file's"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    ratios: dict[str, float] = {}
    failed = False
    for w, streams in cells:
        off, on = statistics.median(rates[(w, streams, False)]), statistics.median(rates[(w, streams, True)])
        proposed = sum(a[0] for a in accept[(w, streams)])
        accepted = sum(a[1] for a in accept[(w, streams)])
        verifies = sum(a[2] for a in accept[(w, streams)])
        sampled = workloads[w][1]
        same = "sampled" if sampled else (
            "yes" if outputs[(w, streams, True)] == outputs[(w, streams, False)] else "NO")
        failed |= same == "NO"
        ratio = statistics.median(pairs[(w, streams)])
        q1, _, q3 = statistics.quantiles(pairs[(w, streams)], n=4)
        ratios[f"{w} x{streams}"] = ratio
        copied = "-"
        if w == "editing":  # how much of the output is the file's continuation (what a model that edits copies)
            file_tokens = [p[1 + 16: 1 + args.file_tokens] for p in workloads[w][0]]
            outs = outputs[(w, streams, False)]
            copied = f"{np.mean([o[i] == f[i] for o, f in zip(outs, file_tokens) for i in range(min(len(o), len(f)))]):.0%}"
        table.add_row(w, str(streams), f"{off:.1f}", f"{on:.1f}", f"{ratio:.2f}x", f"{q1:.2f}-{q3:.2f}",
                      f"{accepted / proposed:.0%}" if proposed else "-", f"{accepted / verifies:.2f}" if verifies else "-",
                      same, copied)
    Console(width=160).print(table)
    costs = Table(title=f"verify call vs decode call, {1 + args.k} tokens per row after 200 of context (ms, best of 3x5)")
    for col in ("engine", "rows", "decode", "verify", "verify / decode"):
        costs.add_column(col, justify="left" if col == "engine" else "right")
    engines = {f"{model} fp32": engine}
    if args.weight_bound:
        from serve import prepare  # bench/ is on sys.path: `python bench/spec.py`

        engines["125M bench fp32 (weight-bound)"] = prepare(ROOT / "bench" / ".work", "bench", genai=False)[1]
    for name, d in engines.items():
        for rows, decode, verify in verify_costs(d, args.k):
            costs.add_row(name, str(rows), f"{decode:.2f}", f"{verify:.2f}", f"{verify / decode:.2f}x")
    Console(width=160).print(costs)
    for (w, streams), target in TARGETS.items():
        ok = ratios[f"{w} x{streams}"] >= target
        failed |= not ok
        print(f"  {w}, {streams} stream: {ratios[f'{w} x{streams}']:.2f}x (target >= {target}x) {'PASS' if ok else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "k": args.k, "rounds": args.rounds,
            "rates": {f"{w} x{s} {'on' if sp else 'off'}": v for (w, s, sp), v in rates.items()},
            "acceptance": {f"{w} x{s}": v for (w, s), v in accept.items()}, "ratios": ratios}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
