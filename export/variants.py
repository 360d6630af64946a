"""Registry of the released LLaMA-family models, with their true architecture numbers.

Every number below comes from the model's published config (HF `config.json` or Meta `params.json`).
Where a release differs from what one might expect, a comment says which release the name denotes
and where the number comes from.

`published_params` is the exact parameter count of the released weights: embeddings, every linear
layer, every RMSNorm weight, and the output head unless tied. HF's `safetensors.total` for the Llama 2
`-hf` conversions is 64 per layer higher than this (e.g. 6,738,417,664 for Llama-2-7b-hf) because those
files also carry each layer's 64-entry `rotary_emb.inv_freq` buffer, which is not a weight. The Llama 3.x
repos carry no such buffer, so their `safetensors.total` is the number given here.

Special tokens: for Llama 3.x the registry uses the *base* models' ids (bos 128000, eos 128001).
Instruct releases also stop on 128008 (<|eom_id|>) and 128009 (<|eot_id|>). Llama 3.3 was only
released as an instruct model, so `llama3.3-70b` uses that release's eos list.

Llama 3.2 Vision (11B, 90B) is registered with its vision numbers in a `VisionConfig`
(export/vision_config.py) next to the text decoder's `ModelConfig`. They are not one text graph:
`require_exportable` refuses them for the single-graph export, and the engine build makes their two
graphs (llamaforge/build/mllama.py; docs/vision.md).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from llamaforge.export.config import ModelConfig, RopeScaling
from llamaforge.export.vision_config import VisionConfig, mllama_num_parameters

__all__ = [
    "Variant",
    "VARIANTS",
    "UnknownVariantError",
    "VariantNotExportableError",
    "get_variant",
    "require_exportable",
    "variant_names",
    "format_table",
]


@dataclass(frozen=True)
class Variant:
    config: ModelConfig
    published_params: int
    tokenizer: str  # "sentencepiece" or "tiktoken"
    hf_repo: str  # the Hugging Face repo these numbers describe (documentation only)
    notes: str = ""
    published_active_params: int | None = None  # MoE models: parameters one token runs through
    # Llama 3.2 Vision: the vision encoder and cross-attention layers; `config` is then its text decoder.
    vision: VisionConfig | None = None

    def __post_init__(self) -> None:
        if self.vision is not None:
            self.vision.check_text_decoder(self.config)

    @property
    def computed_active_params(self) -> int:
        return self.config.num_parameters(active=True)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def exportable(self) -> bool:
        """Whether `exporter.model_source` can trace this variant as one graph (a text decoder alone)."""
        return self.vision is None

    @property
    def computed_params(self) -> int:
        """The whole checkpoint's parameters, as implied by the architecture numbers."""
        if self.vision is not None:
            return mllama_num_parameters(self.config, self.vision)
        return self.config.num_parameters()

    @property
    def params_delta_pct(self) -> float:
        return 100.0 * (self.computed_params - self.published_params) / self.published_params


