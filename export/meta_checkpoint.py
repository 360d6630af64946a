"""Meta's original LLaMA checkpoint layout: `params.json`, `consolidated.00.pth` ...
`consolidated.NN.pth` (model-parallel shards) and `tokenizer.model` (a SentencePiece model for
LLaMA 1/2, a tiktoken BPE ranks file for LLaMA 3). Open one with `checkpoint.open_checkpoint`
(which calls `open_meta` when it finds `params.json`).

Every tensor is returned under its HF name, in HF orientation, with exactly the values transformers'
`convert_llama_weights_to_hf.py` would produce: model-parallel shards are concatenated and the q/k
projections are permuted from Meta's interleaved RoPE convention to HF's rotate-half convention.

Memory: `.pth` shards are opened with `torch.load(mmap=True, weights_only=True)` per tensor and the
mapping is dropped once the tensor has been copied out.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from llamaforge.export.checkpoint_base import (
    META_PARAMS,
    META_TOKENIZER,
    Checkpoint,
    detect_tokenizer_model,
    optional_variant,
    read_json_object,
    tiktoken_num_ranks,
    tokenizer_vocab_size,
)
from llamaforge.export.checkpoint_errors import CheckpointError, fmt_shape, raise_problems
from llamaforge.export.config import ConfigError, ModelConfig, RopeScaling, meta_ffn_size

__all__ = ["MetaCheckpoint", "open_meta"]

# Tensors that conversions sometimes carry but that are not weights.
_IGNORED_META = {"rope.freqs"}


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
                    f"{shard.name}: tensor '{meta}' ({hf_name}) has shape {fmt_shape(s)}, expected "
                    f"{fmt_shape(want)} (full shape {fmt_shape(expected)} over {mp} model-parallel shard(s))"
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
        raise_problems(problems)


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


def open_meta(path: Path, variant: str | None, name: str) -> MetaCheckpoint:
    warnings: list[str] = []
    params = read_json_object(path, META_PARAMS)
    if "moe_args" in params:
        raise CheckpointError(f"{META_PARAMS}: field 'moe_args': Llama 4's original Meta layout is not supported; "
                              "use the HF checkpoint (meta-llama/Llama-4-*-17B-*E)")
    if "vision_chunk_size" in params:  # read as a text model, its vision and cross-attention weights would be lost
        raise CheckpointError(f"{META_PARAMS}: field 'vision_chunk_size': Llama 3.2 Vision; exporting its Meta layout "
                              "is not implemented yet: use the HF checkpoint (docs/vision.md)")
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
    v = optional_variant(variant)
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
                n_ranks = tiktoken_num_ranks(tok_path)
                bos, eos = n_ranks, (n_ranks + 1,)  # <|begin_of_text|>, <|end_of_text|>
            else:
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
