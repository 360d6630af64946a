"""Train `stdlib-5m`: a small Llama-3-architecture model, so quantization error can be measured honestly.

Random weights cannot show what quantization costs, and no weights can be downloaded, so the repo
carries one small trained model. Its text is this Python's standard library sources, which exist on
every machine; files are split into train / held-out by a hash of their relative path, so the split
is the same wherever the same Python version is installed. The tokenizer is a byte-level BPE trained
with `tokenizers` on the train split.

Architecture: GQA (8 query heads, 2 KV heads), RoPE with llama3 scaling, SwiGLU, RMSNorm, tied
embeddings; 6 layers, hidden 256 — about 4.7M parameters, 19 MB in fp32 safetensors.

transformers' `LlamaForCausalLM` is the trainer here only because it has a backward pass; the
checkpoint it saves is plain HF layout and is exported by our own tracer like any other.

Reproduce (about 15-20 minutes on 2 CPU cores):  make demo-model
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from llamaforge.export.config import ModelConfig, RopeScaling
from llamaforge.export.demo.tokenizer import BOS, EOS, file_texts, train_tokenizer

NAME = "stdlib-5m"
DEFAULT_DIR = Path("checkpoints") / NAME
HELDOUT_EVERY = 20  # 1 file in 20 (by path hash) is held out
EVAL_WINDOWS = 48  # held-out windows of SEQ_LEN tokens used for the recorded perplexity
SEQ_LEN = 256
SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


def model_config() -> ModelConfig:
    return ModelConfig(
        name=NAME, family="llama3.2", hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=2,
        head_dim=32, intermediate_size=576, vocab_size=4096, norm_eps=1e-5, rope_theta=500000.0,
        # llama3 scaling over the training context: frequencies with wavelength > SEQ_LEN are stretched.
        rope_scaling=RopeScaling(4.0, 1.0, 4.0, SEQ_LEN), max_position_embeddings=4 * SEQ_LEN,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=(1,), pad_token_id=None,
    )


def corpus_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not SKIPPED_DIRS.intersection(p.relative_to(root).parts[:-1]))
    return root, files


def split_files() -> tuple[list[Path], list[Path]]:
    """(train, held_out): a file is held out when crc32(relative path) % HELDOUT_EVERY == 0."""
    root, files = corpus_files()
    held = [p for p in files if zlib.crc32(str(p.relative_to(root)).encode()) % HELDOUT_EVERY == 0]
    held_set = set(held)
    return [p for p in files if p not in held_set], held


def token_stream(tok: Tokenizer, files: list[Path]) -> np.ndarray:
    """Every file as BOS + tokens + EOS, concatenated (the post-processor adds the BOS)."""
    eos = tok.token_to_id(EOS)
    encs = tok.encode_batch(list(file_texts(files)))
    return np.concatenate([np.asarray(e.ids + [eos], dtype=np.int64) for e in encs])


def heldout_windows(tokenizer_json: str | os.PathLike[str], windows: int = EVAL_WINDOWS,
                    seq_len: int = SEQ_LEN) -> np.ndarray:
    """The evaluation set: the first `windows` non-overlapping windows of the held-out stream, [n, seq_len]."""
    tok = Tokenizer.from_file(str(tokenizer_json))
    stream = token_stream(tok, split_files()[1])
    n = min(windows, len(stream) // seq_len)
    return stream[: n * seq_len].reshape(n, seq_len)


def heldout_text() -> str:
    """The held-out split as one text (the default calibration data)."""
    return "\n".join(file_texts(split_files()[1]))


@dataclass
class TrainOptions:
    out: Path = DEFAULT_DIR
    steps: int = 600
    batch: int = 16
    lr: float = 3e-3
    warmup: int = 40
    seed: int = 0


def _lr(opts: TrainOptions, step: int) -> float:
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    t = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return opts.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """One step of next-token training on `batch` [B, SEQ_LEN + 1] (inputs and their targets),
    gradients clipped to norm 1.0; returns the loss."""
    logits = model(input_ids=batch[:, :-1]).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.item())


def evaluate(model: torch.nn.Module, windows: np.ndarray) -> float:
    """Perplexity of next-token prediction over the windows (every position but the first)."""
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in np.array_split(windows, max(1, len(windows) // 8)):
            x = torch.from_numpy(chunk)
            logits = model(input_ids=x).logits[:, :-1]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum").item()
            count += x[:, 1:].numel()
    model.train()
    return math.exp(nll / count)


def train(opts: TrainOptions) -> Path:
    # transformers is the test extra's (the trainer's backward pass), not a dependency of the package.
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    t0 = time.time()
    torch.manual_seed(opts.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    hf_logging.set_verbosity_error()
    config = model_config()
    train_files, held_files = split_files()
    print(f"corpus: {len(train_files)} train / {len(held_files)} held-out files from "
          f"{sysconfig.get_paths()['stdlib']}", file=sys.stderr)
    tok = train_tokenizer(file_texts(train_files), config.vocab_size)
    stream = torch.from_numpy(token_stream(tok, train_files))
    held = token_stream(tok, held_files)
    n_eval = min(EVAL_WINDOWS, len(held) // SEQ_LEN)
    eval_windows = held[: n_eval * SEQ_LEN].reshape(n_eval, SEQ_LEN)
    print(f"tokens: {len(stream):,} train, {len(held):,} held-out; tokenizer + data {time.time() - t0:.0f} s",
          file=sys.stderr)

    model = LlamaForCausalLM(LlamaConfig(**config.to_hf()))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=opts.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(opts.seed)
    bar = tqdm(range(opts.steps), desc="train", unit="step", file=sys.stderr)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(opts, step)
        starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (opts.batch,), generator=gen)
        batch = torch.stack([stream[s: s + SEQ_LEN + 1] for s in starts.tolist()])
        bar.set_postfix(loss=f"{optimizer_step(model, opt, batch):.3f}")
    ppl = evaluate(model, eval_windows)
    elapsed = time.time() - t0
    print(f"held-out perplexity {ppl:.3f} over {n_eval}x{SEQ_LEN} tokens; {elapsed / 60:.1f} min", file=sys.stderr)

    out = Path(opts.out)
    record = {
        "name": NAME, "parameters": config.num_parameters(),
        "heldout_perplexity": round(ppl, 4), "heldout_eval": f"first {n_eval} windows of {SEQ_LEN} tokens",
        "command": f"make demo-model  (= llamaforge train-demo --out {out} --steps {opts.steps})",
        "options": {"steps": opts.steps, "batch": opts.batch, "seq_len": SEQ_LEN, "lr": opts.lr,
                    "warmup": opts.warmup, "seed": opts.seed},
        "corpus": {"python": platform.python_version(), "train_files": len(train_files),
                   "heldout_files": len(held_files), "train_tokens": int(len(stream)),
                   "heldout_tokens": int(len(held)), "heldout_rule": f"crc32(relative path) % {HELDOUT_EVERY} == 0"},
        "train_minutes": round(elapsed / 60, 1), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }

    def tokenizer_files(folder: Path) -> None:
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": BOS, "eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast",
             "model_max_length": config.max_position_embeddings}, indent=2) + "\n")

    return save_checkpoint(model, out, tokenizer_files, record)


def save_checkpoint(model: torch.nn.Module, out: Path, tokenizer_files: Callable[[Path], None],
                    record: dict[str, Any]) -> Path:
    """The trained model in HF layout, its tokenizer files and `training.json` (the record), written
    to a sibling temporary folder and renamed onto `out`, so a run cut short leaves `out` as it was."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # type: ignore[operator]
    tokenizer_files(tmp)
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"saved {out}", file=sys.stderr)
    return out
