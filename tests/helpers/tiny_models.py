"""Tiny checkpoints and tokenizers for tests (a helper module, not a test file).

    cfg = tiny_config()                                  # hidden 64, 2 layers, 4 heads / 2 kv, vocab 640
    hf_dir = make_hf_checkpoint(tmp / "hf", cfg)         # sharded safetensors + index + tokenizer.json
    model = load_hf_oracle(hf_dir)                       # transformers LlamaForCausalLM, fp32, eval()
    meta_dir = make_meta_checkpoint(tmp / "meta", hf_dir, mp=2, tokenizer="sentencepiece")
    builds = TinyBuilds(tmp)                             # each distinct checkpoint/engine once: builds.engine(hf_dir)

All three tiny tokenizers (byte-level BPE tokenizer.json, SentencePiece BPE, tiktoken ranks +
Meta's 256 specials) have exactly `TINY_VOCAB` = 640 ids, so every id a model can emit decodes.
Everything is deterministic; tokenizers are trained once per process and cached.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from llamaforge.export.config import ModelConfig, meta_ffn_size

__all__ = [
    "TINY_VOCAB",
    "corpus_text",
    "tiny_config",
    "train_tiny_tokenizer",
    "train_tiny_sentencepiece",
    "tiny_tiktoken_ranks",
    "write_tiktoken_ranks",
    "make_hf_checkpoint",
    "load_hf_oracle",
    "hf_state_dict",
    "make_meta_checkpoint",
    "meta_to_hf_permute",
    "SAMPLE_TEXTS",
    "tiny_llama4_config",
    "make_llama4_checkpoint",
    "load_llama4_oracle",
    "TinyBuilds",
]

TINY_VOCAB = 640
_CACHE: dict[Any, Any] = {}

SAMPLE_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 2  # doubled\n",
    "naïve café — 日本語のテキスト 🙂 Ünïcödé",
    "  leading and trailing spaces  ",
    "numbers 1234567890 and symbols <>{}[]",
]


def corpus_text() -> str:
    """A few hundred KB of deterministic text: some CPython stdlib sources plus unicode samples."""
    if "corpus" not in _CACHE:
        stdlib = Path(os.__file__).parent
        parts = []
        for name in ["textwrap.py", "string.py", "heapq.py", "shlex.py", "fnmatch.py", "glob.py", "colorsys.py",
                     "bisect.py"]:
            p = stdlib / name
            if p.is_file():
                parts.append(p.read_text(encoding="utf-8", errors="replace"))
        parts.append("\n".join(SAMPLE_TEXTS * 20))
        _CACHE["corpus"] = "\n".join(parts)
    return _CACHE["corpus"]


def tiny_config(**overrides: Any) -> ModelConfig:
    """hidden 64, 2 layers, 4 heads, 2 kv heads (GQA), ffn 128, vocab 640, bos 1, eos 2."""
    d: dict[str, Any] = dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=TINY_VOCAB,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=(2,),
        name="tiny",
    )
    d.update(overrides)
    return ModelConfig(**d)


# -- tokenizers ---------------------------------------------------------------------------------


def train_tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """Byte-level BPE (`tokenizers.Tokenizer`) with <unk>=0, <s>=1, </s>=2; exactly `vocab_size` ids."""
    key = ("bpe", vocab_size)
    if key not in _CACHE:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(corpus_text().splitlines(keepends=True), trainer)
        _CACHE[key] = tok.to_str()
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_CACHE[key])


def train_tiny_sentencepiece(vocab_size: int = TINY_VOCAB) -> bytes:
    """A LLaMA-style SentencePiece BPE model (unk 0, bos 1, eos 2, byte fallback); the proto bytes.
    Exactly `vocab_size` pieces when the tiny corpus allows it (up to ~8000), else fewer."""
    key = ("sp", vocab_size)
    if key not in _CACHE:
        import sentencepiece as spm

        lines = [ln for ln in corpus_text().splitlines() if ln.strip()]

        def train(hard_limit: bool) -> bytes:
            out = io.BytesIO()
            with open(os.devnull, "w") as devnull:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=iter(lines),
                    model_writer=out,
                    logstream=devnull,
                    hard_vocab_limit=hard_limit,
                    model_type="bpe",
                    vocab_size=vocab_size,
                    byte_fallback=True,
                    character_coverage=1.0,
                    normalization_rule_name="identity",
                    remove_extra_whitespaces=False,
                    split_digits=True,
                    allow_whitespace_only_pieces=True,
                    unk_id=0,
                    bos_id=1,
                    eos_id=2,
                    pad_id=-1,
                    num_threads=1,
                )
            return out.getvalue()

        try:
            _CACHE[key] = train(True)
        except RuntimeError:  # the tiny corpus cannot fill a large vocab: take what it gives
            _CACHE[key] = train(False)
    return _CACHE[key]


def _byte_decoder() -> dict[str, int]:
    from llamaforge.runtime.core.tokenizer import _bytes_to_unicode

    return {c: b for b, c in _bytes_to_unicode().items()}


def tiny_tiktoken_ranks(vocab_size: int = TINY_VOCAB) -> dict[bytes, int]:
    """tiktoken mergeable ranks: the 256 bytes, then the tiny BPE's merges in order, sized so that
    ranks + Meta's 256 special tokens == `vocab_size` (needs vocab_size >= 512; for vocabs beyond
    what the tiny corpus yields, fewer ranks)."""
    n_ranks = vocab_size - 256
    if n_ranks < 256:
        raise ValueError(f"a tiktoken tokenizer needs vocab_size >= 512 (256 bytes + 256 specials), got {vocab_size}")
    key = ("tiktoken", vocab_size)
    if key not in _CACHE:
        spec = json.loads(train_tiny_tokenizer(max(vocab_size, TINY_VOCAB)).to_str())
        dec = _byte_decoder()
        ranks = {bytes([b]): b for b in range(256)}
        for merge in spec["model"]["merges"]:
            if len(ranks) >= n_ranks:
                break
            a, b = merge.split(" ") if isinstance(merge, str) else merge
            tok = bytes(dec[c] for c in a) + bytes(dec[c] for c in b)
            if tok not in ranks:
                ranks[tok] = len(ranks)
        _CACHE[key] = ranks
    return dict(_CACHE[key])


def write_tiktoken_ranks(path: Path, ranks: dict[bytes, int]) -> Path:
    with open(path, "wb") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(tok) + b" " + str(rank).encode() + b"\n")
    return Path(path)


# -- HF checkpoints -----------------------------------------------------------------------------


def _randomized(model: torch.nn.Module, seed: int, init_std: float) -> torch.nn.Module:
    """`model` with seeded random weights: matrices ~ N(0, init_std), 1-D (RMSNorm) ~ 1 + N(0, 0.1),
    drawn in sorted parameter-name order so a seed always gives the same checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(init_std * torch.randn(p.shape, generator=gen))
    return model


