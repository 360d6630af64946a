"""make bench-quant (speed half): single-stream decode of our quantized engines against
onnxruntime-genai and llama.cpp on the same checkpoint, in the same run.

Checkpoint: the 125M random-weight LLaMA-3-shaped checkpoint of `make bench-serve` (bench/serve.py
`make_checkpoint(dest, "bench")`: hidden 768, 12 layers, GQA 12/4, FFN 2048, vocab 32000, untied,
fp32, 0.5 GB), so decode is weight-bound. Random weights: these are speed numbers only; quality is
bench/quant.py's half, on trained weights.

Engines (each cached under bench/.work/; ours are rebuilt when the build's sources change):
  ours        `llamaforge build --precision P` for fp32 and each of int8-wo, int8-sq, int4-awq,
              int4-rtn that the build accepts, run by our runtime's EngineCore (the in-process core of
              `llamaforge serve`: scheduler, KV cache, greedy sampling, streamed outputs)
  genai       onnxruntime-genai 0.18's builder `-p fp32|int8|int4 -e cpu`, run by its og.Generator loop
  llama.cpp   llama-cpp-python built from source, the checkpoint converted by llama.cpp's own
              convert_hf_to_gguf.py (f32) and quantized by llama.cpp to q8_0 / q4_0, run by
              llama_cpp.Llama.eval one token at a time (bench/llamacpp_worker.py, its own venv)
  (bench/quant_peers.py installs and builds the peers.)

Measurement: every engine decodes the same 64 prompt token ids then 128 new tokens, greedy, batch 1,
with the same number of threads (default: every core; llama.cpp n_threads, ORT intra-op threads).
Decode rate = 127 steps / (last token time - first token time): the prompt's evaluation is not in
it. Every engine runs once untimed, then --rounds round-robin rounds (default 7, alternating
direction, a short pause between engines so no engine's spinning threads eat into the next one's
time); the median round is reported, with the spread. Engines of one precision class (fp32, int8,
int4) run next to each other in a round, and every ratio is the median over rounds of that round's
ratio (`paired_ratio`): the machine's drift over a round cancels in each pair.

Roofline: weight bytes a decode step reads (every weight once, one row of an embedding table that
is only gathered; from the ONNX initializers or the GGUF tensors, as stored) x steps/s, over the
copy bandwidth (numpy copy of 1 GiB, a thread per core, read + write bytes, best of 5) measured
before and after the rounds (the better one is used). Bytes on disk: the engine's model files.

Targets: each int8 engine >= 1.6x and each int4 engine >= 2.2x our fp32, and each >= 1.0x
onnxruntime-genai at the same precision; llama.cpp ratios are printed against a goal of 1.0x. An
engine that misses one is profiled (ONNX Runtime's enable_profiling over 32 decode steps, kernel
time per op type), next to onnxruntime-genai at the same precision.

  python bench/quant_speed.py [--rounds 7] [--threads N] [--precisions fp32,int8-wo,...]
                              [--skip-llamacpp] [--skip-genai] [--no-profile] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# Sibling bench modules: the script's folder is on sys.path (and pytest's pythonpath has bench/).
from engine_cache import STAMP, is_current, sources_fingerprint
from quant_roofline import (
    OpTime,
    Sample,
    first_divergence,
    gguf_step_bytes,
    median_tok_s,
    onnx_file_step_bytes,
    paired_ratio,
    profile_by_op,
    roofline_fraction,
    round_orders,
    verdict,
)

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work"
PROMPT_TOKENS, NEW_TOKENS = 64, 128
OUR_PRECISIONS = ("fp32", "int8-wo", "int8-sq", "int4-awq", "int4-rtn", "int8-wo+fp32-head", "int4-awq+fp32-head",
                  "int8-sq+integer")
# int8-wo, int8-sq and int4-* quantize the (untied) LM head by default on the fast kernels, as
# onnxruntime-genai's builder does (llama.cpp: q8_0 in q8_0, q4_0 in Q6_K); "+fp32-head" keeps it in
# fp32, to show what that costs; "+integer" is int8-sq's per-token MatMulIntegerToFloat form.
EXTRA_BUILD_ARGS = {"+fp32-head": ["--no-quantize-lm-head"], "+integer": ["--ort-kernels", "integer"]}
CLASS = {"fp32": "fp32", "int8-wo": "int8", "int8-sq": "int8", "int4-awq": "int4", "int4-rtn": "int4"}


def is_option(name: str) -> bool:
    """An engine built with extra arguments (`ours int8-wo+fp32-head`): not a default."""
    return "+" in name


def split_label(label: str) -> tuple[str, list[str]]:
    """An engine label's build precision and extra `llamaforge build` arguments."""
    precision, plus, variant = label.partition("+")
    return precision, EXTRA_BUILD_ARGS[plus + variant] if plus else []
