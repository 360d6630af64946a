"""The peers of `make bench-quant`'s speed half, installed and built under bench/.work/quant-peers/ only.

- llama.cpp: `llama-cpp-python` (LLAMA_CPP_PYTHON) built once from its PyPI source distribution into
  its own virtualenv (llamacpp-venv/), a native CPU build (CMAKE_ARGS below), its build log in
  llamacpp-build.log and a progress bar over ninja's [k/N] lines. The same venv runs llama.cpp's own
  `convert_hf_to_gguf.py`, which ships inside the sdist (vendor/llama.cpp), with the converter's
  dependencies pinned (CONVERTER_PINS) and torch pinned to the local CPU build first, so nothing
  there can resolve torch to a CUDA build. q8_0 / q4_0 come from the f32 GGUF through the library's
  own `llama_model_quantize` (bench/llamacpp_worker.py): it needs no llama-quantize binary (the
  Python package does not install one) and no network.
- onnxruntime-genai (the `bench` extra of pyproject.toml, pinned there, as `make bench-serve` uses it):
  its model builder makes the fp32 / int8 / int4 CPU models of the same checkpoint.

The converter and the tokenizer: the bench checkpoint's tokenizer is a byte-level BPE trained here,
and llama.cpp's converter takes a BPE tokenizer only when it recognises its pre-tokenizer by the
hash of a test string's token ids (`get_vocab_base_pre`); ours is in no list, so it refuses
("BPE pre-tokenizer was not recognized"). The converter's SentencePiece path takes any
tokenizer.model and pads the vocabulary to config.json's vocab_size with unused [PADi] entries, so
the GGUF is converted from a sibling folder (gguf-src/) holding links to the checkpoint's
config.json and weights plus a small SentencePiece model trained here. The speed bench feeds token
ids, never text, so the peer decodes the same ids through the same 32000-row output layer.

Nothing here is a runtime dependency of llama-forge; every version is pinned.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "quant-peers"

LLAMA_CPP_PYTHON = "0.3.36"  # vendors llama.cpp with the convert_hf_to_gguf.py used below
TORCH = "2.13.0"  # the local CPU wheel (pip takes it from this machine's disk); installed first
# convert_hf_to_gguf.py's requirements (vendor/llama.cpp/requirements/requirements-convert_*.txt)
# name torch 2.11 from PyTorch's own index, which this machine cannot reach: the CPU torch above
# serves; the rest as they pin them.
CONVERTER_PINS = ("numpy==2.2.6", "sentencepiece==0.2.2", "transformers==4.57.6", "protobuf==4.25.8")
# A native CPU build of the library only: no CUDA even where nvcc exists, none of llama.cpp's tools,
# tests, examples or the multimodal library (the bench needs libllama and libggml).
CMAKE_ARGS = ("-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF")
GGUF_TYPES = ("f32", "q8_0", "q4_0")  # f32 from the converter, the others quantized from it
GENAI_PRECISIONS = ("fp32", "int8", "int4")
SPM_VOCAB = 1024  # the converter pads the rest of config.json's vocab_size with unused entries
NINJA_STEP = re.compile(r"\[(\d+)/(\d+)\]")


class PeerError(RuntimeError):
    """A peer could not be installed or built; the message names the step and its log."""


# -- pure helpers (tests/bench/test_quant_speed.py) ------------------------------------------------

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ninja_progress(line: str) -> tuple[int, int] | None:
    """(done, total) from a ninja status line ("[17/140] /usr/bin/g++ ..."), else None."""
    m = NINJA_STEP.search(line)
    return (int(m.group(1)), int(m.group(2))) if m and line.lstrip().startswith("[") else None


def build_env(base: dict[str, str], cores: int) -> dict[str, str]:
    """The environment of the llama-cpp-python build: scikit-build-core passes CMAKE_ARGS to CMake."""
    env = dict(base)
    env["CMAKE_ARGS"] = " ".join(CMAKE_ARGS)
    env["CMAKE_BUILD_PARALLEL_LEVEL"] = str(max(1, cores))
    return env


def llamacpp_install_steps(venv: Path, sdist: Path) -> list[tuple[str, dict[str, str], list[str]]]:
    """(name, {distribution: version it must have, "" for any}, pip command) in order: torch first
    (so no later requirement can pull a CUDA build), the converter's pins, gguf-py from the same
    sdist (the converter imports that copy), then llama-cpp-python built from the sdist. A step
    whose distributions are already installed at those versions is skipped."""
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check"]
    gguf_py = sdist_dir(sdist) / "vendor" / "llama.cpp" / "gguf-py"
    pins = dict(p.split("==") for p in CONVERTER_PINS)
    return [("torch (CPU)", {"torch": f"{TORCH}+cpu"}, pip + ["-q", f"torch=={TORCH}"]),
            ("converter dependencies", pins, pip + ["-q", *CONVERTER_PINS]),
            ("gguf-py", {"gguf": ""}, pip + ["-q", str(gguf_py)]),
            ("llama-cpp-python build", {"llama_cpp_python": LLAMA_CPP_PYTHON},
             pip + ["-v", "--no-binary", "llama-cpp-python", str(sdist)])]


def missing(installed: dict[str, str], wanted: dict[str, str]) -> list[str]:
    """The wanted distributions not installed at their version ("" = any version)."""
    return [name for name, version in wanted.items()
            if name not in installed or (version and installed[name] != version)]


def installed_versions(python: Path) -> dict[str, str]:
    """Distribution name (normalized: lower case, '_' for '-') -> version, in that interpreter."""
    code = ("import importlib.metadata as m, json; print(json.dumps({d.metadata['Name'].lower().replace('-', '_'): "
            "d.version for d in m.distributions()}))")
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


def sdist_dir(sdist: Path) -> Path:
    """Where the sdist is unpacked (beside it), for its vendored converter and gguf-py."""
    return sdist.parent / sdist.name.removesuffix(".tar.gz")


def converter_command(python: Path, sdist: Path, src: Path, out: Path) -> list[str]:
    return [str(python), str(sdist_dir(sdist) / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"), str(src),
            "--outfile", str(out), "--outtype", "f32"]


def genai_builder_command(python: Path, ckpt: Path, out: Path, precision: str, cache: Path) -> list[str]:
    if precision not in GENAI_PRECISIONS:
        raise ValueError(f"onnxruntime-genai precision: {precision!r} is not one of {GENAI_PRECISIONS}")
    return [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out),
            "-p", precision, "-e", "cpu", "-c", str(cache)]


# -- running steps with a log and progress ---------------------------------------------------------

def run_logged(cmd: Sequence[str], log: Path, what: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> None:
    """Run `cmd`, its output appended to `log`; a bar over ninja's [k/N] steps when it prints
    them, else a line every 30 s, so a long step shows it is alive. Raises PeerError with the
    log's tail on failure."""
    from tqdm import tqdm

    log.parent.mkdir(parents=True, exist_ok=True)
    start = last = time.monotonic()
    elapsed = "{desc}: {elapsed}{postfix}"  # until ninja's [k/N] lines give the bar a total
    with log.open("a") as out, tqdm(desc=what, unit="step", total=None, leave=True, bar_format=elapsed) as bar:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=cwd, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            step = ninja_progress(line)
            if step is not None:
                bar.bar_format = None
                bar.total = step[1]
                bar.n = step[0]
                bar.refresh()
            elif time.monotonic() - last > 30:
                last = time.monotonic()
                bar.set_postfix_str(f"{last - start:.0f}s, see {log.name}")
        rc = proc.wait()
    if rc:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise PeerError(f"{what} failed (exit {rc}); last lines of {log}:\n" + "\n".join(tail))