def make_hf_checkpoint(dest: str | Path, config: ModelConfig | None = None, seed: int = 0,
                       max_shard_size: int | str | None = None, init_std: float = 0.1) -> Path:
    """Random-weight `LlamaForCausalLM` (fp32) saved with `save_pretrained` in >= 2 safetensors shards
    (+ index), plus a byte-level BPE tokenizer.json with `config.vocab_size` ids. Linear/embedding
    weights ~ N(0, init_std), RMSNorm weights ~ 1 + N(0, 0.1) (so a swapped norm is caught)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    config = config or tiny_config()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    hf_logging.set_verbosity_error()
    model = _randomized(LlamaForCausalLM(LlamaConfig(**config.to_hf())), seed, init_std)
    if max_shard_size is None:
        sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
        max_shard_size = max(max(sizes), sum(sizes) // 3)
    model.save_pretrained(dest, max_shard_size=max_shard_size)
    tok = train_tiny_tokenizer(config.vocab_size)
    # LLaMA's rule (its tokenizer.json post-processor): every encoded text starts with <s>.
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)])
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings},
        indent=2))
    return dest


def load_hf_oracle(dest: str | Path):
    """The checkpoint as a transformers model: fp32, eager attention, eval mode."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = LlamaForCausalLM.from_pretrained(str(dest), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def hf_greedy(hf: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of `prompt`: exactly `n` tokens (no end id stops it)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_state_dict(dest: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory, read directly with safetensors."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(dest).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _hf_config(hf_dir: Path) -> ModelConfig:
    return ModelConfig.from_hf(json.loads((hf_dir / "config.json").read_text()))


# -- Meta checkpoints ---------------------------------------------------------------------------