GENAI_OF = {"fp32": "fp32", "int8": "int8", "int4": "int4"}
LLAMA_OF = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
SPEEDUP_FLOOR = {"int8": 1.6, "int4": 2.2}  # over our fp32
PAUSE_S = 0.3  # between engines: lets ORT's / OpenMP's spinning worker threads go idle
PROFILE_STEPS = 32


class Runner(Protocol):
    name: str
    family: str
    precision: str  # fp32 | int8 | int4
    step_bytes: int
    disk_bytes: int

    def decode(self, prompt: list[int], n: int) -> tuple[Sample, list[int]]: ...

    def close(self) -> None: ...


# -- our engines -----------------------------------------------------------------------------------

def build_ours(ckpt: Path, label: str, out: Path, reuse: bool = False) -> str | None:
    """`llamaforge build` of the engine `label` names (cached by a fingerprint of the build's sources;
    `reuse`: any engine already built); None, or why it failed."""
    precision, extra = split_label(label)
    stamp = out / STAMP
    fingerprint = sources_fingerprint(f"{ckpt.resolve()}|{precision}|{' '.join(extra)}")
    current = is_current(out, fingerprint)
    if current or (reuse and (out / "manifest.json").is_file() and stamp.is_file()):
        if not current:
            print(f"NOTE ours {label}: reusing an engine built from other sources than the tree's (--reuse-engines)")
        return None
    print(f"building ours {label}: llamaforge build --precision {precision} {' '.join(extra)}...", flush=True)
    cmd = [sys.executable, "-m", "llamaforge.cli", "build", "--checkpoint", str(ckpt), "--precision", precision,
           *extra, "--out", str(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_name(out.name + ".build.log")
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "LLAMAFORGE_QUIET": "1"})
    if proc.returncode or not (out / "manifest.json").is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return f"build failed (exit {proc.returncode}, {log}): {' | '.join(tail)}"
    stamp.write_text(fingerprint)
    return None


def onnx_disk_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.name.startswith("model.onnx"))


@dataclass
class Ours:
    engine: Path
    threads: int
    label: str
    family: str = "ours"
    name: str = ""
    precision: str = ""
    step_bytes: int = 0
    disk_bytes: int = 0
    core: Any = None

    def __post_init__(self) -> None:
        from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
        from llamaforge.runtime.core.engine import read_manifest
        from llamaforge.runtime.core.engine_core import EngineCore

        self.name, self.precision = f"ours {self.label}", CLASS[split_label(self.label)[0]]
        manifest = read_manifest(self.engine)
        self.step_bytes, _ = onnx_file_step_bytes(self.engine / manifest.model_file)
        self.disk_bytes = onnx_disk_bytes(self.engine)
        self.core = EngineCore(self.engine, CoreConfig(KVCacheConfig(budget_tokens=512), SchedulerConfig(max_num_seqs=1),
                                                       threads=self.threads))
        self.core.start()
        self.count = 0

    def decode(self, prompt: list[int], n: int) -> tuple[Sample, list[int]]:
        from serve import core_greedy

        self.count += 1
        times, tokens = core_greedy(self.core, f"bench-{self.count}", prompt, n)
        return Sample(times[-1] - times[0], len(times) - 1), tokens

    def close(self) -> None:
        self.core.stop()


# -- onnxruntime-genai -----------------------------------------------------------------------------

