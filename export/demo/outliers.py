"""`stdlib-5m-outliers`: stdlib-5m with the activation outliers of large LLMs, made by rewriting weights.

stdlib-5m's activations are tame (at every linear input the largest channel is 1.4-8x the median
one), so quantization recipes that pass on it say little about a real model. This variant adds the
two kinds of outliers quantization has to survive, with the function kept:

* Channel outliers (LLM.int8, SmoothQuant): in every layer, the same few hidden channels of both
  RMSNorm weights (`input_layernorm`, `post_attention_layernorm`) are multiplied by 32 or 64 and
  the consuming weights' input columns (q/k/v, gate/up; HF [out, in] layout) divided by the same
  factor. x W = (x f)(W / f): exact in real arithmetic, and, the factors being powers of two, exact
  in binary floating point too (scaling by 2^k only moves the exponent), so fp32 logits do not move
  by one bit. The q/k/v and gate/up inputs then hold channels 32-64x their natural range.
* Massive activations (Sun et al., 2024, "Massive Activations in Large Language Models"): a few
  token types (BOS, "." and newline, the tokens those spikes sit on in LLaMA 2) produce, in early
  layers, activations thousands of times the median. In those layers' MLPs two intermediate
  channels are turned into a spike detector: identical gate and up rows along a direction that
  separates the spike tokens' normalized hidden states from all others (a logistic regression
  without intercept, fitted on the train split), so SwiGLU's output is ~SPIKE_RATIO x the layer's
  median channel range on those tokens and ~0 elsewhere. Their down_proj columns are v and -v, so
  the pair cancels exactly: the spikes change no output in real arithmetic, yet every activation
  scale that sees them (per tensor, or per token on the spike tokens) is inflated, which is what
  breaks static int8 on real models. Per-channel smoothing cannot undo them: the channels are ~0 on
  all other tokens.

  The two channel slots are the layer's least important ones (smallest rms(h_j) * |down column j|
  on the fit data), and giving them up is the one change to the function: exactness is impossible
  here, because a spike needs a channel that produces it and every channel of a trained model
  already does something (a spike in the residual stream is worse: RMSNorm divides every channel of
  the token by it). The change is measured (tests/export/test_outliers.py, `make bench-quant`).

Everything is deterministic: fixed channels and factors chosen from the weights and the fit data,
the fit in float64 numpy, and the direction rounded to float32. The checkpoint is written to a
temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from llamaforge.export.checkpoint import open_checkpoint
from llamaforge.export.checkpoint_base import Checkpoint
from llamaforge.export.demo.tokenizer import BOS
from llamaforge.export.demo.train import DEFAULT_DIR as STDLIB_5M
from llamaforge.export.demo.train import SEQ_LEN, split_files, token_stream
from llamaforge.export.model import DecoderLayer

NAME = "stdlib-5m-outliers"
DEFAULT_DIR = Path("checkpoints") / NAME
RECORD_FILE = "outliers.json"

NORM_FACTORS = (64.0, 32.0, 32.0)  # one per outlier channel; powers of two keep the rewrite bit-exact
SPIKE_LAYERS = (1, 2)  # early layers, where massive activations appear in LLaMA 2 (layer 2 of 7B)
SPIKE_TOKENS = (BOS, ".", "\u010a")  # "\u010a" is the byte-level BPE spelling of "\n"
SPIKE_RATIO = 100.0  # spike size / the layer's median per-channel |x| max at the down_proj input
FIT_WINDOWS = 16  # windows of SEQ_LEN train-split tokens the spike direction is fitted on
FIT_RIDGE = 1e-2


@dataclass
class _FitData:
    tokens: np.ndarray  # [n, SEQ_LEN]
    norm_ratio: np.ndarray  # [hidden]: per channel, the mean over every norm of (channel |x| max / median)
    mlp_input: dict[int, np.ndarray]  # spike layer -> post_attention_layernorm output [n * SEQ_LEN, hidden]
    down_input: dict[int, np.ndarray]  # spike layer -> SwiGLU output [n * SEQ_LEN, intermediate]


def fit_tokens(tokenizer: Tokenizer, windows: int = FIT_WINDOWS) -> np.ndarray:
    """The first `windows` windows of the train split (neither the held-out evaluation windows nor
    the default calibration text, which are both held-out)."""
    train_files = split_files()[0]
    need = windows * SEQ_LEN
    stream = np.zeros(0, np.int64)
    for start in range(0, len(train_files), 8):  # tokenize only as many files as the windows need
        stream = np.concatenate([stream, token_stream(tokenizer, train_files[start:start + 8])])
        if len(stream) >= need:
            return stream[:need].reshape(windows, SEQ_LEN)
    raise ValueError(f"the train split holds {len(stream)} tokens, fewer than {need} to fit the spikes on")


def _layer(ckpt: Checkpoint, state: dict[str, torch.Tensor], i: int) -> DecoderLayer:
    layer = DecoderLayer(ckpt.config, i).eval()
    prefix = f"model.layers.{i}."
    layer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return layer


@torch.inference_mode()
def _measure(ckpt: Checkpoint, state: dict[str, torch.Tensor], tokens: np.ndarray) -> _FitData:
    """Run the fit tokens through the decoder layers (the exporter's own, as calibration does)."""
    config = ckpt.config
    x = torch.nn.functional.embedding(torch.from_numpy(tokens), state["model.embed_tokens.weight"])
    n, seq = tokens.shape
    cache = torch.zeros(n, config.num_kv_heads, seq, config.head_dim)
    lengths = torch.zeros(n, dtype=torch.int32)
    ratios, mlp_input, down_input = [], {}, {}
    seen: dict[str, torch.Tensor] = {}  # what the hooks saw in the current layer
    for i in range(config.num_layers):
        layer = _layer(ckpt, state, i)
        seen.clear()
        hooks = [layer.get_submodule("input_layernorm").register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out)),
                 layer.get_submodule("post_attention_layernorm").register_forward_hook(
                     lambda m, a, out: seen.__setitem__("mlp", out)),
                 layer.get_submodule("mlp.down_proj").register_forward_pre_hook(lambda m, a: seen.__setitem__("down", a[0]))]
        x, _, _ = layer(x, cache, cache, lengths)
        for h in hooks:
            h.remove()
        for key in ("attn", "mlp"):
            amax = seen[key].abs().reshape(-1, config.hidden_size).amax(0).double().numpy()
            ratios.append(amax / np.median(amax))
        if i in SPIKE_LAYERS:
            mlp_input[i] = seen["mlp"].reshape(-1, config.hidden_size).double().numpy()
            down_input[i] = seen["down"].reshape(-1, seen["down"].shape[-1]).double().numpy()
    return _FitData(tokens, np.mean(ratios, axis=0), mlp_input, down_input)


