"""What every checkpoint layout shares: the `Checkpoint` interface, the weights a config implies,
tokenizer-file detection, and the readers both layouts' openers use.

`checkpoint.py` (HF layout, and `open_checkpoint`, which detects the layout) and `meta_checkpoint.py`
(Meta layout) both build on this module; every reader raises `checkpoint_errors.CheckpointError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sentencepiece as spm
import tokenizers
import torch

from llamaforge.export import llama4
from llamaforge.export.checkpoint_errors import CheckpointError
from llamaforge.export.config import ConfigError, ModelConfig, load_json
from llamaforge.export.variants import Variant, get_variant
from llamaforge.runtime.core.tokenizer import TokenizerError, load_tiktoken_ranks

HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
META_PARAMS = "params.json"
META_TOKENIZER = "tokenizer.model"

# Number of special tokens Meta's Llama 3 tokenizer appends after the BPE ranks.
TIKTOKEN_NUM_SPECIAL = 256


# -- expected tensors ------------------------------------------------------------------------


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of a LLaMA model under its HF name with its HF shape, in a stable order."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(config.num_layers):
        p = f"model.layers.{layer}."
        out[p + "self_attn.q_proj.weight"] = (config.q_size, h)
        out[p + "self_attn.k_proj.weight"] = (config.kv_size, h)
        out[p + "self_attn.v_proj.weight"] = (config.kv_size, h)
        out[p + "self_attn.o_proj.weight"] = (h, config.q_size)
        if config.architecture == "llama4":
            out.update({p + k: shape for k, shape in llama4.ffn_tensor_shapes(config, layer).items()})
        else:
            out[p + "mlp.gate_proj.weight"] = (i, h)
            out[p + "mlp.up_proj.weight"] = (i, h)
            out[p + "mlp.down_proj.weight"] = (h, i)
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


# -- tokenizer files ---------------------------------------------------------------------------

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+")


def detect_tokenizer_model(path: Path) -> str:
    """'tiktoken' if `path` is a tiktoken BPE ranks file ("base64 rank" lines), 'sentencepiece' if
    sentencepiece can load it; otherwise CheckpointError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: tokenizer file not found in {path.parent}") from None
    if not head:
        raise CheckpointError(f"{path.name}: tokenizer file is empty")
    lines = head.split(b"\n")
    if len(lines) > 1:
        lines = lines[:-1]  # the last one may be cut by the 8 KiB read
    lines = [ln.rstrip(b"\r") for ln in lines[:64] if ln.strip()]
    if lines and all(_TIKTOKEN_LINE.fullmatch(ln) for ln in lines):
        return "tiktoken"
    try:
        spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
        raise CheckpointError(
            f"{path.name}: neither a tiktoken BPE ranks file nor a SentencePiece model ({e})"
        ) from None
    return "sentencepiece"


def tiktoken_num_ranks(path: Path) -> int:
    try:
        return len(load_tiktoken_ranks(path))
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None


def tokenizer_vocab_size(kind: str, path: Path) -> int:
    """Number of token ids the tokenizer can produce (tiktoken: ranks + Meta's 256 specials)."""
    path = Path(path)
    if kind == "tiktoken":
        return tiktoken_num_ranks(path) + TIKTOKEN_NUM_SPECIAL
    if kind == "sentencepiece":
        try:
            return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
        except Exception as e:
            raise CheckpointError(f"{path.name}: cannot load SentencePiece model ({e})") from None
    if kind == "hf":
        try:
            return tokenizers.Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
        except Exception as e:
            raise CheckpointError(f"{path.name}: cannot load tokenizer ({e})") from None
    raise ValueError(f"unknown tokenizer kind {kind!r}")


# -- the checkpoint ----------------------------------------------------------------------------


class Checkpoint:
    """A checkpoint directory. Build with `open_checkpoint`."""

    layout: str = ""

    def __init__(self, path: Path, config: ModelConfig, tokenizer_kind: str, tokenizer_path: Path,
                 warnings: list[str]) -> None:
        self.path = path
        self.config = config
        self.tokenizer_kind = tokenizer_kind  # "hf" | "sentencepiece" | "tiktoken"
        self.tokenizer_path = tokenizer_path
        self.warnings = warnings

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.layout} {str(self.path)!r} {self.config.name}>"

    # -- shapes ---------------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> HF shape of every weight the config implies, in export order."""
        return dict(self._expected())

    def _expected(self) -> dict[str, tuple[int, ...]]:
        cached = getattr(self, "_expected_cache", None)
        if cached is None or cached[0] is not self.config:
            cached = self._expected_cache = (self.config, hf_tensor_shapes(self.config))
        return cached[1]

    @property
    def embedding_rows(self) -> int:
        """Token ids the input embedding has a row for (the ids a tokenizer may produce)."""
        return self.config.vocab_size

    def tensor_names(self) -> list[str]:
        return list(self.expected_shapes())

    def total_bytes(self) -> int:
        """Bytes of all expected weights in checkpoint dtype (from headers)."""
        return sum(math.prod(self.shape_of(n)) * self.dtype_of(n).itemsize for n in self.expected_shapes())

    # -- data -----------------------------------------------------------------------------
    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (HF name, tensor) one at a time in checkpoint dtype, in `expected_shapes()` order."""
        for name in self.expected_shapes():
            yield name, self.load(name)

    # subclasses implement:
    def validate(self) -> None:
        raise NotImplementedError

    def load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def shape_of(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype_of(self, name: str) -> torch.dtype:
        raise NotImplementedError

    @property
    def files(self) -> list[Path]:
        """The weight files of this checkpoint."""
        raise NotImplementedError


# -- opening ---------------------------------------------------------------------------------


def optional_variant(variant: str | None) -> Variant | None:
    if variant is None:
        return None
    return get_variant(variant)


def read_json_object(path: Path, file: str) -> dict[str, Any]:
    try:
        data = load_json(path / file)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {str(e).split(': ', 1)[-1]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data
