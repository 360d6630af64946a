"""make bench-sampling: the host cost of picking one token from one row of logits (runtime/core/sampling.py
`pick`), per row and step, at Llama 2's and Llama 3's vocabularies (32000, 128256).

Settings: greedy; greedy with its log prob; temperature 0.8; temperature 0.6 with top_p 0.9 (Llama's
chat default) on peaked logits (a trained model's: std 4) and on flat ones (a random-weight model's:
std 1). Each is timed against the same arithmetic written the plain NumPy way in this script, the
way `pick` did it before: temporaries of the vocabulary's size at each step, `Generator.choice`
with its checks of p, and top-p by sorting the whole vocabulary. Both draw the same tokens (checked).
Each side runs in two processes: with the engine core's malloc thresholds
(runtime/core/host_memory.py, what `EngineCore` sets) and with glibc's defaults
(LLAMAFORGE_MALLOC_DEFAULTS=1), since fresh pages cost more than the arithmetic.

  python bench/sampling.py [--repeat 200]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOCABS = (32000, 128256)
CASES = ("greedy", "greedy + log prob", "T 0.8", "T 0.6, top_p 0.9, peaked", "T 0.6, top_p 0.9, flat")


def plain_pick(logits: np.ndarray, temperature: float, top_p: float, want_log_prob: bool,
               rng: np.random.Generator) -> int:
    """The peer: pick's steps as plain NumPy expressions (each a new array), choice, a full sort."""
    x = logits.astype(np.float64)
    if temperature == 0.0:
        k = int(np.argmax(x))
        if want_log_prob:
            m = float(np.max(x))
            _ = x - (m + float(np.log(np.sum(np.exp(x - m)))))
        return k
    x = x / temperature
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[cumulative - probs[order] < top_p]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def ours_pick(logits: np.ndarray, params: Any, rng: np.random.Generator, want_log_prob: bool) -> int:
    from llamaforge.runtime.core.sampling import pick

    return pick(logits, params, rng, want_log_prob=want_log_prob).token


def measure(repeat: int) -> dict[str, dict[str, float]]:
    """us per pick, ours and the peer's, for every vocabulary and case (in this process)."""
    from llamaforge.runtime.core.host_memory import retain_freed_memory
    from llamaforge.runtime.core.sampling import SamplingParams

    retain_freed_memory()  # what the engine core does; a no-op under LLAMAFORGE_MALLOC_DEFAULTS=1
    results: dict[str, dict[str, float]] = {}
    for vocab in VOCABS:
        for case in CASES:
            std = 1.0 if case.endswith("flat") else 4.0
            logits = (np.random.default_rng(vocab).standard_normal(vocab) * std).astype(np.float32)
            temperature, top_p = {"greedy": (0.0, 1.0), "greedy + log prob": (0.0, 1.0), "T 0.8": (0.8, 1.0)}.get(
                case, (0.6, 0.9))
            want = case == "greedy + log prob"
            params = SamplingParams(temperature=temperature, top_p=top_p)
            ours_rng, peer_rng = np.random.default_rng(1), np.random.default_rng(1)
            ours = functools.partial(ours_pick, logits, params, ours_rng, want)
            peer = functools.partial(plain_pick, logits, temperature, top_p, want, peer_rng)
            if [ours() for _ in range(20)] != [peer() for _ in range(20)]:
                raise SystemExit(f"vocab {vocab}, {case}: pick and the plain NumPy peer drew different tokens")
            n = max(5, repeat // (10 if "top_p" in case else 1))
            timings = {}
            for name, fn in (("ours", ours), ("peer", peer)):
                runs = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    for _ in range(n):
                        fn()
                    runs.append((time.perf_counter() - t0) / n * 1e6)
                timings[name] = min(runs)
            results[f"{vocab} | {case}"] = timings
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.repeat)))
        return 0
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    runs = {}
    for label, env in tqdm([("tuned", {}), ("glibc defaults", {"LLAMAFORGE_MALLOC_DEFAULTS": "1"})],
                           desc="bench-sampling", unit="process"):
        out = subprocess.run([sys.executable, __file__, "--child", "--repeat", str(args.repeat)], check=True,
                             capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT).stdout
        runs[label] = json.loads(out.strip().splitlines()[-1])
    table = Table(title="one token's pick from one row of logits, us (best of 3); plain NumPy: the same steps written the plain way")
    for col in ("vocab", "setting", "ours", "plain NumPy", "plain / ours", "ours, glibc defaults", "plain, glibc defaults"):
        table.add_column(col, justify="left" if col in ("vocab", "setting") else "right")
    ratios = []
    for key, t in runs["tuned"].items():
        vocab, case = key.split(" | ")
        d = runs["glibc defaults"][key]
        ratios.append(t["peer"] / t["ours"])
        table.add_row(vocab, case, f"{t['ours']:.0f}", f"{t['peer']:.0f}", f"{t['peer'] / t['ours']:.2f}x",
                      f"{d['ours']:.0f}", f"{d['peer']:.0f}")
    Console(width=160).print(table)
    print(f"  median plain NumPy / ours: {statistics.median(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
