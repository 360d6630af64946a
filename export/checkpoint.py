"""Open a LLaMA-family checkpoint directory (HF or Meta layout) and stream its tensors.

Two layouts are understood:

* **HF**: `config.json`, `model.safetensors` or shards named by `model.safetensors.index.json`,
  `tokenizer.json` (or, for older conversions, only `tokenizer.model`). Opened here, with the
  safetensors headers parsed by `safetensors_header`.
* **Meta**: `params.json`, `consolidated.00.pth` ... `consolidated.NN.pth` (model-parallel shards),
  `tokenizer.model` (a SentencePiece model for LLaMA 1/2, a tiktoken BPE ranks file for LLaMA 3).
  Opened by `meta_checkpoint`.

Every tensor is returned under its HF name, in HF orientation (`[out_features, in_features]`). This
module holds the HF reader and `open_checkpoint`, which detects the layout; what both layouts share
(the `Checkpoint` interface, the expected tensor shapes, tokenizer-file detection) is in
`checkpoint_base`. Every reader raises `checkpoint_errors.CheckpointError`.

Memory: nothing is kept resident between tensors (`safetensors_header` and `meta_checkpoint` say how
each layout reads one tensor). Peak memory is therefore about two copies of the largest single
tensor, whatever the model size.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from llamaforge.export import llama4
from llamaforge.export.checkpoint_base import (
    HF_CONFIG,
    HF_INDEX,
    HF_SINGLE,
    HF_TOKENIZER,
    HF_TOKENIZER_CONFIG,
    META_PARAMS,
    META_TOKENIZER,
    TIKTOKEN_NUM_SPECIAL,
    Checkpoint,
    detect_tokenizer_model,
    hf_tensor_shapes,
    optional_variant,
    read_json_object,
    tokenizer_vocab_size,
)
from llamaforge.export.checkpoint_errors import CheckpointError, fmt_shape, raise_problems
from llamaforge.export.config import ConfigError, ModelConfig, load_json
from llamaforge.export.meta_checkpoint import open_meta
from llamaforge.export.safetensors_header import TensorInfo, _read_tensor, read_safetensors_header

__all__ = [
    "TIKTOKEN_NUM_SPECIAL",
    "Checkpoint",
    "HFCheckpoint",
    "open_checkpoint",
    "detect_tokenizer_model",
    "tokenizer_vocab_size",
    "hf_tensor_shapes",
]

# Tensors that conversions sometimes carry but that are not weights.
_IGNORED_HF = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


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
                problems.append(f"{shard}: tensor '{name}' has shape {fmt_shape(info.shape)}, expected {fmt_shape(shape)}")
            elif not info.dtype.is_floating_point:
                problems.append(f"{shard}: tensor '{name}' has dtype {info.dtype}; only floating-point weights are supported")
        raise_problems(problems)


# -- opening ---------------------------------------------------------------------------------


def find_tokenizer_hf(path: Path) -> tuple[str, Path]:
    tj = path / HF_TOKENIZER
    if tj.is_file():
        return "hf", tj
    tm = path / META_TOKENIZER
    if tm.is_file():
        return detect_tokenizer_model(tm), tm
    raise CheckpointError(f"{HF_TOKENIZER}: tokenizer file not found in {path} (nor {META_TOKENIZER})")


def hf_weight_map(path: Path) -> tuple[dict[str, str], str | None]:
    """(stored tensor name -> shard file, the index file's name or None): from
    `model.safetensors.index.json`, or without one from the headers of every `*.safetensors`."""
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
    return weight_map, index_file


def _open_hf(path: Path, variant: str | None, name: str) -> HFCheckpoint:
    warnings: list[str] = []
    hf = read_json_object(path, HF_CONFIG)
    if hf.get("model_type") == "mllama":  # Llama 3.2 Vision: a text decoder, a vision encoder and a projector
        # Imported here: mllama_checkpoint builds on this module's HF reader.
        from llamaforge.export.mllama_checkpoint import open_mllama

        return open_mllama(path, hf, name)
    if hf.get("model_type") not in (None, "llama", "llama4", "llama4_text"):
        warnings.append(f"{HF_CONFIG}: model_type={hf.get('model_type')!r}, loading it as a LLaMA model")
    try:
        config = ModelConfig.from_hf(hf, source=HF_CONFIG, name=name)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(HF_CONFIG) else f"{HF_CONFIG}: {msg}") from None

    weight_map, index_file = hf_weight_map(path)

    # Llama 4's published (multimodal) checkpoints prefix the text model with `language_model.`.
    text_names, other = llama4.strip_multimodal_prefix(list(weight_map))
    stored = {name: s for name, s in text_names.items() if name != s}
    if other:
        warnings.append(f"{len(other)} tensor(s) outside `{llama4.MULTIMODAL_TEXT_PREFIX}` (vision tower) ignored")
    weight_map = {name: weight_map[s] for name, s in text_names.items()}

    tok_kind, tok_path = find_tokenizer_hf(path)
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
        ckpt = open_meta(p, variant, name)
    else:
        raise CheckpointError(
            f"{p.name}: not a checkpoint directory: neither {HF_CONFIG} (HF layout) nor "
            f"{META_PARAMS} (Meta layout) found in {p}"
        )
    v = optional_variant(variant)
    if v is not None:
        ckpt.config = ckpt.config.replace(family=v.config.family)
        for m in ckpt.config.describe_mismatch(v.config):
            ckpt.warnings.append(f"config differs from registry variant {variant!r}: {m}")
    # A tokenizer that can emit ids past the embedding table is a real bug in the checkpoint.
    tok_vocab = tokenizer_vocab_size(ckpt.tokenizer_kind, ckpt.tokenizer_path)
    if tok_vocab > ckpt.embedding_rows:
        ckpt.warnings.append(
            f"{ckpt.tokenizer_path.name}: tokenizer has {tok_vocab} tokens but vocab_size is "
            f"{ckpt.embedding_rows}; ids >= {ckpt.embedding_rows} have no embedding"
        )
    if validate:
        ckpt.validate()
    return ckpt
