"""Open a LLaMA-family checkpoint directory (HF or Meta layout) and stream its tensors.

Two layouts are understood:

* **HF**: `config.json`, `model.safetensors` or shards named by `model.safetensors.index.json`,
  `tokenizer.json` (or, for older conversions, only `tokenizer.model`).
* **Meta**: `params.json`, `consolidated.00.pth` ... `consolidated.NN.pth` (model-parallel shards),
  `tokenizer.model` (a SentencePiece model for LLaMA 1/2, a tiktoken BPE ranks file for LLaMA 3).

Every tensor is returned under its HF name, in HF orientation (`[out_features, in_features]`), and
for Meta checkpoints with exactly the values transformers' `convert_llama_weights_to_hf.py` would
produce: model-parallel shards are concatenated and the q/k projections are permuted from Meta's
interleaved RoPE convention to HF's rotate-half convention.

Memory: nothing is kept resident between tensors. Safetensors shards are read with plain
`seek`/`readinto` into a buffer of exactly the tensor's size (no mmap of the whole file); `.pth`
shards are opened with `torch.load(mmap=True, weights_only=True)` per tensor and the mapping is
dropped once the tensor has been copied out. Peak memory is therefore about two copies of the
largest single tensor, whatever the model size.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import llama4
from .config import ConfigError, ModelConfig, RopeScaling, load_json, meta_ffn_size

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "HFCheckpoint",
    "MetaCheckpoint",
    "TensorInfo",
    "open_checkpoint",
    "read_safetensors_header",
    "detect_tokenizer_model",
    "tokenizer_vocab_size",
    "hf_tensor_shapes",
]

HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
HF_SINGLE = "model.safetensors"
HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
META_PARAMS = "params.json"
META_TOKENIZER = "tokenizer.model"

# safetensors' own parser refuses headers above 100 MB.
MAX_HEADER_BYTES = 100_000_000
# Number of special tokens Meta's Llama 3 tokenizer appends after the BPE ranks.
TIKTOKEN_NUM_SPECIAL = 256

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}

# Tensors that conversions sometimes carry but that are not weights.
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_IGNORED_META = {"rope.freqs"}


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or inconsistent with its config.

    The message always starts with the offending file's name (and names the tensor where one is
    involved). `problems` lists every problem found when several were collected at once.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems if problems is not None else [message]


def _fmt_shape(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _raise_problems(problems: list[str]) -> None:
    if not problems:
        return
    msg = problems[0]
    if len(problems) > 1:
        shown = problems[1:6]
        more = len(problems) - 1 - len(shown)
        msg += "\n  also: " + "\n  also: ".join(shown)
        if more:
            msg += f"\n  ... and {more} more problem(s)"
    raise CheckpointError(msg, problems)


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


# -- safetensors headers -----------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (from the header; no data read)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and sanity-check a safetensors header: reads only the first 8 + N bytes."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{name}: file not found in {path.parent}") from None
    if size < 8:
        raise CheckpointError(f"{name}: only {size} bytes, too short for a safetensors file (truncated?)")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(
                    f"{name}: corrupt safetensors header: header length {n} bytes exceeds "
                    f"{'the 100 MB limit' if n > MAX_HEADER_BYTES else f'the file size ({size} bytes)'}"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: corrupt safetensors header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupt safetensors header: expected a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_len = size - data_start
    out: dict[str, TensorInfo] = {}
    for tname, info in header.items():
        where = f"{name}: tensor '{tname}'"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: corrupt header entry")
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise CheckpointError(f"{where}: unsupported or missing dtype {info.get('dtype')!r}")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: corrupt header entry (shape={shape!r}, data_offsets={offsets!r})")
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(
                f"{where}: corrupt header: data_offsets span {offsets[1] - offsets[0]} bytes but "
                f"shape {_fmt_shape(shape)} of {info['dtype']} needs {nbytes}"
            )
        if offsets[1] > data_len:
            raise CheckpointError(
                f"{where}: data ends at byte {data_start + offsets[1]} but the file has only "
                f"{size} bytes (truncated?)"
            )
        out[tname] = TensorInfo(path, dtype, tuple(shape), data_start + offsets[0], nbytes)
    return out


def _read_tensor(info: TensorInfo, name: str) -> torch.Tensor:
    """Read one tensor's bytes into a fresh buffer (no mmap stays alive)."""
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    buf = bytearray(info.nbytes)
    try:
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(buf)
    except FileNotFoundError:
        raise CheckpointError(f"{info.file.name}: file not found (tensor '{name}')") from None
    except OSError as e:
        raise CheckpointError(f"{info.file.name}: cannot read tensor '{name}' ({e})") from None
    if got != info.nbytes:
        raise CheckpointError(
            f"{info.file.name}: tensor '{name}': read {got} of {info.nbytes} bytes (file truncated?)"
        )
    return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)


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
        import sentencepiece as spm

        spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises RuntimeError/OSError on a bad proto
        raise CheckpointError(
            f"{path.name}: neither a tiktoken BPE ranks file nor a SentencePiece model ({e})"
        ) from None
    return "sentencepiece"