# -- llama.cpp -------------------------------------------------------------------------------------

def ensure_llamacpp(work: Path = WORK) -> Path:
    """The llama.cpp venv's python, installing and building it first if needed (once)."""
    venv = work / "llamacpp-venv"
    done = venv / f".installed-llama-cpp-python-{LLAMA_CPP_PYTHON}"
    if done.is_file():
        return venv_python(venv)
    sdist = fetch_sdist(work)
    if not venv_python(venv).exists():
        # The base interpreter, not this venv's: a venv made from a venv's python is still fine, but
        # the base is what the bench's other venvs use too.
        base = Path(getattr(sys, "_base_executable", sys.executable))
        run_logged([str(base), "-m", "venv", str(venv)], work / "llamacpp-build.log", "llama.cpp: venv")
    env = build_env(dict(os.environ), os.cpu_count() or 1)
    for name, wanted, cmd in llamacpp_install_steps(venv, sdist):
        if missing(installed_versions(venv_python(venv)), wanted):
            if name == "llama-cpp-python build":
                print(f"llama.cpp: building llama-cpp-python {LLAMA_CPP_PYTHON} from source ({' '.join(CMAKE_ARGS)}): "
                      f"about 5 min on 2 idle cores, far longer on busy ones; log {work / 'llamacpp-build.log'}", flush=True)
            run_logged(cmd, work / "llamacpp-build.log", f"llama.cpp: {name}", env=env)
    check = subprocess.run([str(venv_python(venv)), "-c", "import llama_cpp, torch; print(llama_cpp.__version__, torch.__version__)"],
                           capture_output=True, text=True)
    versions = check.stdout.split()
    if check.returncode or versions[:1] != [LLAMA_CPP_PYTHON] or "+cpu" not in "".join(versions[1:]):
        raise PeerError(f"llama.cpp venv check failed: {check.stdout.strip()} {check.stderr.strip()[-400:]} "
                        f"(want llama_cpp {LLAMA_CPP_PYTHON} and a +cpu torch)")
    done.write_text(check.stdout)
    return venv_python(venv)


