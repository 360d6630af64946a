"""make bench-export: export a random llama3.2-3b-shaped checkpoint in bounded memory.

1. Writes a random-weight checkpoint of the `llama3.2-3b` shape in HF layout (bf16, ~6.4 GB,
   sharded safetensors), one shard at a time.
2. Builds it (`llamaforge build --precision bf16`) under `/usr/bin/time -v`: wall time, peak RSS.
3. Peer, same run: peak RSS of transformers loading the same checkpoint (`from_pretrained`) and
   reading every weight once, the least any exporter built on it must do.

Pass criterion (issue: export in bounded memory): our peak RSS < 40% of the checkpoint's size.

  python bench/export_memory.py [--workdir DIR] [--keep] [--skip-peer]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from llamaforge.export.checkpoint import hf_tensor_shapes
from llamaforge.export.variants import get_variant

ROOT = Path(__file__).resolve().parents[1]

SHARD_BYTES = 1 << 30


def write_checkpoint(dest: Path, variant: str) -> int:
    config = get_variant(variant).config
    dest.mkdir(parents=True, exist_ok=True)
    shapes = hf_tensor_shapes(config)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for i, names in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for n in names:
            t = torch.empty(shapes[n], dtype=torch.bfloat16)
            if len(shapes[n]) == 1:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)
            shard[n] = t
            total += t.numel() * 2
        save_file(shard, str(dest / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        del shard
        print(f"  wrote {fname}", flush=True)
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16", **config.to_hf()}
    (dest / "config.json").write_text(json.dumps(hf, indent=2))
    from llamaforge.export.demo.tiny import stdlib_files
    from llamaforge.export.demo.tokenizer import file_lines, train_tokenizer

    train_tokenizer(file_lines(stdlib_files(5)), 1024).save(str(dest / "tokenizer.json"))
    return total


def time_v(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of a command under /usr/bin/time -v."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024  # type: ignore[union-attr]
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr)
    parts = [float(x) for x in m.group(1).split(":")]  # type: ignore[union-attr]
    wall = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    if proc.returncode:
        print(proc.stdout[-2000:], proc.stderr[-3000:])
    return wall, rss, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", default="llama3.2-3b")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-peer", action="store_true")
    args = ap.parse_args()
    if not Path("/usr/bin/time").exists():
        print("bench-export needs /usr/bin/time (Debian package 'time')")
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-export-"))
    ckpt, out = work / "ckpt", work / "engine"
    try:
        start = time.perf_counter()
        print(f"writing random {args.variant} checkpoint to {ckpt}")
        size = write_checkpoint(ckpt, args.variant)
        print(f"  {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f}s")
        llamaforge = str(Path(sys.executable).with_name("llamaforge"))
        wall, rss, rc = time_v([llamaforge, "build", "--model", args.variant, "--checkpoint", str(ckpt),
                                "--precision", "bf16", "--out", str(out)])
        if rc:
            print(f"build failed with exit code {rc}")
            return 1
        engine_bytes = sum(p.stat().st_size for p in out.iterdir())
        rows = [("llama-forge build (bf16)", wall, rss)]
        if not args.skip_peer:
            # transformers 5 maps safetensors lazily, so loading alone touches little; every exporter
            # reads each weight at least once, which is what this peer does.
            code = ("import torch, transformers; m = transformers.AutoModelForCausalLM.from_pretrained("
                    f"{str(ckpt)!r}, dtype=torch.bfloat16); print(sum(float(p.float().sum()) for p in m.parameters()))")
            pwall, prss, prc = time_v([sys.executable, "-c", code])
            rows.append(("transformers load + read all (peer)" + (" FAILED" if prc else ""), pwall, prss))
        print(f"\ncheckpoint {size / 1e9:.2f} GB  ->  engine {engine_bytes / 1e9:.2f} GB ({out})")
        print(f"{'':<40}{'wall s':>8}{'peak RSS GB':>13}{'RSS/ckpt':>10}")
        for name, w, r in rows:
            print(f"{name:<40}{w:>8.1f}{r / 1e9:>13.2f}{r / size:>10.1%}")
        if len(rows) > 1:
            print(f"peak RSS ratio llama-forge / transformers: {rows[0][2] / rows[1][2]:.2f}x")
        ok = rss < 0.40 * size
        print(f"target: peak RSS < 40% of checkpoint -> {'PASS' if ok else 'FAIL'} ({rss / size:.1%})")
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