def _tiktoken_num_ranks(path: Path) -> int:
    from runtime.tokenizer import TokenizerError, load_tiktoken_ranks

    try:
        return len(load_tiktoken_ranks(path))
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None


def tokenizer_vocab_size(kind: str, path: Path) -> int:
    """Number of token ids the tokenizer can produce (tiktoken: ranks + Meta's 256 specials)."""
    path = Path(path)
    if kind == "tiktoken":
        return _tiktoken_num_ranks(path) + TIKTOKEN_NUM_SPECIAL
    if kind == "sentencepiece":
        import sentencepiece as spm

        try:
            return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
        except Exception as e:
            raise CheckpointError(f"{path.name}: cannot load SentencePiece model ({e})") from None
    if kind == "hf":
        import tokenizers

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


class HFCheckpoint(Checkpoint):
    layout = "hf"

    def __init__(self, path: Path, config: ModelConfig, tokenizer_kind: str, tokenizer_path: Path,
                 warnings: list[str], weight_map: dict[str, str], index_file: str | None,
                 stored_names: dict[str, str] | None = None) -> None:
        super().__init__(path, config, tokenizer_kind, tokenizer_path, warnings)
        self._weight_map = weight_map  # tensor name -> shard file name
        self._stored = stored_names or {}  # tensor name -> name in the file, where they differ
        self._index_file = index_file
        self._headers: dict[str, dict[str, TensorInfo]] = {}
        cfg = path / HF_TOKENIZER_CONFIG
        self.tokenizer_config_path: Path | None = cfg if cfg.is_file() else None

    @property
    def files(self) -> list[Path]:
        return [self.path / f for f in sorted(set(self._weight_map.values()))]

    def _header(self, file: str) -> dict[str, TensorInfo]:
        h = self._headers.get(file)
        if h is None:
            p = self.path / file
            if not p.is_file():
                where = f" listed in {self._index_file}" if self._index_file else ""
                raise CheckpointError(f"{file}: shard{where} does not exist in {self.path}")
            h = self._headers[file] = read_safetensors_header(p)
        return h

    def _info(self, name: str) -> TensorInfo:
        file = self._weight_map.get(name)
        if file is None:
            src = self._index_file or HF_SINGLE
            raise CheckpointError(f"{src}: no tensor '{name}' in the checkpoint")
        info = self._header(file).get(self._stored.get(name, name))
        if info is None:
            raise CheckpointError(f"{file}: tensor '{self._stored.get(name, name)}' listed in {self._index_file} "
                                  "is missing from this shard")
        return info

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype_of(self, name: str) -> torch.dtype:
        return self._info(name).dtype

    def load(self, name: str) -> torch.Tensor:
        return _read_tensor(self._info(name), name)

    def validate(self) -> None:
        problems: list[str] = []
        for file in sorted(set(self._weight_map.values())):
            try:
                self._header(file)
            except CheckpointError as e:
                problems.append(str(e))
        bad_files = {p.split(":", 1)[0] for p in problems}
        src = self._index_file or HF_SINGLE
        for name, shape in self.expected_shapes().items():
            shard = self._weight_map.get(name)
            if shard is None:
                problems.append(
                    f"{src}: missing tensor '{name}' (expected from {HF_CONFIG}: "
                    f"{self.config.num_layers} layers, tie_word_embeddings={self.config.tie_word_embeddings})"
                )
                continue
            if shard in bad_files:
                continue
            info = self._headers[shard].get(self._stored.get(name, name))
            if info is None:
                problems.append(f"{shard}: tensor '{name}' listed in {src} is missing from this shard")
            elif info.shape != shape:
                problems.append(f"{shard}: tensor '{name}' has shape {_fmt_shape(info.shape)}, expected {_fmt_shape(shape)}")
            elif not info.dtype.is_floating_point:
                problems.append(f"{shard}: tensor '{name}' has dtype {info.dtype}; only floating-point weights are supported")
        _raise_problems(problems)


