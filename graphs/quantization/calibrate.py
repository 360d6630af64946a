"""Calibration for quantization, in PyTorch, streamed one decoder layer at a time.

The calibration batch's hidden states go through the model layer by layer: load one layer's
weights from the checkpoint (`Checkpoint.load`, one tensor at a time), run every calibration
sequence through it, record absolute maxima, drop the layer, go on. Peak memory is one layer's
weights plus the batch's activations, whatever the model size (a 70B model calibrates in the
memory of one of its 80 layers). The layer's math is the exporter's own decoder layer
(`export/model.py`, attention from `plugins/attention/reference.py`), run with the checkpoint's
tensors through `torch.func.functional_call` on a weightless (meta) module.

Recorded (see `graphs.quantization.CalibrationStats`): per-channel |x| max at every linear
layer's input (SmoothQuant needs channels; per-tensor scales take the max), per-input- and
per-output-channel |W| max of every linear weight (so the passes need not read weights again), and
per layer |K| max after RoPE and |V| max (FP8 KV cache). MoE layers add, under the expert weights'
names (`...feed_forward.experts.gate_up_proj` / `.down_proj`), the per-channel max of the experts'
inputs (router-score-scaled hidden states; SwiGLU output) and the [E, out] per-expert weight amax.
Each layer gets its own module structure (Llama 4 mixes MoE/dense FFNs and RoPE/NoPE attention).

Calibration data: CALIB= a UTF-8 text file or a directory of them; by default the held-out split
of the demo model's training text (`export/demo/train.py`). The last `sequences * seq_len`
tokens are used, so the default calibration data does not overlap the held-out windows that
`make bench-quant` measures perplexity on (the first ones).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from llamaforge.export.config import ModelConfig
from llamaforge.export.demo.train import heldout_text, split_files
from llamaforge.export.llama4 import MoEFeedForward
from llamaforge.export.mllama_text import CrossAttentionDecoderLayer
from llamaforge.export.model import DecoderLayer, RMSNorm
from llamaforge.export.vision_config import VisionConfig
from llamaforge.graphs.quantization.recipes import CalibrationStats
from llamaforge.plugins.moe.reference import expert_input_amax

DEFAULT_SEQUENCES = 16
DEFAULT_SEQ_LEN = 256
CHUNK = 4  # sequences per forward call: bounds the attention activations


class CalibrationError(ValueError):
    """Unusable calibration data; the message names the path."""


class TensorSource(Protocol):
    """What calibration needs from a checkpoint (`export.checkpoint.Checkpoint`)."""

    config: ModelConfig

    def load(self, name: str) -> torch.Tensor: ...

    def tensor_names(self) -> list[str]: ...


class LayerSearch(Protocol):
    """A per-layer search run during calibration (int4-awq's `graphs/quantization/awq.py` AWQSearch):
    it sees every linear's input as the layer runs, then the layer's weights, and records its result
    in the statistics. Kept apart from the amax recording above so calibration stays one loop."""

    def capture(self, name: str, x: torch.Tensor) -> None: ...

    def finish(self, prefix: str, weights: dict[str, torch.Tensor], stats: CalibrationStats) -> None: ...


@dataclass
class ImageStates:
    """Llama 3.2 Vision: what the cross-attention layers read during calibration, one row per
    calibration sequence: the projected image states [n, image_tokens, hidden] (the vision graph's
    output) and the cross-attention mask [n, seq_len, tiles] (1: the token sees the tile)."""

    vision: VisionConfig
    states: torch.Tensor
    mask: torch.Tensor


class TextTokenizer(Protocol):
    def encode(self, text: str, add_bos: bool = True, allow_special: bool = False) -> list[int]: ...


@dataclass
class CalibrationText:
    text: str
    source: dict[str, Any]


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"CALIB={path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise CalibrationError(f"CALIB={path}: cannot read ({e.strerror})") from None


def read_calibration_text(path: str | os.PathLike[str] | None) -> CalibrationText:
    """The text of CALIB: a file, every file under a directory (sorted, hidden and __pycache__
    skipped), or by default the demo model's held-out split."""
    if path is None:
        return CalibrationText(heldout_text(), {"kind": "heldout-split", "files": len(split_files()[1]),
                                                "defined_in": "export/demo/train.py"})
    p = Path(path)
    if not p.exists():
        raise CalibrationError(f"CALIB={p}: no such file or directory")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") or part == "__pycache__" for part in f.relative_to(p).parts))
        if not files:
            raise CalibrationError(f"CALIB={p}: directory holds no files")
        text = "\n".join(_read_utf8(f) for f in files)
        source: dict[str, Any] = {"kind": "directory", "path": str(p), "files": len(files)}
    else:
        text = _read_utf8(p)
        source = {"kind": "file", "path": str(p)}
    if not text.strip():
        raise CalibrationError(f"CALIB={p}: no text in it")
    return CalibrationText(text, source)


def calibration_batch(tokenizer: TextTokenizer, calib: CalibrationText, sequences: int = DEFAULT_SEQUENCES,
                      seq_len: int = DEFAULT_SEQ_LEN) -> torch.Tensor:
    """[n, seq_len] token ids: the last `sequences` whole windows of the tokenized text (fewer if the
    text is short, but at least one)."""
    ids = np.asarray(tokenizer.encode(calib.text, add_bos=True), dtype=np.int64)
    where = calib.source.get("path", "the default held-out split")
    if len(ids) < seq_len:
        raise CalibrationError(f"CALIB={where}: {len(ids)} tokens, fewer than one calibration sequence of {seq_len}")
    n = min(sequences, len(ids) // seq_len)
    calib.source.update(sequences=n, seq_len=seq_len, tokens=n * seq_len)
    return torch.from_numpy(ids[len(ids) - n * seq_len:].reshape(n, seq_len).copy())


def require_tokens(calib: CalibrationText, tokens: torch.Tensor, needed: int, what: str, hint: str) -> None:
    """Fail, naming CALIB and both counts, when the calibration batch is too small for a search."""
    found = int(tokens.numel())
    if found < needed:
        where = calib.source.get("path", "the default held-out split")
        raise CalibrationError(f"CALIB={where}: {found} calibration tokens ({tokens.shape[0]} sequences of {tokens.shape[1]}) "
                               f"found; {what} needs at least {needed}. {hint}")


class _AmaxRecorder:
    """Running per-channel max |x| (last axis), folded over tokens."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}

    def update(self, key: str, x: torch.Tensor) -> None:
        amax = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        old = self.values.get(key)
        self.values[key] = amax if old is None else torch.maximum(old, amax)


    def update_amax(self, key: str, amax: torch.Tensor) -> None:
        old = self.values.get(key)
        self.values[key] = amax.float() if old is None else torch.maximum(old, amax.float())


def _layer_module(config: ModelConfig, layer: int = 0, images: ImageStates | None = None) -> nn.Module:
    """Layer `layer`'s structure (Llama 4's layers differ: MoE or dense FFN, RoPE or NoPE attention;
    Llama 3.2 Vision's cross-attention layers are `mllama_text.CrossAttentionDecoderLayer`)."""
    with torch.device("meta"):  # structure only: weights come from the checkpoint per call
        if images is not None and layer in images.vision.cross_attention_layers:
            return CrossAttentionDecoderLayer(config, images.vision).eval()
        return DecoderLayer(config, layer).eval()


def _weights(ckpt: TensorSource, prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix):]: ckpt.load(name).float() for name in ckpt.tensor_names() if name.startswith(prefix)}