def meta_to_hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' `permute` (Meta interleaved RoPE rows -> HF rotate-half rows)."""
    d1, d2 = w.shape
    return w.view(n_heads, d1 // n_heads // 2, 2, d2).transpose(1, 2).reshape(d1, d2)


def _hf_to_meta_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def _ffn_params(dim: int, ffn: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) for which Meta's formula gives exactly `ffn`."""
    hidden = int(2 * (4 * dim) / 3)
    mult = None if hidden <= ffn else ffn / hidden
    assert meta_ffn_size(dim, ffn, mult) == ffn, (dim, ffn, mult)
    return ffn, mult


def make_meta_checkpoint(dest: str | Path, hf_dir: str | Path, mp: int = 2, tokenizer: str = "sentencepiece",
                         vocab_minus_one: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Convert an HF checkpoint from `make_hf_checkpoint` to Meta's layout: params.json,
    consolidated.00..{mp-1}.pth (q/k un-permuted to the interleaved RoPE convention, column-parallel
    weights split on dim 0, row-parallel on dim 1, tok_embeddings on dim 1 for sentencepiece
    (ParallelEmbedding) / dim 0 for tiktoken (VocabParallelEmbedding), norms and rope.freqs
    replicated, no output.weight when tied) and tokenizer.model (SentencePiece or tiktoken)."""
    dest, hf_dir = Path(dest), Path(hf_dir)
    dest.mkdir(parents=True, exist_ok=True)
    cfg = _hf_config(hf_dir)
    sd = hf_state_dict(hf_dir)
    for what, n in [("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads), ("hidden_size", cfg.hidden_size),
                    ("intermediate_size", cfg.intermediate_size), ("vocab_size", cfg.vocab_size)]:
        if n % mp:
            raise ValueError(f"mp={mp} does not divide {what}={n}")

    # tokenizer.model
    if tokenizer == "sentencepiece":
        model = train_tiny_sentencepiece(cfg.vocab_size)
        (dest / "tokenizer.model").write_bytes(model)
    elif tokenizer == "tiktoken":
        write_tiktoken_ranks(dest / "tokenizer.model", tiny_tiktoken_ranks(cfg.vocab_size))
        if vocab_minus_one:
            raise ValueError("vocab_minus_one is a LLaMA 1 (sentencepiece) feature")
    else:
        raise ValueError(f"tokenizer={tokenizer!r}")

    multiple_of, mult = _ffn_params(cfg.hidden_size, cfg.intermediate_size)
    params: dict[str, Any] = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_layers,
        "n_heads": cfg.num_heads,
        "vocab_size": -1 if vocab_minus_one else cfg.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": mult,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
    }
    if cfg.num_kv_heads != cfg.num_heads:
        params["n_kv_heads"] = cfg.num_kv_heads
    if mult is None:
        del params["ffn_dim_multiplier"]
    if cfg.rope_scaling is not None:
        params["use_scaled_rope"] = True
        params["rope_scaling_factor"] = cfg.rope_scaling.factor
    (dest / "params.json").write_text(json.dumps(params, indent=2))

    # weights
    embed_dim = 1 if tokenizer == "sentencepiece" else 0
    meta: dict[str, tuple[torch.Tensor, int | None]] = {}  # name -> (full tensor, split dim)
    meta["tok_embeddings.weight"] = (sd["model.embed_tokens.weight"], embed_dim)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"]
        k = sd[p + "self_attn.k_proj.weight"]
        meta[f"layers.{i}.attention.wq.weight"] = (_hf_to_meta_permute(q, cfg.num_heads), 0)
        meta[f"layers.{i}.attention.wk.weight"] = (_hf_to_meta_permute(k, cfg.num_kv_heads), 0)
        meta[f"layers.{i}.attention.wv.weight"] = (sd[p + "self_attn.v_proj.weight"], 0)
        meta[f"layers.{i}.attention.wo.weight"] = (sd[p + "self_attn.o_proj.weight"], 1)
        meta[f"layers.{i}.feed_forward.w1.weight"] = (sd[p + "mlp.gate_proj.weight"], 0)
        meta[f"layers.{i}.feed_forward.w2.weight"] = (sd[p + "mlp.down_proj.weight"], 1)
        meta[f"layers.{i}.feed_forward.w3.weight"] = (sd[p + "mlp.up_proj.weight"], 0)
        meta[f"layers.{i}.attention_norm.weight"] = (sd[p + "input_layernorm.weight"], None)
        meta[f"layers.{i}.ffn_norm.weight"] = (sd[p + "post_attention_layernorm.weight"], None)
    meta["norm.weight"] = (sd["model.norm.weight"], None)
    if not cfg.tie_word_embeddings:
        meta["output.weight"] = (sd["lm_head.weight"], 0)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    meta["rope.freqs"] = (inv, None)

    for r in range(mp):
        shard = {}
        for name, (t, d) in meta.items():
            piece = t if d is None else t.chunk(mp, dim=d)[r]
            piece = piece.clone().contiguous()  # own storage: torch.save would write the whole base
            if dtype is not None and piece.is_floating_point() and name != "rope.freqs":
                piece = piece.to(dtype)
            shard[name] = piece
        torch.save(shard, dest / f"consolidated.{r:02d}.pth")
    return dest



# -- Llama 4 (MoE) checkpoints --------------------------------------------------------------------


def tiny_llama4_config(**overrides: Any) -> ModelConfig:
    """A tiny Scout-shaped text model: 4 layers, every layer MoE (4 experts, top-1) with a shared
    expert, QK norm and chunked attention (chunk 8) on RoPE layers, a NoPE layer every 2nd layer
    with the query temperature (floor 4, so it changes within a short prompt), llama3 RoPE scaling
    with Scout's band factors (both 1), interleaved RoPE. Override for Maverick-like shapes."""
    from llamaforge.export.config import RopeScaling

    d: dict[str, Any] = dict(
        architecture="llama4", family="llama4", rope_interleaved=True,
        hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=32, intermediate_size_mlp=96, vocab_size=TINY_VOCAB, norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=RopeScaling(16.0, 1.0, 1.0, 16), max_position_embeddings=512,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layer_interval=2,
        attention_chunk_size=8, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4.0, attn_scale=0.1,
        bos_token_id=1, eos_token_id=(2,), name="tiny-llama4",
    )
    d.update(overrides)
    return ModelConfig(**d)


def make_llama4_checkpoint(dest: str | Path, config: ModelConfig, seed: int = 0, init_std: float = 0.1) -> Path:
    """Random-weight transformers `Llama4ForCausalLM` (fp32) saved with `save_pretrained` (2+ shards),
    plus the tiny byte-level BPE tokenizer.json. Weights as in `make_hf_checkpoint`."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig
    from transformers.utils import logging as hf_logging

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    hf_logging.set_verbosity_error()
    model = _randomized(Llama4ForCausalLM(Llama4TextConfig(**config.to_hf())), seed, init_std)
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    model.save_pretrained(dest, max_shard_size=max(max(sizes), sum(sizes) // 3))
    train_tiny_tokenizer(config.vocab_size).save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings}, indent=2))
    return dest


def load_llama4_oracle(dest: str | Path):
    """The checkpoint as transformers' `Llama4ForCausalLM`: fp32, eager attention, eval mode."""
    from transformers import Llama4ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return Llama4ForCausalLM.from_pretrained(str(dest), dtype=torch.float32, attn_implementation="eager").eval()


# -- one build per distinct set of arguments (what tests/conftest.py's session fixtures use) ---------


class TinyBuilds:
    """Builds each distinct tiny HF checkpoint and engine once (per pytest session: the `tiny_builds`
    fixture): asking again with the same arguments (config and seed; checkpoint and build options)
    returns the same directory, under `root`. What it returns is shared, so callers only read it."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._built: dict[tuple[Any, ...], Path] = {}

    def _new_dir(self, kind: str) -> Path:
        path = self._root / f"{kind}-{len(self._built)}"
        path.mkdir(parents=True)
        return path

    def hf_checkpoint(self, config: ModelConfig | None = None, seed: int = 0) -> Path:
        """`make_hf_checkpoint(dir, config, seed)` with its default sharding and init_std."""
        config = config or tiny_config()
        key = ("hf", repr(config), seed)
        if key not in self._built:
            self._built[key] = make_hf_checkpoint(self._new_dir("hf") / "ckpt", config, seed=seed)
        return self._built[key]

    def engine(self, checkpoint: Path, **options: Any) -> Path:
        """`build_engine(BuildOptions(checkpoint=checkpoint, out=dir, **options))`; options are any
        BuildOptions fields but `checkpoint` and `out` (the default: an fp32 ONNX Runtime engine)."""
        from llamaforge.build.builder import BuildOptions, build_engine

        fields = {f.name for f in dataclasses.fields(BuildOptions)} - {"checkpoint", "out"}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise TypeError(f"tiny_builds.engine: not BuildOptions fields (or not allowed here): {unknown}")
        key = ("engine", str(checkpoint), repr(sorted(options.items())))
        if key not in self._built:
            out = self._new_dir("engine") / "engine"
            self._built[key] = build_engine(BuildOptions(checkpoint=checkpoint, out=out, **options))
        return self._built[key]