class UnknownVariantError(KeyError):
    """`get_variant` was asked for a name that is not registered."""

    def __init__(self, name: str, known: list[str] | None = None) -> None:
        self.name = name
        known = sorted(VARIANTS) if known is None else known
        self.suggestions = difflib.get_close_matches(name.lower().strip(), known, n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        self.message = (
            f"unknown model variant {name!r}.{hint} "
            f"Run `llamaforge variants` to list all {len(known)} registered variants."
        )
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.message


class VariantNotExportableError(ValueError):
    """A registered variant that `exporter.model_source` cannot trace as one text graph (Llama 3.2 Vision:
    its two graphs are built by llamaforge/build/mllama.py)."""

    def __init__(self, variant: Variant) -> None:
        self.name = variant.name
        layers = len(variant.vision.cross_attention_layers) if variant.vision is not None else 0
        super().__init__(
            f"{variant.name}: exporting Llama 3.2 Vision (MllamaForConditionalGeneration: a vision encoder, a "
            f"projector and a text decoder with {layers} cross-attention layers) as a single graph is not implemented "
            f"yet: it is two graphs, which the engine build makes (`make engine MODEL={variant.name} WEIGHTS=none` for "
            "the graphs alone, `make engine CHECKPOINT=dir` from its HF checkpoint; docs/vision.md)."
        )


def require_exportable(variant: Variant) -> Variant:
    """`variant`, or VariantNotExportableError when the exporter cannot build it."""
    if not variant.exportable:
        raise VariantNotExportableError(variant)
    return variant


# -- shared pieces -------------------------------------------------------------------------

_SP = "sentencepiece"
_TIK = "tiktoken"

_LLAMA3_VOCAB = 128256
_LLAMA3_THETA = 500000.0
_LLAMA3_BOS = 128000
_LLAMA3_EOS_BASE = (128001,)
_LLAMA3_EOS_INSTRUCT = (128001, 128008, 128009)

# Llama 3.1 / 3.3: factor 8; Llama 3.2: factor 32. Both: low 1, high 4, original context 8192.
_ROPE_31 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
_ROPE_32 = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def _llama1_like(name: str, family: str, size: str, *, vocab: int = 32000, pad: int | None = 0) -> ModelConfig:
    """LLaMA 1 shapes (params.json: multiple_of 256, no GQA), as converted to HF (2048 context)."""
    dim, layers, heads, ffn = {
        "7b": (4096, 32, 32, 11008),
        "13b": (5120, 40, 40, 13824),
        "33b": (6656, 60, 52, 17920),
        "65b": (8192, 80, 64, 22016),
    }[size]
    # params.json norm_eps is 1e-06 for 7B/13B/30B but 1e-05 for 65B; HF conversions copy it.
    eps = 1e-5 if size == "65b" else 1e-6
    return ModelConfig(
        name=name, family=family,
        hidden_size=dim, num_layers=layers, num_heads=heads, num_kv_heads=heads, intermediate_size=ffn,
        vocab_size=vocab, norm_eps=eps, rope_theta=10000.0, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=pad,
    )


def _llama2(name: str, size: str) -> ModelConfig:
    dim, layers, heads, kv, ffn = {
        "7b": (4096, 32, 32, 32, 11008),
        "13b": (5120, 40, 40, 40, 13824),
        "70b": (8192, 80, 64, 8, 28672),  # GQA only at 70B; ffn_dim_multiplier 1.3, multiple_of 4096
    }[size]
    return ModelConfig(
        name=name, family="llama2",
        hidden_size=dim, num_layers=layers, num_heads=heads, num_kv_heads=kv, intermediate_size=ffn,
        vocab_size=32000, norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=None,
    )


def _codellama(name: str, size: str) -> ModelConfig:
    # vocab 32016 = 32000 + 16 infilling/reserved tokens for 7B, 13B and 70B; the 34B has no infilling
    # support and keeps 32000. All use rope_theta 1e6 and a 16384 HF context (transformers' converter
    # sets 16384 whenever rope_theta > 10000).
    dim, layers, heads, kv, ffn, vocab = {
        "7b": (4096, 32, 32, 32, 11008, 32016),
        "13b": (5120, 40, 40, 40, 13824, 32016),
        "34b": (8192, 48, 64, 8, 22016, 32000),
        "70b": (8192, 80, 64, 8, 28672, 32016),
    }[size]
    return ModelConfig(
        name=name, family="codellama",
        hidden_size=dim, num_layers=layers, num_heads=heads, num_kv_heads=kv, intermediate_size=ffn,
        vocab_size=vocab, norm_eps=1e-5, rope_theta=1_000_000.0, max_position_embeddings=16384,
        bos_token_id=1, eos_token_id=(2,), pad_token_id=None,
    )


def _llama3(name: str, family: str, size: str, *, eos: tuple[int, ...] = _LLAMA3_EOS_BASE) -> ModelConfig:
    dim, layers, heads, ffn, head_dim, tied = {
        "1b": (2048, 16, 32, 8192, 64, True),
        "3b": (3072, 28, 24, 8192, 128, True),
        "8b": (4096, 32, 32, 14336, 128, False),
        "70b": (8192, 80, 64, 28672, 128, False),
        "405b": (16384, 126, 128, 53248, 128, False),
    }[size]
    scaling = {"llama3": None, "llama3.1": _ROPE_31, "llama3.3": _ROPE_31, "llama3.2": _ROPE_32}[family]
    return ModelConfig(
        name=name, family=family,
        hidden_size=dim, num_layers=layers, num_heads=heads, num_kv_heads=8, head_dim=head_dim,
        intermediate_size=ffn, vocab_size=_LLAMA3_VOCAB, norm_eps=1e-5, rope_theta=_LLAMA3_THETA,
        rope_scaling=scaling, max_position_embeddings=8192 if family == "llama3" else 131072,
        tie_word_embeddings=tied, bos_token_id=_LLAMA3_BOS, eos_token_id=eos, pad_token_id=None,
    )


def _llama4(name: str, experts: int) -> ModelConfig:
    """Llama 4 text models (Apr 2025), from `text_config` of the HF repos' config.json. Both have
    hidden 5120, 48 layers, 40/8 heads of 128, expert FFN 8192 and dense FFN 16384, one routed
    expert per token plus a shared expert, chunked attention (8192) on the RoPE layers and a NoPE
    layer every 4th layer (Scout lists `no_rope_layers` = [1, 1, 1, 0] * 12; Maverick gives no list,
    so transformers' default interval 4 makes the same pattern)."""
    scout = experts == 16
    return ModelConfig(
        name=name, family="llama4", architecture="llama4",
        hidden_size=5120, num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128,
        intermediate_size=8192, intermediate_size_mlp=16384, vocab_size=202048, norm_eps=1e-5,
        rope_theta=500000.0, rope_interleaved=True,
        # Scout: llama3 scaling with factor 16 and both band factors 1 (10M-token context); Maverick: none (1M).
        rope_scaling=RopeScaling(16.0, 1.0, 1.0, 8192) if scout else None,
        max_position_embeddings=10485760 if scout else 1048576,
        num_local_experts=experts, num_experts_per_tok=1,
        interleave_moe_layer_step=1 if scout else 2,  # Maverick: odd layers MoE, even layers dense
        no_rope_layer_interval=4, no_rope_layers=tuple(int((i + 1) % 4 != 0) for i in range(48)),
        attention_chunk_size=8192, use_qk_norm=scout,  # Maverick has no QK norm
        attn_temperature_tuning=True, floor_scale=8192.0, attn_scale=0.1,
        bos_token_id=200000, eos_token_id=(200001, 200007, 200008), pad_token_id=200018,
    )


# -- Llama 3.2 Vision (Sep 2024): HF `MllamaForConditionalGeneration` --------------------------------
#
# Sources. The four HF repos' config.json files were written by transformers' converter
# (huggingface/transformers: src/transformers/models/mllama/convert_mllama_weights_to_hf.py) from
# Meta's params.json, whose numbers Meta's registry listed per SKU (meta-llama/llama-models:
# models/sku_list.py, `arch_args`, until it moved to llama-stack in Feb 2025):
#   11B: dim 4096, n_layers 32, n_heads 32, n_kv_heads 8, ffn_dim_multiplier 1.3, multiple_of 1024,
#        vision_num_cross_attention_layers 8, vision_max_num_chunks 4, vision_chunk_size 448 for the
#        base Llama-3.2-11B-Vision but 560 for -Instruct;
#   90B: dim 8192, n_layers 80, n_heads 64, n_kv_heads 8, ffn_dim_multiplier 1.3, multiple_of 4096,
#        vision_num_cross_attention_layers 20, vision_max_num_chunks 4, vision_chunk_size 560 (both).
# From those the converter writes: text num_hidden_layers = n_layers + cross layers (40 / 100);
# cross_attention_layers = range(f - 1, total, f + 1) with f = ceil(n_layers / cross layers) = 4,
# i.e. 3, 8, 13, ... (every fifth layer); intermediate_size 14336 / 28672 (Meta's FFN rule); vocab
# 128256; rope_theta 500000 with llama3 scaling factor 8 (low 1, high 4, original 8192), context
# 131072; bos 128000, eos 128001 (base) or [128001, 128008, 128009] (instruct), pad 128004; untied
# head; and a vision tower of constants: patch 14, hidden 1280, 32 local + 8 global layers, 16 heads,
# intermediate 5120, intermediate_layers_indices [3, 7, 15, 23, 30], vision_output_dim 7680, the 8
# tile arrangements of at most 4 tiles, image_size = vision_chunk_size. The 11B-Vision-Instruct
# text_config as published (public copies of it agree) reads exactly these numbers.
# The base 11B's 448-pixel tile is also transformers' MllamaVisionConfig default (documented with
# that checkpoint) and the cause of the position-embedding size mismatch between the two 11B
# releases reported in pytorch/torchchat#1229.
_LLAMA32_VISION_PAD = 128004
_VISION_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


def _llama32_vision(name: str, size: str, instruct: bool) -> tuple[ModelConfig, VisionConfig]:
    dim, self_layers, heads, ffn, cross = {
        "11b": (4096, 32, 32, 14336, 8),
        "90b": (8192, 80, 64, 28672, 20),
    }[size]
    total = self_layers + cross
    every = -(-self_layers // cross)  # ceil: one cross-attention layer after every `every` self-attention layers
    text = ModelConfig(
        name=name, family="llama3.2-vision",
        hidden_size=dim, num_layers=total, num_heads=heads, num_kv_heads=8, head_dim=128,
        intermediate_size=ffn, vocab_size=_LLAMA3_VOCAB, norm_eps=1e-5, rope_theta=_LLAMA3_THETA,
        rope_scaling=_ROPE_31, max_position_embeddings=131072, tie_word_embeddings=False,
        bos_token_id=_LLAMA3_BOS, eos_token_id=_LLAMA3_EOS_INSTRUCT if instruct else _LLAMA3_EOS_BASE,
        pad_token_id=_LLAMA32_VISION_PAD,
    )
    vision = VisionConfig(
        image_size=448 if (size, instruct) == ("11b", False) else 560,
        patch_size=14, hidden_size=1280, num_layers=32, num_global_layers=8, num_heads=16,
        intermediate_size=5120, vision_output_dim=7680, max_num_tiles=4,
        intermediate_layers_indices=(3, 7, 15, 23, 30), supported_aspect_ratios=_VISION_ASPECT_RATIOS,
        cross_attention_layers=tuple(range(every - 1, total, every + 1)),
    )
    return text, vision


def _v(config: ModelConfig, published: int, tokenizer: str, hf_repo: str, notes: str = "",
       published_active: int | None = None, vision: VisionConfig | None = None) -> Variant:
    return Variant(config=config, published_params=published, tokenizer=tokenizer, hf_repo=hf_repo, notes=notes,
                   published_active_params=published_active, vision=vision)


def _vision_v(name: str, size: str, instruct: bool, published: int, hf_repo: str, notes: str) -> Variant:
    text, vision = _llama32_vision(name, size, instruct)
    return _v(text, published, _TIK, hf_repo, notes, vision=vision)


_ALL: list[Variant] = [
    # -- LLaMA 1 (Feb 2023). Meta released params.json only; HF ids are the community conversions. --
    _v(_llama1_like("llama-7b", "llama1", "7b"), 6_738_415_616, _SP, "huggyllama/llama-7b"),
    _v(_llama1_like("llama-13b", "llama1", "13b"), 13_015_864_320, _SP, "huggyllama/llama-13b"),
    # Meta's directory is "30B"; the paper calls it 33B.
    _v(_llama1_like("llama-33b", "llama1", "33b"), 32_528_943_616, _SP, "huggyllama/llama-30b"),
    _v(_llama1_like("llama-65b", "llama1", "65b"), 65_285_660_672, _SP, "huggyllama/llama-65b",
       "norm_eps 1e-5: the 65B params.json differs from the smaller LLaMA 1 sizes (1e-6)."),
    # -- Alpaca 7B: LLaMA-7B fine-tuned by Stanford; train.py adds a "[PAD]" token (id 32000). --
    _v(_llama1_like("alpaca-7b", "alpaca", "7b", vocab=32001, pad=32000), 6_738_423_808, _SP,
       "tatsu-lab/alpaca-7b-wdiff",
       "Released as a weight diff against LLaMA-7B; the added [PAD] row makes vocab 32001."),
    # -- Vicuna: these names denote weights v1.3 (Jun 2023), the only release with 7B, 13B and 33B,
    #    all on LLaMA 1 (vocab 32000, context 2048, eps 1e-6). v1.5 (7B/13B on Llama 2, context 4096)
    #    is not registered under these names. --
    _v(_llama1_like("vicuna-7b", "vicuna", "7b"), 6_738_415_616, _SP, "lmsys/vicuna-7b-v1.3"),
    _v(_llama1_like("vicuna-13b", "vicuna", "13b"), 13_015_864_320, _SP, "lmsys/vicuna-13b-v1.3"),
    _v(_llama1_like("vicuna-33b", "vicuna", "33b"), 32_528_943_616, _SP, "lmsys/vicuna-33b-v1.3"),
    # -- Llama 2 (Jul 2023): chat models share the base architecture. --
    _v(_llama2("llama2-7b", "7b"), 6_738_415_616, _SP, "meta-llama/Llama-2-7b-hf"),
    _v(_llama2("llama2-13b", "13b"), 13_015_864_320, _SP, "meta-llama/Llama-2-13b-hf"),
    _v(_llama2("llama2-70b", "70b"), 68_976_648_192, _SP, "meta-llama/Llama-2-70b-hf"),
    _v(_llama2("llama2-7b-chat", "7b"), 6_738_415_616, _SP, "meta-llama/Llama-2-7b-chat-hf"),
    _v(_llama2("llama2-13b-chat", "13b"), 13_015_864_320, _SP, "meta-llama/Llama-2-13b-chat-hf"),
    _v(_llama2("llama2-70b-chat", "70b"), 68_976_648_192, _SP, "meta-llama/Llama-2-70b-chat-hf"),
    # -- Code Llama (Aug 2023; 70B Jan 2024): the base (not -Python / -Instruct) models. --
    _v(_codellama("codellama-7b", "7b"), 6_738_546_688, _SP, "codellama/CodeLlama-7b-hf"),
    _v(_codellama("codellama-13b", "13b"), 13_016_028_160, _SP, "codellama/CodeLlama-13b-hf"),
    _v(_codellama("codellama-34b", "34b"), 33_743_970_304, _SP, "codellama/CodeLlama-34b-hf"),
    _v(_codellama("codellama-70b", "70b"), 68_976_910_336, _SP, "codellama/CodeLlama-70b-hf"),
    # -- Llama 3 (Apr 2024), 3.1 (Jul 2024), 3.2 (Sep 2024), 3.3 (Dec 2024). --
    _v(_llama3("llama3-8b", "llama3", "8b"), 8_030_261_248, _TIK, "meta-llama/Meta-Llama-3-8B"),
    _v(_llama3("llama3-70b", "llama3", "70b"), 70_553_706_496, _TIK, "meta-llama/Meta-Llama-3-70B"),
    _v(_llama3("llama3.1-8b", "llama3.1", "8b"), 8_030_261_248, _TIK, "meta-llama/Llama-3.1-8B"),
    _v(_llama3("llama3.1-70b", "llama3.1", "70b"), 70_553_706_496, _TIK, "meta-llama/Llama-3.1-70B"),
    _v(_llama3("llama3.1-405b", "llama3.1", "405b"), 405_853_388_800, _TIK, "meta-llama/Llama-3.1-405B"),
    _v(_llama3("llama3.2-1b", "llama3.2", "1b"), 1_235_814_400, _TIK, "meta-llama/Llama-3.2-1B",
       "Tied embeddings; head_dim 64 (2048 / 32 heads)."),
    _v(_llama3("llama3.2-3b", "llama3.2", "3b"), 3_212_749_824, _TIK, "meta-llama/Llama-3.2-3B",
       "Tied embeddings; head_dim 128 (3072 / 24 heads)."),
    _v(_llama3("llama3.3-70b", "llama3.3", "70b", eos=_LLAMA3_EOS_INSTRUCT), 70_553_706_496, _TIK,
       "meta-llama/Llama-3.3-70B-Instruct",
       "Released only as an instruct model, so eos is the instruct list (128001, 128008, 128009)."),
    # -- Llama 4 (Apr 2025): the text decoders of the multimodal releases. Meta publishes rounded
    #    totals for the whole checkpoint, vision encoder included (~1.9B for Scout), so the text-only
    #    count computed here is 107.77B against 109B (Scout) and 400.71B against 400B (Maverick);
    #    active: 17.17B / 17.18B against 17B. --
    _v(_llama4("llama4-scout-17b-16e", 16), 109_000_000_000, _TIK, "meta-llama/Llama-4-Scout-17B-16E",
       "16 experts in every layer, QK norm, llama3 RoPE scaling 16x; published 109B total / 17B active "
       "(whole multimodal checkpoint, rounded).", published_active=17_000_000_000),
    _v(_llama4("llama4-maverick-17b-128e", 128), 400_000_000_000, _TIK, "meta-llama/Llama-4-Maverick-17B-128E",
       "128 experts on odd layers, dense FFN 16384 on even layers, no QK norm; published 400B total / 17B "
       "active (rounded).", published_active=17_000_000_000),
    # -- Llama 3.2 Vision (Sep 2024): vision encoder + projector + Llama 3.1 decoder with cross-attention
    #    layers; registered, not exportable. Published totals: the 11B-Vision-Instruct safetensors hold
    #    10,670,220,835 parameters (the HF repo's safetensors metadata, as NVIDIA's model card for it
    #    quotes); for the others only Meta's model card (meta-llama/llama-models:
    #    models/llama3_2/MODEL_CARD_VISION.md) gives totals, rounded: "11B (10.6)" and "90B (88.8)". --
    _vision_v("llama3.2-11b-vision", "11b", False, 10_600_000_000, "meta-llama/Llama-3.2-11B-Vision",
              "448-pixel tiles (the instruct release: 560); published 10.6B is Meta's rounded model-card total."),
    _vision_v("llama3.2-11b-vision-instruct", "11b", True, 10_670_220_835, "meta-llama/Llama-3.2-11B-Vision-Instruct",
              "Published count: the HF safetensors total."),
    _vision_v("llama3.2-90b-vision", "90b", False, 88_800_000_000, "meta-llama/Llama-3.2-90B-Vision",
              "Published 88.8B is Meta's rounded model-card total."),
    _vision_v("llama3.2-90b-vision-instruct", "90b", True, 88_800_000_000, "meta-llama/Llama-3.2-90B-Vision-Instruct",
              "Published 88.8B is Meta's rounded model-card total."),
]

VARIANTS: dict[str, Variant] = {v.name: v for v in _ALL}
assert len(VARIANTS) == len(_ALL), "duplicate variant name"


def variant_names() -> list[str]:
    """Registered names, in registry order (by family, then size)."""
    return list(VARIANTS)


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownVariantError(name, sorted(VARIANTS)) from None


def format_table() -> str:
    """A fixed-width table of every variant's shape and parameter count. For Llama 3.2 Vision the
    shape is the text decoder's (layers include the `xattn` cross-attention layers) and the count is
    the whole model's, vision encoder included."""
    headers = ["name", "layers", "hidden", "heads", "kv", "head_dim", "ffn", "vocab", "context",
               "rope_theta", "rope_scale", "tied", "experts", "xattn", "params(B)", "published(B)", "delta%", "active(B)"]
    rows: list[list[str]] = []
    for v in VARIANTS.values():
        c = v.config
        rows.append([
            c.name,
            str(c.num_layers),
            str(c.hidden_size),
            str(c.num_heads),
            str(c.num_kv_heads),
            str(c.head_dim),
            str(c.intermediate_size),
            str(c.vocab_size),
            str(c.max_position_embeddings),
            f"{c.rope_theta:.0f}",
            f"{c.rope_scaling.factor:g}" if c.rope_scaling else "-",
            "yes" if c.tie_word_embeddings else "no",
            f"{c.num_experts_per_tok}/{c.num_local_experts}" if c.is_moe else "-",
            str(len(v.vision.cross_attention_layers)) if v.vision is not None else "-",
            f"{v.computed_params / 1e9:.2f}",
            f"{v.published_params / 1e9:.2f}",
            f"{v.params_delta_pct:+.3f}",
            f"{v.computed_active_params / 1e9:.2f}" if c.is_moe else "-",
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in rows)
    return "\n".join(out)