def _record_weights(stats: CalibrationStats, module_prefix: str, weights: dict[str, torch.Tensor],
                    linear_names: list[str]) -> None:
    for name in linear_names:
        w = weights[f"{name}.weight"].abs()  # [out, in]
        stats.weight_in_amax[module_prefix + name] = w.amax(dim=0).numpy()
        stats.weight_out_amax[module_prefix + name] = w.amax(dim=1).numpy()
    for name, w in weights.items():  # MoE experts, stored x @ W: [E, in, out] -> per expert and output channel
        if name.endswith(EXPERT_WEIGHTS):
            stats.weight_out_amax[module_prefix + name] = w.abs().amax(dim=1).numpy()


EXPERT_WEIGHTS = (".experts.gate_up_proj", ".experts.down_proj")


@torch.inference_mode()
def calibrate(ckpt: TensorSource, tokens: torch.Tensor, progress: bool = True,
              on_layer: Callable[[int], None] | None = None, search: LayerSearch | None = None,
              images: ImageStates | None = None) -> CalibrationStats:
    """Measure `CalibrationStats` for `ckpt` on `tokens` [n, seq_len], one layer in memory at a time.
    `images` (Llama 3.2 Vision, required there): the image states the cross-attention layers attend
    to, so their linears (k_proj/v_proj read the image states themselves) and every later layer are
    calibrated on what they see at run time."""
    config = ckpt.config
    stats = CalibrationStats()
    names = set(ckpt.tensor_names())
    n, seq_len = tokens.shape

    embed = ckpt.load("model.embed_tokens.weight").float()
    hidden = F.embedding(tokens, embed)  # [n, seq, hidden], the only activations kept across layers
    del embed

    recorder = _AmaxRecorder()
    kv: dict[str, torch.Tensor] = {}

    def on_linear_input(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            recorder.update(name, args[0])
            if search is not None:
                search.capture(name, args[0])
        return hook

    def on_attention(module: nn.Module, args: Any, out: tuple[torch.Tensor, ...]) -> None:
        # present_key/present_value: the new tokens' rotated K and V written into zeroed caches.
        for key, cache in (("k", out[1]), ("v", out[2])):
            kv[key] = torch.maximum(kv.get(key, torch.zeros(())), cache.abs().amax().float())

    def on_moe_input(name: str) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:  # the experts' inputs: score-scaled x, SwiGLU output
            gate_up, down = expert_input_amax(args[0], module.router.weight, module.experts.gate_up_proj,
                                              module.experts.down_proj, module.attrs)
            recorder.update_amax(f"{name}.experts.gate_up_proj", gate_up)
            recorder.update_amax(f"{name}.experts.down_proj", down)
        return hook

    def hooked(layer: nn.Module) -> list[Any]:
        hooks = [m.register_forward_pre_hook(on_moe_input(name) if isinstance(m, MoEFeedForward)
                                             else on_linear_input(name))
                 for name, m in layer.named_modules() if isinstance(m, (nn.Linear, MoEFeedForward))]
        attention = "cross_attn" if isinstance(layer, CrossAttentionDecoderLayer) else "self_attn"
        hooks.append(layer.get_submodule(attention).register_forward_hook(on_attention))
        return hooks

    hooks: list[Any] = []
    past_lengths = torch.zeros(CHUNK, dtype=torch.int32)
    bar = tqdm(total=config.num_layers, desc="calibrate", unit="layer",
               disable=not progress or os.environ.get("LLAMAFORGE_QUIET") == "1")
    try:
        for i in range(config.num_layers):
            prefix = f"model.layers.{i}."
            layer = _layer_module(config, i, images)
            linear_names = [name for name, m in layer.named_modules() if isinstance(m, nn.Linear)]
            hooks = hooked(layer)
            weights = _weights(ckpt, prefix)
            _record_weights(stats, prefix, weights, linear_names)
            for start in range(0, n, CHUNK):
                x = hidden[start:start + CHUNK]
                if isinstance(layer, CrossAttentionDecoderLayer):
                    assert images is not None
                    states = images.states[start:start + CHUNK]
                    cache = torch.zeros(x.shape[0], config.num_kv_heads, states.shape[1], config.head_dim)
                    args: tuple[torch.Tensor, ...] = (x, states, cache, cache, images.mask[start:start + CHUNK])
                else:
                    cache = torch.zeros(x.shape[0], config.num_kv_heads, seq_len, config.head_dim)
                    args = (x, cache, cache, past_lengths[: x.shape[0]])
                out, _, _ = torch.func.functional_call(layer, weights, args)
                hidden[start:start + CHUNK] = out
            if search is not None:
                search.finish(prefix, weights, stats)
            del weights  # the layer's tensors go here; the next layer's are loaded after
            for h in hooks:
                h.remove()
            for name, amax in recorder.values.items():
                stats.act_amax[prefix + name] = amax.numpy()
            recorder.values.clear()
            stats.k_amax.append(float(kv.pop("k")))
            stats.v_amax.append(float(kv.pop("v")))
            if on_layer:
                on_layer(i)
            bar.update(1)
    finally:
        bar.close()
        for h in hooks:
            h.remove()

    # lm_head: its input is the final norm's output; tied checkpoints store only the embedding.
    with torch.device("meta"):
        final_norm = RMSNorm(config.hidden_size, config.norm_eps)
    h = torch.func.functional_call(final_norm, {"weight": ckpt.load("model.norm.weight").float()}, (hidden,))
    del hidden
    stats.act_amax["lm_head"] = h.abs().reshape(-1, h.shape[-1]).amax(dim=0).numpy()
    head = ckpt.load("lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight").float()
    _record_weights(stats, "", {"lm_head.weight": head}, ["lm_head"])
    return stats