@dataclass
class Genai:
    model_dir: Path
    threads: int
    precision: str
    family: str = "onnxruntime-genai"
    name: str = ""
    step_bytes: int = 0
    disk_bytes: int = 0
    model: Any = None

    def __post_init__(self) -> None:
        import onnxruntime_genai as og
        from quant_peers import genai_threads_overlay

        self.name = f"onnxruntime-genai {self.precision}"
        self.step_bytes, _ = onnx_file_step_bytes(self.model_dir / "model.onnx")
        self.disk_bytes = onnx_disk_bytes(self.model_dir)
        config = og.Config(str(self.model_dir))
        config.overlay(genai_threads_overlay(self.threads))
        self.model = og.Model(config)

    def decode(self, prompt: list[int], n: int) -> tuple[Sample, list[int]]:
        from serve import genai_greedy

        times, tokens = genai_greedy(self.model, prompt, n)
        return Sample(times[-1] - times[0], len(times) - 1), tokens

    def close(self) -> None:
        self.model = None


# -- llama.cpp (a worker process in its own venv) --------------------------------------------------

class LlamaWorker:
    def __init__(self, python: Path) -> None:
        worker = Path(__file__).with_name("llamacpp_worker.py")
        self.proc = subprocess.Popen([str(python), str(worker), "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def call(self, **msg: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp worker exited (code {self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"llama.cpp worker: {reply.get('error')}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)


def gguf_tensors(python: Path, path: Path) -> list[tuple[str, list[int], int]]:
    worker = Path(__file__).with_name("llamacpp_worker.py")
    out = subprocess.run([str(python), str(worker), "tensors", str(path)], capture_output=True, text=True, check=True)
    return [(n, ne, b) for n, ne, b in json.loads(out.stdout)]


@dataclass
class Llama:
    worker: LlamaWorker
    python: Path
    path: Path
    kind: str  # f32 | q8_0 | q4_0
    threads: int
    n_ctx: int
    family: str = "llama.cpp"
    name: str = ""
    precision: str = ""
    step_bytes: int = 0
    disk_bytes: int = 0

    def __post_init__(self) -> None:
        self.name = f"llama.cpp {self.kind}"
        self.precision = {v: k for k, v in LLAMA_OF.items()}[self.kind]
        self.step_bytes, _ = gguf_step_bytes(gguf_tensors(self.python, self.path))
        self.disk_bytes = self.path.stat().st_size
        self.worker.call(op="load", name=self.kind, path=str(self.path), threads=self.threads, n_ctx=self.n_ctx)

    def decode(self, prompt: list[int], n: int) -> tuple[Sample, list[int]]:
        r = self.worker.call(op="decode", name=self.kind, prompt=list(prompt), new_tokens=n)
        return Sample(r["decode_s"], n - 1), list(r["tokens"])

    def close(self) -> None:
        pass


# -- profiles --------------------------------------------------------------------------------------

def profile_ours(engine: Path, prompt: list[int], threads: int) -> list[OpTime]:
    """Kernel time per op type over PROFILE_STEPS decode steps, our engine's session settings."""
    import onnxruntime as ort

    from llamaforge.runtime.core.engine import Engine

    eng = Engine(engine, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        for k, v in eng.session_config.items():
            options.add_session_config_entry(k, v)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ours")
        eng.session = ort.InferenceSession(str(engine / eng.manifest.model_file), options, providers=["CPUExecutionProvider"])
        logits, past = eng.step(np.array([prompt]), np.zeros(1, np.int32), eng.kv.empty(1, len(prompt) + PROFILE_STEPS + 1))
        caches = [np.ascontiguousarray(c) for c in past]
        token = int(logits[0, -1].argmax())
        for i in range(PROFILE_STEPS):  # the decode call EngineCore makes (model_runner.py)
            ids, lengths = np.array([[token]]), np.array([len(prompt) + i], np.int32)
            if eng.decode_in_place:
                logits = eng.decode_in_place_step(ids, lengths, caches)
            else:
                logits, caches = eng.step(ids, lengths, caches)
            token = int(logits[0, -1].argmax())
        events = json.loads(Path(eng.session.end_profiling()).read_text())
    return profile_by_op(events)[0]


def profile_genai(model_dir: Path, prompt: list[int], threads: int) -> list[OpTime]:
    import onnxruntime_genai as og

    with tempfile.TemporaryDirectory() as tmp:
        prefix = str(Path(tmp) / "genai")
        config = og.Config(str(model_dir))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "enable_profiling": prefix}}}}))
        model = og.Model(config)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + PROFILE_STEPS + 1,
                                  min_length=len(prompt) + PROFILE_STEPS + 1)
        gen = og.Generator(model, params)
        gen.append_tokens(np.array([prompt], np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        del gen, params, model  # the session writes its profile when it is destroyed
        files = sorted(Path(tmp).glob("genai*.json"))
        if not files:
            return []
        events = json.loads(files[-1].read_text())
    return profile_by_op(events)[0]


def print_profile(title: str, ops: list[OpTime], top: int = 8) -> None:
    total = sum(o.ms_per_step for o in ops)
    print(f"  {title}: {total:.2f} ms of kernels per decode step")
    for o in ops[:top]:
        print(f"    {o.op:<34}{o.ms_per_step:>8.2f} ms {o.share:>6.1%}  {o.calls_per_step:>5.0f} calls/step")


# -- main ------------------------------------------------------------------------------------------

@dataclass
class Result:
    runner: Any
    samples: list[Sample] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return median_tok_s(self.samples)


def bench_prompt(ckpt: Path, n: int) -> list[int]:
    """`n` token ids of Python source by the checkpoint's tokenizer: the same ids for every engine."""
    from tokenizers import Tokenizer

    text = Path(json.__file__).read_text()
    ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(text).ids
    return [int(i) for i in ids[:n]]


def our_precisions(wanted: list[str] | None) -> list[str]:
    from llamaforge.graphs.quantization.recipes import QUANT_PRECISIONS

    accepted = ["fp32", *[p for p in OUR_PRECISIONS[1:] if split_label(p)[0] in QUANT_PRECISIONS]]
    if wanted is None:
        return accepted
    unknown = [p for p in wanted if p not in accepted]
    if unknown:
        raise SystemExit(f"--precisions: {unknown} not in what `llamaforge build` accepts here: {accepted}")
    return ["fp32", *[p for p in wanted if p != "fp32"]]


def main() -> int:  # noqa: C901 - one linear script: prepare, time, report
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=WORK)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--precisions", type=lambda s: s.split(","), default=None,
                    help=f"ours, comma-separated (default: each of {','.join(OUR_PRECISIONS)} the build accepts)")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--skip-genai", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--reuse-engines", action="store_true",
                    help="time our engines already built even if the build's sources changed since")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if args.rounds < 3:
        raise SystemExit(f"--rounds must be >= 3 for a median of alternated rounds, got {args.rounds}")
    os.environ.setdefault("LLAMAFORGE_QUIET", "1")
    import quant_peers
    from serve import copy_bandwidth, make_checkpoint

    precisions = our_precisions(args.precisions)
    ckpt = args.workdir / "ckpt-bench"
    if not (ckpt / "config.json").is_file():
        make_checkpoint(ckpt, "bench")
    prompt = bench_prompt(ckpt, PROMPT_TOKENS)
    peers_work = args.workdir / "quant-peers"
    notes: list[str] = []

    # Peers first: the llama.cpp build is the long step, and it fails early if it fails.
    llama_python = None
    ggufs: dict[str, Path] = {}
    if not args.skip_llamacpp:
        try:
            llama_python = quant_peers.ensure_llamacpp(peers_work)
            ggufs = quant_peers.ensure_ggufs(llama_python, ckpt, peers_work)
        except quant_peers.PeerError as e:
            notes.append(f"llama.cpp: not measured: {e}")
    genai: dict[str, Path] = {}
    if not args.skip_genai:
        try:
            genai = quant_peers.ensure_genai(ckpt, work=peers_work)
        except quant_peers.PeerError as e:
            notes.append(f"onnxruntime-genai: not measured: {e}")
    engines: dict[str, Path] = {}
    for p in precisions:
        out = args.workdir / "quant-speed" / p
        why = build_ours(ckpt, p, out, args.reuse_engines)
        if why:
            notes.append(f"ours {p}: not measured: {why}")
        else:
            engines[p] = out

    runners: list[Any] = []
    worker = LlamaWorker(llama_python) if llama_python is not None and ggufs else None
    try:
        for p, d in engines.items():
            runners.append(Ours(d, args.threads, p))
        for p, d in genai.items():
            runners.append(Genai(d, args.threads, p))
        if worker is not None:
            assert llama_python is not None
            for kind, path in ggufs.items():
                runners.append(Llama(worker, llama_python, path, kind, args.threads, PROMPT_TOKENS + NEW_TOKENS + 64))
        if "fp32" not in engines:
            raise SystemExit("ours fp32 did not build: nothing to compare against\n" + "\n".join(notes))
        # Engines of one precision class run next to each other in a round, so the ratios the
        # targets read are of runs seconds apart (paired by round: `paired_ratio`).
        classes = ("fp32", "int8", "int4")
        runners.sort(key=lambda r: classes.index(r.precision) if r.precision in classes else len(classes))
        results = {r.name: Result(r) for r in runners}
        bw = [copy_bandwidth()]
        from tqdm import tqdm

        with tqdm(total=(args.rounds + 1) * len(runners), desc="decode", unit="run") as bar:
            for r in runners:  # warm-up: first runs allocate
                bar.set_postfix_str(f"warm-up {r.name}")
                results[r.name].tokens = r.decode(prompt, NEW_TOKENS)[1]
                bar.update()
                time.sleep(PAUSE_S)
            for i, order in enumerate(round_orders([r.name for r in runners], args.rounds)):
                for name in order:
                    bar.set_postfix_str(f"round {i + 1} {name}")
                    sample, _ = results[name].runner.decode(prompt, NEW_TOKENS)
                    results[name].samples.append(sample)
                    bar.update()
                    time.sleep(PAUSE_S)
        bw.append(copy_bandwidth())
        profiles, failed = report(results, max(bw), bw, args, notes, prompt, engines, genai)
        if args.json:
            args.json.write_text(json.dumps({
                "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "threads": args.threads,
                "rounds": args.rounds, "copy_bw": bw, "notes": notes,
                "engines": {n: {"tok_s": r.tok_s, "rounds": [s.tok_s for s in r.samples], "step_bytes": r.runner.step_bytes,
                                "disk_bytes": r.runner.disk_bytes, "family": r.runner.family,
                                "precision": r.runner.precision} for n, r in results.items()},
                "profiles": profiles}, indent=1))
        return 1 if failed else 0
    finally:
        for r in runners:
            r.close()
        if worker is not None:
            worker.close()