def spike_direction(z: np.ndarray, is_spike: np.ndarray, ridge: float = FIT_RIDGE, iters: int = 30) -> np.ndarray:
    """u with z @ u > 0 on the spike tokens and < 0 elsewhere: logistic regression without an
    intercept (SwiGLU has no bias; a hidden state's common component plays its part), by Newton's
    method in float64, spike tokens weighted up to balance their rarity."""
    u = np.zeros(z.shape[1])
    weight = np.where(is_spike, (~is_spike).sum() / max(1, is_spike.sum()), 1.0)
    y = is_spike.astype(np.float64)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(z @ u)))
        grad = z.T @ (weight * (p - y)) + ridge * u
        hess = (z * (weight * p * (1 - p))[:, None]).T @ z + ridge * np.eye(z.shape[1])
        u -= np.linalg.solve(hess, grad)
    return u.astype(np.float32).astype(np.float64)  # rounded: the bits do not depend on BLAS threading


def _add_spikes(state: dict[str, torch.Tensor], data: _FitData, spike_ids: list[int]) -> list[dict[str, Any]]:
    is_spike = np.isin(data.tokens.reshape(-1), spike_ids)
    records = []
    for i in SPIKE_LAYERS:
        p = f"model.layers.{i}.mlp."
        z, h = data.mlp_input[i], data.down_input[i]
        down = state[p + "down_proj.weight"]  # [hidden, intermediate]
        importance = np.sqrt((h ** 2).mean(0)) * down.double().norm(dim=0).numpy()
        j1, j2 = (int(j) for j in np.argsort(importance, kind="stable")[:2])
        u = spike_direction(z, is_spike)
        s = z @ u
        u /= np.median(s[is_spike])  # spike tokens now project to ~1, the others below 0
        s = z @ u
        target = SPIKE_RATIO * float(np.median(np.abs(h).max(0)))
        k = float(np.sqrt(target))  # gate and up share the gain: SwiGLU(k s, k s) ~ k^2 s^2 on spikes
        row = torch.from_numpy(k * u).float()
        for name in ("gate_proj", "up_proj"):
            w = state[p + name + ".weight"]
            w[j1], w[j2] = row, row
        v = down[:, int(np.argsort(down.norm(dim=0).numpy(), kind="stable")[down.shape[1] // 2])].clone()
        down[:, j1], down[:, j2] = v, -v  # a typical column: +v and -v cancel exactly
        spike = k * s * k * s / (1 + np.exp(-k * s))  # the pair's SwiGLU output on the fit tokens
        records.append({"layer": i, "channels": [j1, j2], "replaced_importance": [float(importance[j1]), float(importance[j2])],
                        "median_importance": float(np.median(importance)), "gain": k,
                        "fit_spike_median": float(np.median(spike[is_spike])),
                        "fit_other_max": float(np.abs(spike[~is_spike]).max()),
                        "fit_recall": float((s[is_spike] > 0).mean()), "fit_false_positive": float((s[~is_spike] > 0).mean())})
    return records


def _add_channel_outliers(state: dict[str, torch.Tensor], channels: list[int], layers: int) -> None:
    for i in range(layers):
        p = f"model.layers.{i}."
        for norm, consumers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                                ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            for c, f in zip(channels, NORM_FACTORS):
                state[p + norm + ".weight"][c] *= f
                for name in consumers:
                    state[p + name + ".weight"][:, c] /= f


def make_outlier_checkpoint(out: str | Path = DEFAULT_DIR, source: str | Path = STDLIB_5M,
                            spikes: bool = True) -> Path:
    """Write the outlier variant of `source` (an HF-layout Llama checkpoint with a byte-level BPE
    tokenizer.json, by default stdlib-5m, which is only read) to `out`. `spikes=False` writes the
    channel outliers alone: a bit-exact rewrite of the source's function."""
    source, out = Path(source), Path(out)
    ckpt = open_checkpoint(source)
    config = ckpt.config
    bad = [i for i in SPIKE_LAYERS if i >= config.num_layers]
    if spikes and bad:
        raise ValueError(f"{source}: spike layers {bad} do not exist (the model has {config.num_layers} layers)")
    tokenizer = Tokenizer.from_file(str(ckpt.tokenizer_path))
    found = {t: tokenizer.token_to_id(t) for t in SPIKE_TOKENS}
    missing = [t for t, i in found.items() if i is None]
    if missing:
        raise ValueError(f"{ckpt.tokenizer_path}: no token {missing[0]!r} (the spikes sit on {list(SPIKE_TOKENS)})")
    spike_ids = [i for i in found.values() if i is not None]
    state = {name: ckpt.load(name).float().clone() for name in ckpt.tensor_names()}
    print(f"{NAME}: measuring {source} on {FIT_WINDOWS} x {SEQ_LEN} train-split tokens", file=sys.stderr)
    data = _measure(ckpt, state, fit_tokens(tokenizer))
    channels = [int(c) for c in np.argsort(-data.norm_ratio, kind="stable")[:len(NORM_FACTORS)]]
    spike_records = _add_spikes(state, data, spike_ids) if spikes else []
    _add_channel_outliers(state, channels, config.num_layers)  # after the spikes: their rows get scaled too

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sorted(state.items())}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, tmp / name)
    record = {
        "name": NAME, "source": str(source), "command": "llamaforge demo-outliers (export/demo/outliers.py)",
        "channel_outliers": {"channels": channels, "factors": list(NORM_FACTORS),
                             "norms": ["input_layernorm", "post_attention_layernorm"], "layers": "all",
                             "natural_ratio": [float(data.norm_ratio[c]) for c in channels]},
        "spikes": {"tokens": list(SPIKE_TOKENS), "token_ids": spike_ids, "ratio": SPIKE_RATIO,
                   "fit": f"first {FIT_WINDOWS} windows of {SEQ_LEN} train-split tokens", "layers": spike_records}
        if spikes else None,
        "exact": not spikes,
    }
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"{NAME}: wrote {out} (channel outliers {channels} x {list(NORM_FACTORS)}"
          + (f", spikes in layers {list(SPIKE_LAYERS)})" if spikes else ")"), file=sys.stderr)
    return out