_META_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_META_TO_HF_LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_HF_TO_META_LAYER = {hf: (meta, dim) for meta, (hf, dim) in _META_TO_HF_LAYER.items()}


def _meta_name(hf_name: str) -> tuple[str, int | str | None]:
    """HF name -> (Meta name, how shards combine: cat dim, None = replicated, 'embed' = either)."""
    if hf_name == "model.embed_tokens.weight":
        return "tok_embeddings.weight", "embed"
    if hf_name == "model.norm.weight":
        return "norm.weight", None
    if hf_name == "lm_head.weight":
        return "output.weight", 0
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m and m.group(2) in _HF_TO_META_LAYER:
        meta, dim = _HF_TO_META_LAYER[m.group(2)]
        return f"layers.{m.group(1)}.{meta}", dim
    raise KeyError(hf_name)


def _hf_name(meta_name: str) -> str | None:
    if meta_name == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    if meta_name == "norm.weight":
        return "model.norm.weight"
    if meta_name == "output.weight":
        return "lm_head.weight"
    m = _META_LAYER.fullmatch(meta_name)
    if m and m.group(2) in _META_TO_HF_LAYER:
        return f"model.layers.{m.group(1)}.{_META_TO_HF_LAYER[m.group(2)][0]}"
    return None


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """Open a .pth memory-mapped with the weights-only unpickler (never arbitrary code)."""
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path.name}: file not found in {path.parent}") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path.name}: refused to load: not a plain tensor checkpoint (the weights-only unpickler "
            f"rejected it: {first})"
        ) from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path.name}: cannot read PyTorch checkpoint (truncated or corrupt?): {first}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta interleaved RoPE rows -> HF rotate-half rows (transformers' `permute`)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


class MetaCheckpoint(Checkpoint):
    layout = "meta"

    def __init__(self, path: Path, config: ModelConfig, tokenizer_kind: str, tokenizer_path: Path,
                 warnings: list[str], shard_files: list[Path],
                 shard_index: list[dict[str, tuple[tuple[int, ...], torch.dtype]]]) -> None:
        super().__init__(path, config, tokenizer_kind, tokenizer_path, warnings)
        self._shards = shard_files
        self._index = shard_index  # per shard: meta name -> (shape, dtype)

    @property
    def files(self) -> list[Path]:
        return list(self._shards)

    @property
    def model_parallel(self) -> int:
        return len(self._shards)

    def _plan(self, hf_name: str) -> tuple[str, int | None]:
        """(Meta name, cat dim or None for replicated); raises CheckpointError on a shape problem."""
        try:
            meta, how = _meta_name(hf_name)
        except KeyError:
            raise CheckpointError(f"{self._shards[0].name}: no tensor '{hf_name}' in the checkpoint") from None
        expected = self._expected().get(hf_name)
        shapes = []
        for shard, idx in zip(self._shards, self._index):
            if meta not in idx:
                raise CheckpointError(f"{shard.name}: missing tensor '{meta}' ({hf_name})")
            shapes.append(idx[meta][0])
        if expected is None:  # not an expected weight (e.g. lm_head of a tied model): trust the files
            expected = shapes[0] if how is None else None
        mp = len(shapes)
        candidates: list[int | None]
        if how is None or mp == 1:
            candidates = [None]
        elif how == "embed":
            # LLaMA 1/2 ParallelEmbedding splits the hidden dim, LLaMA 3 VocabParallelEmbedding the vocab.
            candidates = [1, 0] if self.tokenizer_kind != "tiktoken" else [0, 1]
        else:
            candidates = [int(how)]
        if expected is None:
            d = candidates[0]
            assert d is not None
            return meta, d
        for d in candidates:
            want = list(expected)
            if d is not None:
                if want[d] % mp:
                    continue
                want[d] //= mp
            if all(tuple(s) == tuple(want) for s in shapes):
                return meta, d
        # Report the first shard whose shape matches none of the candidate splits.
        d0 = candidates[0]
        want = list(expected)
        if d0 is not None:
            want[d0] = want[d0] // mp
        for shard, s in zip(self._shards, shapes):
            if tuple(s) != tuple(want):
                raise CheckpointError(
                    f"{shard.name}: tensor '{meta}' ({hf_name}) has shape {_fmt_shape(s)}, expected "
                    f"{_fmt_shape(want)} (full shape {_fmt_shape(expected)} over {mp} model-parallel shard(s))"
                )
        raise CheckpointError(f"{self._shards[0].name}: tensor '{meta}' ({hf_name}): inconsistent shard shapes")

    def shape_of(self, name: str) -> tuple[int, ...]:
        meta, d = self._plan(name)
        shape = list(self._index[0][meta][0])
        if d is not None:
            shape[d] *= len(self._shards)
        return tuple(shape)

    def dtype_of(self, name: str) -> torch.dtype:
        meta, _ = self._plan(name)
        return self._index[0][meta][1]

    def load(self, name: str) -> torch.Tensor:
        meta, d = self._plan(name)
        shards = self._shards if d is not None else self._shards[:1]
        pieces = []
        for shard in shards:
            sd = _torch_load(shard)  # re-opened per tensor: no mapping outlives this call
            t = sd.get(meta)
            if t is None:
                raise CheckpointError(f"{shard.name}: missing tensor '{meta}' ({name})")
            pieces.append(t)
            del sd
        out = torch.cat(pieces, dim=d) if d is not None and len(pieces) > 1 else pieces[0].clone()
        del pieces
        if name.endswith("self_attn.q_proj.weight"):
            out = _permute_rotary(out, self.config.num_heads).contiguous()
        elif name.endswith("self_attn.k_proj.weight"):
            out = _permute_rotary(out, self.config.num_kv_heads).contiguous()
        return out

    def validate(self) -> None:
        problems: list[str] = []
        for name in self.expected_shapes():
            try:
                meta, _ = self._plan(name)
                dtype = self._index[0][meta][1]
                if not dtype.is_floating_point:
                    problems.append(f"{self._shards[0].name}: tensor '{meta}' ({name}) has dtype {dtype}; "
                                    f"only floating-point weights are supported")
            except CheckpointError as e:
                problems.append(str(e))
        _raise_problems(problems)


# -- opening ---------------------------------------------------------------------------------


def _variant(variant: str | None):  # -> Variant | None
    if variant is None:
        return None
    from .variants import get_variant  # lazy: the registry is optional for loading

    return get_variant(variant)


def _find_tokenizer_hf(path: Path) -> tuple[str, Path]:
    tj = path / HF_TOKENIZER
    if tj.is_file():
        return "hf", tj
    tm = path / META_TOKENIZER
    if tm.is_file():
        return detect_tokenizer_model(tm), tm
    raise CheckpointError(f"{HF_TOKENIZER}: tokenizer file not found in {path} (nor {META_TOKENIZER})")


def _json_object(path: Path, file: str) -> dict[str, Any]:
    try:
        data = load_json(path / file)
    except ConfigError as e:
        raise CheckpointError(f"{file}: {str(e).split(': ', 1)[-1]}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def _open_hf(path: Path, variant: str | None, name: str) -> HFCheckpoint:
    warnings: list[str] = []
    hf = _json_object(path, HF_CONFIG)
    if hf.get("model_type") not in (None, "llama", "llama4", "llama4_text"):
        warnings.append(f"{HF_CONFIG}: model_type={hf.get('model_type')!r}, loading it as a LLaMA model")
    try:
        config = ModelConfig.from_hf(hf, source=HF_CONFIG, name=name)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(HF_CONFIG) else f"{HF_CONFIG}: {msg}") from None

    index_file: str | None = None
    weight_map: dict[str, str]
    if (path / HF_INDEX).is_file():
        index_file = HF_INDEX
        try:
            index = load_json(path / HF_INDEX)
        except ConfigError as e:
            raise CheckpointError(f"{HF_INDEX}: {str(e).split(': ', 1)[-1]}") from None
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{HF_INDEX}: missing or malformed 'weight_map'")
        for f in wm.values():
            if os.path.basename(f) != f:
                raise CheckpointError(f"{HF_INDEX}: shard name {f!r} is not a plain file name")
        weight_map = dict(wm)
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            hint = " (PyTorch .bin checkpoints are not supported; convert to safetensors)" \
                if any(path.glob("*.bin")) else ""
            raise CheckpointError(f"{HF_SINGLE}: no *.safetensors weights found in {path}{hint}")
        weight_map = {}
        for f in files:  # no index: the headers say where each tensor is
            for t in read_safetensors_header(path / f):
                weight_map.setdefault(t, f)

    # Llama 4's published (multimodal) checkpoints prefix the text model with `language_model.`.
    text_names, other = llama4.strip_multimodal_prefix(list(weight_map))
    stored = {name: s for name, s in text_names.items() if name != s}
    if other:
        warnings.append(f"{len(other)} tensor(s) outside `{llama4.MULTIMODAL_TEXT_PREFIX}` (vision tower) ignored")
    weight_map = {name: weight_map[s] for name, s in text_names.items()}

    tok_kind, tok_path = _find_tokenizer_hf(path)
    ckpt = HFCheckpoint(path, config, tok_kind, tok_path, warnings, weight_map, index_file, stored)
    expected = ckpt.expected_shapes()
    extra = [t for t in weight_map if t not in expected and not _IGNORED_HF.fullmatch(t)]
    if extra:
        if config.tie_word_embeddings and extra == ["lm_head.weight"]:
            warnings.append("lm_head.weight present but tie_word_embeddings=true: using the embedding")
        else:
            warnings.append(f"{len(extra)} unexpected tensor(s) ignored: {', '.join(extra[:5])}"
                            + (" ..." if len(extra) > 5 else ""))
    return ckpt


def _meta_shard_files(path: Path) -> list[Path]:
    numbered: dict[int, Path] = {}
    for p in path.glob("consolidated.*.pth"):
        m = re.fullmatch(r"consolidated\.(\d+)\.pth", p.name)
        if m:
            numbered[int(m.group(1))] = p
    if not numbered:
        single = path / "consolidated.pth"
        if single.is_file():
            return [single]
        raise CheckpointError(f"consolidated.00.pth: no model shards (consolidated.*.pth) found in {path}")
    n = max(numbered) + 1
    missing = [i for i in range(n) if i not in numbered]
    if missing:
        names = ", ".join(f"consolidated.{i:02d}.pth" for i in missing)
        raise CheckpointError(f"{names}: model-parallel shard(s) missing from {path} (found up to consolidated.{n - 1:02d}.pth)")
    return [numbered[i] for i in range(n)]


def _default_context(params: dict[str, Any], tok_kind: str) -> int:
    """The context length transformers' converter would assume, when no variant says otherwise."""
    for key in ("max_seq_len", "max_position_embeddings"):
        if isinstance(params.get(key), int) and params[key] > 0:
            return int(params[key])
    if tok_kind == "tiktoken":
        return 131072 if params.get("use_scaled_rope") else 8192
    if float(params.get("rope_theta", 10000.0)) > 10000.0:
        return 16384  # Code Llama
    if params.get("vocab_size", -1) == -1 or float(params.get("norm_eps", 1e-5)) < 1e-5:
        return 2048  # LLaMA 1
    return 4096  # Llama 2


def _open_meta(path: Path, variant: str | None, name: str) -> MetaCheckpoint:
    warnings: list[str] = []
    params = _json_object(path, META_PARAMS)
    if "moe_args" in params:
        raise CheckpointError(f"{META_PARAMS}: field 'moe_args': Llama 4's original Meta layout is not supported; "
                              "use the HF checkpoint (meta-llama/Llama-4-*-17B-*E)")
    tok_path = path / META_TOKENIZER
    if not tok_path.is_file():
        raise CheckpointError(f"{META_TOKENIZER}: tokenizer file not found in {path}")
    tok_kind = detect_tokenizer_model(tok_path)
    shard_files = _meta_shard_files(path)
    shard_index = []
    for f in shard_files:
        sd = _torch_load(f)
        shard_index.append({k: (tuple(v.shape), v.dtype) for k, v in sd.items()})
        del sd
    v = _variant(variant)
    vc = v.config if v is not None else None

    def need(key: str) -> Any:
        if key not in params:
            raise CheckpointError(f"{META_PARAMS}: missing field '{key}'")
        return params[key]

    try:
        dim = int(need("dim"))
        n_heads = int(need("n_heads"))
        n_kv = int(params.get("n_kv_heads") or n_heads)
        vocab = int(params.get("vocab_size", -1))
        ffn = meta_ffn_size(dim, int(params.get("multiple_of", 256)), params.get("ffn_dim_multiplier"))
        if vocab <= 0:
            vocab = tokenizer_vocab_size(tok_kind, tok_path)
            warnings.append(f"{META_PARAMS}: vocab_size={params.get('vocab_size', -1)}, using the tokenizer's {vocab}")
        scaling = None
        if params.get("use_scaled_rope"):
            base = vc.rope_scaling if vc is not None and vc.rope_scaling is not None else RopeScaling(
                factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
            if params.get("rope_scaling_factor") is not None:
                base = RopeScaling(float(params["rope_scaling_factor"]), base.low_freq_factor,
                                   base.high_freq_factor, base.original_max_position_embeddings)
            scaling = base
        if vc is not None:
            bos, eos, pad, ctx = vc.bos_token_id, vc.eos_token_id, vc.pad_token_id, vc.max_position_embeddings
        else:
            pad = None
            ctx = _default_context(params, tok_kind)
            if tok_kind == "tiktoken":
                n_ranks = _tiktoken_num_ranks(tok_path)
                bos, eos = n_ranks, (n_ranks + 1,)  # <|begin_of_text|>, <|end_of_text|>
            else:
                import sentencepiece as spm

                sp = spm.SentencePieceProcessor(model_file=str(tok_path))
                bos = sp.bos_id() if sp.bos_id() >= 0 else 1
                eos = (sp.eos_id() if sp.eos_id() >= 0 else 2,)
        # Meta's files carry no tie flag: the output head is tied iff the checkpoint has none.
        tied = "output.weight" not in shard_index[0]
        config = ModelConfig(
            hidden_size=dim,
            num_layers=int(need("n_layers")),
            num_heads=n_heads,
            num_kv_heads=n_kv,
            intermediate_size=ffn,
            vocab_size=vocab,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=ctx,
            tie_word_embeddings=tied,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
            name=name,
            family=vc.family if vc is not None else ("llama3" if tok_kind == "tiktoken" else "llama"),
        )
    except ConfigError as e:
        raise CheckpointError(f"{META_PARAMS}: {e}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{META_PARAMS}: invalid value ({e})") from None

    ckpt = MetaCheckpoint(path, config, tok_kind, tok_path, warnings, shard_files, shard_index)
    expected = {_meta_name(n)[0] for n in ckpt.expected_shapes()}
    extra = [k for k in shard_index[0] if k not in expected and k not in _IGNORED_META]
    if extra:
        warnings.append(f"{len(extra)} unexpected tensor(s) ignored: {', '.join(extra[:5])}"
                        + (" ..." if len(extra) > 5 else ""))
    return ckpt


def open_checkpoint(path: str | os.PathLike[str], variant: str | None = None, *,
                    validate: bool = True) -> Checkpoint:
    """Detect the layout of `path` and open it.

    The checkpoint's own config (config.json / params.json) defines the architecture. When
    `variant` names a registry entry, disagreements with it are recorded in `warnings`, and the
    config is named after the variant (else after the directory). With `validate` (the default)
    every expected tensor's presence and shape, and every shard's header, is checked (no tensor data
    is read); pass `validate=False` to inspect a broken checkpoint.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p.name or str(p)}: checkpoint directory {str(p)!r} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{p.name}: not a directory (pass the checkpoint directory)")
    name = variant if variant is not None else p.resolve().name
    if (p / HF_CONFIG).is_file():
        ckpt: Checkpoint = _open_hf(p, variant, name)
    elif (p / META_PARAMS).is_file():
        ckpt = _open_meta(p, variant, name)
    else:
        raise CheckpointError(
            f"{p.name}: not a checkpoint directory: neither {HF_CONFIG} (HF layout) nor "
            f"{META_PARAMS} (Meta layout) found in {p}"
        )
    v = _variant(variant)
    if v is not None:
        ckpt.config = ckpt.config.replace(family=v.config.family)
        for m in ckpt.config.describe_mismatch(v.config):
            ckpt.warnings.append(f"config differs from registry variant {variant!r}: {m}")
    # A tokenizer that can emit ids past the embedding table is a real bug in the checkpoint.
    tok_vocab = tokenizer_vocab_size(ckpt.tokenizer_kind, ckpt.tokenizer_path)
    if tok_vocab > ckpt.config.vocab_size:
        ckpt.warnings.append(
            f"{ckpt.tokenizer_path.name}: tokenizer has {tok_vocab} tokens but vocab_size is "
            f"{ckpt.config.vocab_size}; ids >= {ckpt.config.vocab_size} have no embedding"
        )
    if validate:
        ckpt.validate()
    return ckpt