def report(results: dict[str, Result], bw: float, bws: list[float], args: argparse.Namespace, notes: list[str],
           prompt: list[int], engines: dict[str, Path], genai: dict[str, Path]) -> tuple[dict[str, Any], bool]:
    """Prints the table, the targets and the profiles of engines that miss one; returns the
    profiles and whether a target failed."""
    base_r = results["ours fp32"]
    by = {(r.runner.family, r.runner.precision): r for r in results.values()}

    def ratio(r: Result, other: Result) -> float:
        return paired_ratio(r.samples, other.samples)
    print(f"\nsingle-stream decode, batch 1, greedy: {len(prompt)}-token prompt, {NEW_TOKENS} new tokens "
          f"({NEW_TOKENS - 1} decode steps timed, prompt evaluation excluded); {args.threads} threads each; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; median of {args.rounds} alternated rounds "
          "(ratios: the median of each round's ratio)")
    print(f"copy bandwidth (numpy, 1 GiB, read + write): {bws[0] / 1e9:.1f} GB/s before the rounds, "
          f"{bws[1] / 1e9:.1f} GB/s after; roofline uses {bw / 1e9:.1f} GB/s")
    head = f"{'engine':<28}{'tok/s':>8}{'min-max':>14}{'ms/step':>9}{'vs our fp32':>12}{'vs genai':>10}{'vs llama.cpp':>13}" \
           f"{'MB/step':>9}{'roofline':>10}{'MB on disk':>12}"
    print(head)
    for name, r in results.items():
        rates = [s.tok_s for s in r.samples]
        cls = r.runner.precision
        genai_r, llama_r = by.get(("onnxruntime-genai", cls)), by.get(("llama.cpp", cls))
        vs_g = f"{ratio(r, genai_r):.2f}x" if genai_r and r.runner.family != "onnxruntime-genai" else ""
        vs_l = f"{ratio(r, llama_r):.2f}x" if llama_r and r.runner.family != "llama.cpp" else ""
        print(f"{name:<28}{r.tok_s:>8.1f}{f'{min(rates):.1f}-{max(rates):.1f}':>14}{1e3 / r.tok_s:>9.1f}"
              f"{ratio(r, base_r):>11.2f}x{vs_g:>10}{vs_l:>13}{r.runner.step_bytes / 1e6:>9.1f}"
              f"{roofline_fraction(r.runner.step_bytes, r.tok_s, bw):>10.1%}{r.runner.disk_bytes / 1e6:>12.1f}")
    print("(MB/step: weight bytes a decode step reads as stored, one row of a gathered embedding table; the bench "
          "checkpoint has untied embeddings, so every engine holds the table and the LM head once each)")

    print("\ngreedy tokens shared with ours at the same precision (random weights: near-ties can split early):")
    for (family, cls), r in sorted(by.items()):
        ours = [o for o in results.values() if o.runner.family == "ours" and o.runner.precision == cls]
        if family != "ours" and ours:
            print(f"  {r.runner.name:<28}" + ", ".join(
                f"{o.runner.name}: {first_divergence(o.tokens, r.tokens)}/{NEW_TOKENS}" for o in ours))

    # The targets hold the defaults to account; the "+" engines are options, shown for what they cost.
    print("\ntargets (default engines; the options' ratios follow, not held to them):")
    failed = False
    missed: list[Result] = []
    ours_quantized = [r for r in results.values() if r.runner.family == "ours" and r.runner.precision != "fp32"]
    for r in sorted(ours_quantized, key=lambda r: is_option(r.runner.name)):
        cls = r.runner.precision
        g = by.get(("onnxruntime-genai", cls))
        checks = [(f"{SPEEDUP_FLOOR[cls]}x our fp32", ratio(r, base_r), SPEEDUP_FLOOR[cls]),
                  (f"1.0x onnxruntime-genai {cls}", ratio(r, g) if g else None, 1.0)]
        for what, got, floor in checks:
            if is_option(r.runner.name):
                shown = f"{got:.2f}x ({'at or above' if got >= floor else 'below'})" if got is not None else "not measured"
                print(f"  option {r.runner.name} vs {what}: {shown}")
                continue
            print(f"  {r.runner.name} >= {what}: "
                  + (f"{got:.2f}x -> {verdict(got, floor)}" if got is not None else "NOT MEASURED -> FAIL"))
            if got is None or got < floor:
                failed = True
                if r not in missed:
                    missed.append(r)
    print("goal (printed, not a target): ours >= 1.0x llama.cpp at the same precision")
    for r in results.values():
        llama_r = by.get(("llama.cpp", r.runner.precision))
        if r.runner.family == "ours" and llama_r:
            vs = ratio(r, llama_r)
            print(f"  {r.runner.name} / {llama_r.runner.name}: {vs:.2f}x -> {'met' if vs >= 1.0 else 'not met'}")
            if vs < 1.0 and r not in missed and not is_option(r.runner.name):
                missed.append(r)
    for n in notes:
        print(f"NOTE {n}")

    profiles: dict[str, Any] = {}
    if missed and not args.no_profile:
        print(f"\nwhere the time goes (ONNX Runtime profile, {PROFILE_STEPS} decode steps after the prompt, kernel time by op; "
              f"load average {os.getloadavg()[0]:.2f}: profiling and load stretch every kernel, so compare shares, and "
              "engines profiled back to back):")
        seen_genai: set[str] = set()
        for r in missed:
            label = r.runner.name.removeprefix("ours ")
            ops = profile_ours(engines[label], prompt, args.threads)
            print_profile(f"{r.runner.name} ({1e3 / r.tok_s:.1f} ms/step measured)", ops)
            profiles[r.runner.name] = [o.__dict__ for o in ops]
            cls = r.runner.precision
            if cls in genai and cls not in seen_genai:
                seen_genai.add(cls)
                g = by.get(("onnxruntime-genai", cls))
                gops = profile_genai(genai[cls], prompt, args.threads)
                print_profile(f"onnxruntime-genai {cls}" + (f" ({1e3 / g.tok_s:.1f} ms/step measured)" if g else ""), gops)
                profiles[f"onnxruntime-genai {cls}"] = [o.__dict__ for o in gops]
    return profiles, failed


if __name__ == "__main__":
    sys.exit(main())
