"""make bench-quant (quality half): perplexity and top-1 of every quantized precision against fp32, on
stdlib-5m and on its outlier variant, with in-domain and out-of-domain calibration side by side.

Models (trained weights only: quality on random weights means nothing):
  stdlib-5m            checkpoints/stdlib-5m, trained on this Python's stdlib sources
  stdlib-5m-outliers   the same with LLM-like activation outliers, written by
                       export/demo/outliers.py into the work folder (channel outliers 32-64x in
                       every layer's q/k/v and gate/up inputs, massive activations on BOS, "." and
                       newline in layers 1-2; its fp32 perplexity is printed next to stdlib-5m's)

Calibration:
  in-domain            CALIB unset: the last 16 windows of 256 tokens of the held-out split
  out-of-domain        English prose of another domain: the license texts in /usr/share/common-licenses
                       (OOD_FILES, concatenated into the work folder; their size and sha256 are printed)

Evaluation: the first 48 windows of 256 tokens of the held-out split (never the calibration
windows), through the built ONNX Runtime engine with the session settings its manifest names:
perplexity, its change against the same model's fp32 engine, and top-1 agreement with fp32.
Targets (perplexity vs fp32, both models, both calibrations): fp8 <= +1.5%, int8-sq <= +3%,
int8-wo <= +0.5%, int4-awq <= +4%. Rows whose precision the build does not know are skipped.

  python bench/quant.py [--models stdlib-5m,stdlib-5m-outliers] [--precisions fp8,int8-sq,...]
                        [--calib in,out] [--fp8-sweep] [--reuse] [--json FILE]

--fp8-sweep measures every fp8 scale method instead (activation amax | percentile | mse, weight
amax | mse, per-tensor | per-channel weights) with out-of-domain calibration: how the fp8 defaults
in graphs/quantization/recipes.py were chosen. --reuse keeps engines already in the work folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work" / "quant"
TRAINED = ROOT / "checkpoints" / "stdlib-5m"
OUTLIERS = WORK / "stdlib-5m-outliers"
TARGETS = {"fp8": 1.5, "int8-sq": 3.0, "int8-wo": 0.5, "int4-awq": 4.0}  # max perplexity increase, percent
OOD_DIR = Path("/usr/share/common-licenses")
OOD_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic", "LGPL-2.1")
CALIBS = {"in": "in-domain", "out": "out-of-domain"}


@dataclass(frozen=True)
class Row:
    name: str
    precision: str
    options: dict[str, Any] = field(default_factory=dict)  # BuildOptions fields
    target: str | None = None  # the TARGETS key it is held to


ROWS = [Row("fp8", "fp8", target="fp8"), Row("int8-sq", "int8-sq", target="int8-sq"),
        # the per-token integer GEMM (the graph's per-token numbers), next to the default fast kernel
        Row("int8-sq integer", "int8-sq", {"ort_kernels": "integer"}),
        Row("int8-sq static", "int8-sq", {"int8_activation": "static"}),
        Row("int8-wo", "int8-wo", target="int8-wo"),
        # the Q/DQ graph's own numbers, next to the default fast kernels (MatMulNBits; graphs/passes/lower_quant_ort.py)
        Row("int8-wo exact", "int8-wo", {"ort_kernels": "exact"}),
        Row("int4-awq", "int4-awq", target="int4-awq"), Row("int4-rtn", "int4-rtn"),
        # the LM head quantized too: the default of int8-wo / int8-sq / int4-* where embeddings are untied
        # (not stdlib-5m's), as onnxruntime-genai's builder does; bench/quant_speed.py measures its speed
        Row("int8-sq +head", "int8-sq", {"quantize_lm_head": True}),
        Row("int8-wo +head", "int8-wo", {"quantize_lm_head": True}),
        Row("int4-awq +head", "int4-awq", {"quantize_lm_head": True})]
FP8_SWEEP = [Row(f"fp8 act={a} w={w} {g}", "fp8", {"fp8_activation_scale": a, "fp8_weight_scale": w, "fp8_weights": g})
             for a, w, g in [("amax", "amax", "per-tensor"), ("percentile", "amax", "per-tensor"),
                             ("mse", "amax", "per-tensor"), ("amax", "mse", "per-tensor"),
                             ("amax", "amax", "per-channel"), ("mse", "mse", "per-channel")]]


def ood_calibration() -> Path:
    """The out-of-domain calibration text: license prose, concatenated in a fixed order."""
    missing = [str(OOD_DIR / f) for f in OOD_FILES if not (OOD_DIR / f).is_file()]
    if missing:
        raise SystemExit(f"out-of-domain calibration text not found: {', '.join(missing)} (Debian's base-files "
                         "package installs them); run with --calib in")
    text = "\n\n".join((OOD_DIR / f).read_text(encoding="utf-8") for f in OOD_FILES)
    path = WORK / "calib-out-of-domain.txt"
    path.write_text(text, encoding="utf-8")
    print(f"out-of-domain calibration: {', '.join(OOD_FILES)} from {OOD_DIR}: {len(text):,} characters, "
          f"sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")
    return path


def models(names: list[str], reuse: bool) -> dict[str, Path]:
    if not (TRAINED / "config.json").is_file():
        raise SystemExit(f"{TRAINED} not found: quality is measured on the trained stdlib-5m only (make demo-model)")
    out = {}
    for name in names:
        if name == "stdlib-5m":
            out[name] = TRAINED
        elif name == "stdlib-5m-outliers":
            if not (reuse and (OUTLIERS / "config.json").is_file()):
                from llamaforge.export.demo.outliers import make_outlier_checkpoint

                make_outlier_checkpoint(OUTLIERS, TRAINED)
            out[name] = OUTLIERS
        else:
            raise SystemExit(f"--models: unknown model {name!r} (stdlib-5m, stdlib-5m-outliers)")
    return out


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


def weight_bytes(engine_dir: Path) -> int:
    return sum(f.stat().st_size for f in engine_dir.glob("model.onnx*"))


def build(ckpt: Path, out: Path, precision: str, calib: Path | None, options: dict[str, Any], reuse: bool) -> Path:
    from llamaforge.build.builder import BuildOptions, build_engine

    if reuse and (out / "manifest.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    build_engine(BuildOptions(checkpoint=ckpt, out=out, precision=precision, calib=calib, **options))
    print(f"   built {out.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def measure(engine_dir: Path, windows: np.ndarray, fp32_top1: np.ndarray | None) -> dict[str, Any]:
    from llamaforge.runtime.core.engine import Engine

    logits = all_logits(Engine(engine_dir), windows)
    top1 = logits.argmax(-1)
    return {"ppl": perplexity(logits, windows), "top1": float((top1 == fp32_top1).mean()) if fp32_top1 is not None else 1.0,
            "bytes": weight_bytes(engine_dir), "argmax": top1}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="stdlib-5m,stdlib-5m-outliers")
    p.add_argument("--precisions", help="comma-separated row names (default: every row whose precision the build knows)")
    p.add_argument("--calib", default="in,out", help="in, out or in,out")
    p.add_argument("--fp8-sweep", action="store_true", help="compare the fp8 scale methods (out-of-domain calibration)")
    p.add_argument("--reuse", action="store_true", help="reuse engines already built in the work folder")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    os.environ.setdefault("LLAMAFORGE_QUIET", "1")
    from llamaforge.export.demo.train import heldout_windows
    from llamaforge.graphs.quantization.recipes import QUANT_PRECISIONS

    WORK.mkdir(parents=True, exist_ok=True)
    calibs = ["out"] if args.fp8_sweep else args.calib.split(",")
    if any(c not in CALIBS for c in calibs):
        raise SystemExit(f"--calib {args.calib!r}: expected in, out or in,out")
    rows = FP8_SWEEP if args.fp8_sweep else [r for r in ROWS if r.precision in QUANT_PRECISIONS]
    skipped = [r.name for r in ROWS if r.precision not in QUANT_PRECISIONS] if not args.fp8_sweep else []
    if args.precisions:
        wanted = args.precisions.split(",")
        rows = [r for r in rows if r.name in wanted or r.precision in wanted]
    calib_paths = {"in": None, "out": ood_calibration() if "out" in calibs else None}
    ckpts = models(args.models.split(","), args.reuse)
    windows = heldout_windows(TRAINED / "tokenizer.json")
    print(f"evaluation: the first {windows.shape[0]} x {windows.shape[1]} held-out tokens; {os.cpu_count()} CPU cores"
          + (f"; skipped (the build does not know them): {', '.join(skipped)}" if skipped else ""))

    results: dict[str, Any] = {}
    for model, ckpt in ckpts.items():
        print(f"\n== {model} ({ckpt})", flush=True)
        slug = model.replace(" ", "_")
        base = measure(build(ckpt, WORK / slug / "fp32", "fp32", None, {}, args.reuse), windows, None)
        results[model] = {"fp32": {k: v for k, v in base.items() if k != "argmax"}, "rows": {}}
        for row in rows:
            for c in calibs:
                tag = row.name.replace(" ", "_").replace("=", "-")
                out = build(ckpt, WORK / slug / f"{tag}.{c}", row.precision, calib_paths[c], row.options, args.reuse)
                r = measure(out, windows, base["argmax"])
                r["dppl"] = 100 * (r["ppl"] / base["ppl"] - 1)
                results[model]["rows"].setdefault(row.name, {})[c] = {k: v for k, v in r.items() if k != "argmax"}
                print(f"   {row.name} [{CALIBS[c]}]: ppl {r['ppl']:.3f} ({r['dppl']:+.2f}%), top-1 {r['top1']:.3f}", flush=True)

    failed = report(results, rows, calibs)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 1 if failed else 0


def report(results: dict[str, Any], rows: list[Row], calibs: list[str]) -> bool:
    failed = False
    if "stdlib-5m" in results and "stdlib-5m-outliers" in results:
        a, b = results["stdlib-5m"]["fp32"]["ppl"], results["stdlib-5m-outliers"]["fp32"]["ppl"]
        print(f"\nfp32 perplexity: stdlib-5m {a:.4f}, stdlib-5m-outliers {b:.4f} ({100 * (b / a - 1):+.4f}%: the "
              "outliers' one change to the function, the two spike channels per spike layer)")
    head = "".join(f"{CALIBS[c] + ' ppl':>24}{'vs fp32':>9}{'top-1':>7}" for c in calibs)
    for model, res in results.items():
        print(f"\n{model}: fp32 perplexity {res['fp32']['ppl']:.3f}, weights {res['fp32']['bytes'] / 1e6:.1f} MB")
        print(f"{'precision':<40}{head}{'weights':>10}  target")
        for row in rows:
            cells = res["rows"].get(row.name, {})
            line = "".join(f"{cells[c]['ppl']:>24.3f}{cells[c]['dppl']:>+8.2f}%{cells[c]['top1']:>7.3f}" for c in calibs)
            verdict = ""
            if row.target is not None:
                ok = all(cells[c]["dppl"] <= TARGETS[row.target] for c in calibs)
                failed |= not ok
                verdict = f"{'PASS' if ok else 'FAIL'} (<= +{TARGETS[row.target]}%)"
            print(f"{row.name:<40}{line}{cells[calibs[0]]['bytes'] / 1e6:>8.1f}MB  {verdict}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
