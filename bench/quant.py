"""make bench-quant: quality, size and CPU speed of every precision, against fp32 in the same run.

For the trained demo model (checkpoints/stdlib-5m), builds one ONNX Runtime engine per row (fp32,
fp16, fp8, int8-sq, int8-wo, fp32 weights with an fp8 KV cache, fp8 with an fp8 KV cache) and
measures, through the built engine:

  ppl        held-out perplexity: the first 48 windows of 256 tokens of the held-out split
             (export/demo/train.py; calibration uses the end of that split, not these windows)
  top1       fraction of positions whose argmax equals fp32's
  weights    bytes on disk (model.onnx + model.onnx.data)
  decode     tokens/s, batch 1, greedy, 64 steps after a 32-token prompt, KV cache of 128; every
             engine is timed in each of 5 round-robin rounds and its best round is kept

and prints ratios against fp32 and PASS/FAIL against the targets (perplexity vs fp32: fp8 <= +1.5%,
int8-wo <= +0.5%, int8-sq <= +3%). Each engine runs with the ONNX Runtime session settings its
manifest names (see graphs/quantization/recipes.py `ort_session_config`); two extra lines show what ORT's
defaults would have done to the int8 engines (approximate MatMulNBits, saturating u8s8 kernel).

Without checkpoints/stdlib-5m it says so and measures the random-weight demo-tiny checkpoint
instead: the table then shows the mechanics, not meaningful quality.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

WORK = ROOT / "bench" / ".work" / "quant"
TRAINED = ROOT / "checkpoints" / "stdlib-5m"
TARGETS = {"fp8": 1.5, "int8-wo": 0.5, "int8-sq": 3.0}  # max perplexity increase over fp32, percent
DECODE_STEPS, PROMPT_LEN, CAPACITY = 64, 32, 128
SPEED_ROUNDS = 5  # engines are timed round-robin, best round kept: the CPU is shared, load drifts


@dataclass(frozen=True)
class Row:
    name: str
    precision: str
    kv_cache: str | None = None


ROWS = [Row("fp32", "fp32"), Row("fp16", "fp16"), Row("fp8", "fp8"), Row("int8-sq", "int8-sq"),
        Row("int8-wo", "int8-wo"), Row("fp8-KV (fp32 weights)", "fp32", "fp8"), Row("fp8 + fp8-KV", "fp8", "fp8")]


def checkpoint() -> tuple[Path, bool]:
    if (TRAINED / "config.json").is_file():
        return TRAINED, True
    print(f"NOTE: {TRAINED} not found (train it with `make demo-model`). Falling back to the random-weight "
          "demo-tiny checkpoint: the numbers below show the mechanics only; quality on random weights means nothing.")
    from llamaforge.export.demo.tiny import make_demo_checkpoint

    demo = ROOT / "checkpoints" / "demo-tiny"
    if not (demo / "config.json").is_file():
        make_demo_checkpoint(demo)
    return demo, False


def eval_windows(ckpt: Path, trained: bool) -> np.ndarray:
    from llamaforge.export.demo.train import heldout_windows

    windows = heldout_windows(ckpt / "tokenizer.json")
    return windows if trained else windows[:8]


def session_with(engine_dir: Path, config: dict[str, str]):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for k, v in config.items():
        options.add_session_config_entry(k, v)
    return ort.InferenceSession(str(engine_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])


def all_logits(engine, windows: np.ndarray, batch: int = 8) -> np.ndarray:  # type: ignore[no-untyped-def]
    out = []
    for start in range(0, len(windows), batch):
        ids = windows[start:start + batch]
        logits, _ = engine.step(ids, np.zeros(len(ids), np.int32), engine.kv.empty(len(ids), ids.shape[1]))
        out.append(logits.astype(np.float32))
    return np.concatenate(out)


def perplexity(logits: np.ndarray, windows: np.ndarray) -> float:
    x = logits[:, :-1].reshape(-1, logits.shape[-1]).astype(np.float64)
    target = windows[:, 1:].reshape(-1)
    m = x.max(-1, keepdims=True)
    logz = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
    return math.exp(float(np.mean(logz - x[np.arange(len(target)), target])))


def decode_tokens_per_s(engine, prompt: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    past = engine.kv.empty(1, CAPACITY)
    logits, past = engine.step(prompt[None], np.zeros(1, np.int32), past)
    token = int(logits[0, -1].argmax())
    for _ in range(4):  # warm-up
        engine.step(np.array([[token]]), np.array([PROMPT_LEN], np.int32), past)
    start = time.perf_counter()
    for step in range(DECODE_STEPS):
        logits, past = engine.step(np.array([[token]]), np.array([PROMPT_LEN + step], np.int32), past)
        token = int(logits[0, -1].argmax())
    return DECODE_STEPS / (time.perf_counter() - start)


def weight_bytes(engine_dir: Path) -> int:
    return sum((engine_dir / f).stat().st_size for f in ("model.onnx", "model.onnx.data"))


def main() -> int:
    os.environ.setdefault("LLAMAFORGE_QUIET", "1")
    from llamaforge.build.builder import BuildOptions, build_engine
    from llamaforge.runtime.core.engine import Engine

    ckpt, trained = checkpoint()
    windows = eval_windows(ckpt, trained)
    print(f"checkpoint {ckpt}; held-out evaluation {windows.shape[0]} x {windows.shape[1]} tokens; "
          f"decode {DECODE_STEPS} steps, batch 1, {os.cpu_count()} CPU cores")
    WORK.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    fp32_top1: np.ndarray | None = None
    engines: dict[str, Path] = {}
    for row in ROWS:
        out = WORK / row.name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")
        print(f"\n== {row.name}: building", flush=True)
        build_engine(BuildOptions(checkpoint=ckpt, out=out, precision=row.precision, kv_cache=row.kv_cache))
        engines[row.name] = out
        engine = Engine(out)
        logits = all_logits(engine, windows)
        top1 = logits.argmax(-1)
        if fp32_top1 is None:
            fp32_top1 = top1
        results[row.name] = {"ppl": perplexity(logits, windows), "top1": float((top1 == fp32_top1).mean()),
                             "bytes": weight_bytes(out), "tok_s": 0.0}
        print(f"   ORT session config: {engine.session_config or '(defaults)'}; {results[row.name]}")

    # Speed, round-robin so that load from other processes hits every engine alike; plus the same
    # int8 engines under ORT's default settings (what they would run as without our manifest).
    timed = {row.name: Engine(engines[row.name]) for row in ROWS}
    for name in ("int8-wo", "int8-sq"):
        timed[f"{name} @ ORT defaults"] = Engine(engines[name])
        timed[f"{name} @ ORT defaults"].session = session_with(engines[name], {})
    speed = {name: 0.0 for name in timed}
    prompt = windows[0, :PROMPT_LEN]
    for _ in range(SPEED_ROUNDS):
        for name, engine in timed.items():
            speed[name] = max(speed[name], decode_tokens_per_s(engine, prompt))
    for row in ROWS:
        results[row.name]["tok_s"] = speed[row.name]

    base = results["fp32"]
    record = ckpt / "training.json"
    if record.is_file():  # the trainer's own (transformers) perplexity on the same windows: a cross-check
        import json

        print(f"\nfp32 engine perplexity {base['ppl']:.4f}; training.json records "
              f"{json.loads(record.read_text()).get('heldout_perplexity')} (transformers, same windows)")
    print(f"\n{'precision':<24}{'ppl':>9}{'vs fp32':>9}{'top1':>8}{'weights':>11}{'vs fp32':>9}{'decode tok/s':>14}{'vs fp32':>9}  target")
    failed = False
    for row in ROWS:
        r = results[row.name]
        dppl = 100 * (r["ppl"] / base["ppl"] - 1)
        verdict = ""
        if row.name in TARGETS:
            ok = dppl <= TARGETS[row.name]
            failed |= not ok
            verdict = f"{'PASS' if ok else 'FAIL'} (<= +{TARGETS[row.name]}%)"
        print(f"{row.name:<24}{r['ppl']:>9.3f}{dppl:>+8.2f}%{r['top1']:>8.3f}{r['bytes'] / 1e6:>9.2f}MB"
              f"{r['bytes'] / base['bytes']:>8.2f}x{r['tok_s']:>14.1f}{r['tok_s'] / base['tok_s']:>8.2f}x  {verdict}")

    # What ONNX Runtime's defaults would do to the int8 engines (same graphs, same windows).
    print("\nONNX Runtime settings (ours vs ORT defaults, same engine, same windows):")
    for name, ours in (("int8-wo", "session.qdq_matmulnbits_accuracy_level=1 (MatMulNBits, fp32 compute)"),
                       ("int8-sq", "session.x64quantprecision=1 (exact u8u8 int8 GEMM)")):
        default = timed[f"{name} @ ORT defaults"]
        ppl = perplexity(all_logits(default, windows), windows)
        print(f"  {name}: ours {ours}: ppl {results[name]['ppl']:.3f}, {speed[name]:.1f} tok/s; "
              f"ORT defaults: ppl {ppl:.3f} ({100 * (ppl / base['ppl'] - 1):+.2f}% vs fp32), "
              f"{speed[f'{name} @ ORT defaults']:.1f} tok/s ({speed[f'{name} @ ORT defaults'] / base['tok_s']:.2f}x fp32)")
    if not trained:
        print("\n(random weights: PASS/FAIL is not meaningful)")
        return 0
    shutil.rmtree(WORK / "tmp", ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