def fetch_sdist(work: Path) -> Path:
    """llama-cpp-python's source distribution from PyPI (pip download), unpacked beside it."""
    src = work / "src"
    sdist = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        run_logged([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
                    "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(src)],
                   work / "llamacpp-build.log", "llama.cpp: download sdist")
    if not (sdist_dir(sdist) / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        import tarfile

        with tarfile.open(sdist) as tar:
            tar.extractall(src, filter="data")
    return sdist


def train_spm_tokenizer(dest: Path, vocab: int = SPM_VOCAB) -> None:
    """A small SentencePiece BPE model on stdlib source lines: a tokenizer the converter accepts
    (see the module docstring). Deterministic: one thread, no sampling of the input."""
    import io

    import sentencepiece as spm

    from llamaforge.export.demo.tiny import stdlib_files
    from llamaforge.export.demo.tokenizer import file_lines

    lines = [s for s in file_lines(stdlib_files()) if s.strip()][:200_000]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab,
                                   model_type="bpe", byte_fallback=True, num_threads=1,
                                   input_sentence_size=0, minloglevel=2)
    dest.write_bytes(model.getvalue())


def gguf_source(ckpt: Path, work: Path) -> Path:
    """gguf-src/: links to the checkpoint's config.json and weights, plus tokenizer.model."""
    src = work / "gguf-src"
    src.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json"):
            link = src / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    if not (src / "tokenizer.model").is_file():
        train_spm_tokenizer(src / "tokenizer.model")
    return src


def ensure_ggufs(python: Path, ckpt: Path, work: Path = WORK) -> dict[str, Path]:
    """f32 / q8_0 / q4_0 GGUFs of `ckpt` (cached: delete gguf/ after changing the checkpoint)."""
    out = work / "gguf"
    out.mkdir(parents=True, exist_ok=True)
    files = {t: out / f"{t}.gguf" for t in GGUF_TYPES}
    log = work / "gguf.log"
    sdist = work / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not files["f32"].is_file():
        tmp = files["f32"].with_suffix(".tmp")
        run_logged(converter_command(python, sdist, gguf_source(ckpt, work), tmp), log,
                   "llama.cpp: convert_hf_to_gguf (f32)", env={**os.environ, "HF_HUB_OFFLINE": "1"})
        tmp.rename(files["f32"])
    worker = Path(__file__).with_name("llamacpp_worker.py")
    for t in GGUF_TYPES[1:]:
        if not files[t].is_file():
            tmp = files[t].with_suffix(".tmp")
            run_logged([str(python), str(worker), "quantize", str(files["f32"]), str(tmp), t], log,
                       f"llama.cpp: quantize {t}")
            tmp.rename(files[t])
    return files


# -- onnxruntime-genai -----------------------------------------------------------------------------

def ensure_genai(ckpt: Path, precisions: Iterable[str] = GENAI_PRECISIONS, work: Path = WORK) -> dict[str, Path]:
    """onnxruntime-genai's CPU models of `ckpt` by its own builder (cached under genai/)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        raise PeerError(f"onnxruntime-genai is not installed ({e}); `make bench-quant` installs the `bench` "
                        "extra (pip install -e '.[bench]')") from e
    models = {}
    for p in precisions:
        out = work / "genai" / p
        if not (out / "genai_config.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            run_logged(genai_builder_command(Path(sys.executable), ckpt, out, p, work / "genai" / "cache"),
                       work / "genai" / f"{p}.log", f"onnxruntime-genai builder -p {p}",
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
        models[p] = out
    return models


def genai_threads_overlay(threads: int) -> str:
    """genai_config.json overlay: the decoder session's intra-op threads (the other engines get the
    same count), as JSON for og.Config.overlay."""
    return json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}})
