"""The variant registry: names, architecture invariants and parameter counts."""

from __future__ import annotations

import pytest

from llamaforge.export.config import ModelConfig
from llamaforge.export.variants import VARIANTS, UnknownVariantError, Variant, format_table, get_variant

REQUIRED_NAMES = [
    "llama-7b", "llama-13b", "llama-33b", "llama-65b",
    "alpaca-7b",
    "vicuna-7b", "vicuna-13b", "vicuna-33b",
    "llama2-7b", "llama2-13b", "llama2-70b",
    "llama2-7b-chat", "llama2-13b-chat", "llama2-70b-chat",
    "codellama-7b", "codellama-13b", "codellama-34b", "codellama-70b",
    "llama3-8b", "llama3-70b",
    "llama3.1-8b", "llama3.1-70b", "llama3.1-405b",
    "llama3.2-1b", "llama3.2-3b",
    "llama3.3-70b",
    "llama4-scout-17b-16e", "llama4-maverick-17b-128e",
]

# Llama 3.2 Vision: registered with a VisionConfig, not exportable (tests/export/test_vision_variants.py).
VISION_NAMES = ["llama3.2-11b-vision", "llama3.2-11b-vision-instruct", "llama3.2-90b-vision", "llama3.2-90b-vision-instruct"]

FAMILIES = {"llama1", "alpaca", "vicuna", "llama2", "codellama", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4"}

MHA = [
    "llama-7b", "llama-13b", "llama-33b", "llama-65b", "alpaca-7b", "vicuna-7b", "vicuna-13b", "vicuna-33b",
    "llama2-7b", "llama2-13b", "llama2-7b-chat", "llama2-13b-chat", "codellama-7b", "codellama-13b",
]
GQA = ["llama2-70b", "llama2-70b-chat", "codellama-34b", "codellama-70b"] + [n for n in REQUIRED_NAMES if n.startswith(("llama3", "llama4"))]


def test_registered_names_are_exactly_the_required_list():
    assert sorted(VARIANTS) == sorted(REQUIRED_NAMES + VISION_NAMES)
    assert len(REQUIRED_NAMES) == len(set(REQUIRED_NAMES))
    assert [n for n in VARIANTS if not VARIANTS[n].exportable] == VISION_NAMES


@pytest.mark.parametrize("name", REQUIRED_NAMES)
def test_entry_is_well_formed(name):
    v = get_variant(name)
    assert isinstance(v, Variant) and isinstance(v.config, ModelConfig)
    assert v.config.name == name
    assert v.config.family in FAMILIES
    assert v.tokenizer == ("tiktoken" if name.startswith(("llama3", "llama4")) else "sentencepiece")
    assert "/" in v.hf_repo
    assert v.config.num_heads * v.config.head_dim == v.config.hidden_size
    assert v.config.num_heads % v.config.num_kv_heads == 0


@pytest.mark.parametrize("name", REQUIRED_NAMES)
def test_computed_params_within_3pct_of_published(name):
    v = get_variant(name)
    computed = v.config.num_parameters()
    assert abs(computed - v.published_params) / v.published_params < 0.03, (computed, v.published_params)


@pytest.mark.parametrize(
    "name, exact",
    [
        ("llama2-7b", 6_738_415_616),
        ("llama3.2-1b", 1_235_814_400),
        ("llama3.2-3b", 3_212_749_824),
        ("llama3.1-8b", 8_030_261_248),
        ("llama3.1-405b", 405_853_388_800),
        ("llama2-70b", 68_976_648_192),
    ],
)
def test_known_exact_counts(name, exact):
    v = get_variant(name)
    assert v.published_params == exact
    assert v.config.num_parameters() == exact


@pytest.mark.parametrize("name", MHA)
def test_multi_head_attention(name):
    c = get_variant(name).config
    assert c.num_kv_heads == c.num_heads


@pytest.mark.parametrize("name", GQA)
def test_grouped_query_attention(name):
    c = get_variant(name).config
    assert c.num_kv_heads < c.num_heads
    assert c.num_kv_heads == 8


def test_mha_and_gqa_lists_cover_everything():
    assert sorted(MHA + GQA) == sorted(REQUIRED_NAMES)


@pytest.mark.parametrize("name", [n for n in REQUIRED_NAMES if n.startswith(("llama3.1", "llama3.2", "llama3.3"))])
def test_llama31_plus_has_llama3_rope_scaling(name):
    c = get_variant(name).config
    rs = c.rope_scaling
    assert rs is not None and rs.rope_type == "llama3"
    assert rs.factor == (32.0 if c.family == "llama3.2" else 8.0)
    assert (rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position_embeddings) == (1.0, 4.0, 8192)
    assert c.max_position_embeddings == 131072


@pytest.mark.parametrize("name", ["llama3-8b", "llama3-70b"])
def test_llama3_0_has_no_rope_scaling(name):
    c = get_variant(name).config
    assert c.rope_scaling is None
    assert c.max_position_embeddings == 8192


@pytest.mark.parametrize("name", [n for n in REQUIRED_NAMES if n.startswith("llama3")])
def test_llama3_common(name):
    c = get_variant(name).config
    assert c.vocab_size == 128256
    assert c.rope_theta == 500000.0
    assert c.bos_token_id == 128000
    assert 128001 in c.eos_token_id


@pytest.mark.parametrize("name, tied", [("llama3.2-1b", True), ("llama3.2-3b", True), ("llama3.1-8b", False),
                                        ("llama3.3-70b", False), ("llama2-7b", False)])
def test_tied_embeddings(name, tied):
    assert get_variant(name).config.tie_word_embeddings is tied


def test_llama32_head_dims():
    assert get_variant("llama3.2-1b").config.head_dim == 64
    assert get_variant("llama3.2-3b").config.head_dim == 128


@pytest.mark.parametrize("name", ["codellama-7b", "codellama-13b", "codellama-34b", "codellama-70b"])
def test_codellama_theta_and_context(name):
    c = get_variant(name).config
    assert c.rope_theta == 1_000_000.0
    assert c.max_position_embeddings == 16384
    assert c.vocab_size == (32000 if name == "codellama-34b" else 32016)


def test_generation_specific_numbers():
    for n in ("llama-7b", "vicuna-33b", "alpaca-7b"):
        c = get_variant(n).config
        assert (c.max_position_embeddings, c.rope_theta, c.norm_eps) == (2048, 10000.0, 1e-6)
    assert get_variant("llama-65b").config.norm_eps == 1e-5  # 65B params.json
    for n in ("llama2-7b", "llama2-70b-chat"):
        c = get_variant(n).config
        assert (c.max_position_embeddings, c.norm_eps, c.vocab_size) == (4096, 1e-5, 32000)
    a = get_variant("alpaca-7b").config
    assert (a.vocab_size, a.pad_token_id) == (32001, 32000)


def test_unknown_variant_error_is_helpful():
    with pytest.raises(UnknownVariantError) as ei:
        get_variant("llama2-7")
    err = ei.value
    assert isinstance(err, KeyError)
    msg = str(err)
    assert "'llama2-7'" in msg
    assert "llama2-7b" in msg  # a close match is suggested
    assert "llamaforge variants" in msg


def test_unknown_variant_error_without_close_match():
    with pytest.raises(KeyError) as ei:
        get_variant("gpt-neox-20b-xyz")
    msg = str(ei.value)
    assert "Did you mean" not in msg
    assert "llamaforge variants" in msg


def test_format_table_lists_every_variant():
    table = format_table()
    lines = table.splitlines()
    assert len(lines) == 2 + len(REQUIRED_NAMES) + len(VISION_NAMES)
    first_cells = {line.split()[0] for line in lines[2:]}
    assert first_cells == set(REQUIRED_NAMES + VISION_NAMES)
    for header in ("layers", "hidden", "kv", "head_dim", "ffn", "vocab", "context", "rope_theta", "delta%"):
        assert header in lines[0]


# -- Llama 4 (MoE): total and active parameters -------------------------------------------------
LLAMA4 = ["llama4-scout-17b-16e", "llama4-maverick-17b-128e"]


@pytest.mark.parametrize("name", LLAMA4)
def test_llama4_active_params_within_3pct_of_published(name):
    v = get_variant(name)
    assert v.published_active_params is not None
    active = v.config.num_parameters(active=True)
    assert abs(active - v.published_active_params) / v.published_active_params < 0.03, (active, v.published_active_params)
    assert v.computed_active_params == active < v.computed_params


@pytest.mark.parametrize("name, total, active", [
    # Counted by hand from the published config.json text_config (see export/variants.py).
    ("llama4-scout-17b-16e", 107_769_861_120, 17_172_894_720),
    ("llama4-maverick-17b-128e", 400_711_848_960, 17_184_691_200),
])
def test_llama4_exact_counts(name, total, active):
    c = get_variant(name).config
    assert (c.num_parameters(), c.num_parameters(active=True)) == (total, active)


def test_llama4_layer_structure():
    scout, maverick = (get_variant(n).config for n in LLAMA4)
    assert scout.moe_layer_indices() == tuple(range(48))
    assert maverick.moe_layer_indices() == tuple(range(1, 48, 2))  # interleave_moe_layer_step 2
    for c in (scout, maverick):
        assert [i for i in range(48) if not c.layer_uses_rope(i)] == list(range(3, 48, 4))
        assert (c.attention_chunk_size, c.num_experts_per_tok, c.dense_intermediate_size) == (8192, 1, 16384)
        assert c.rope_interleaved and c.attn_temperature_tuning
    assert scout.use_qk_norm and not maverick.use_qk_norm
    assert scout.rope_scaling is not None and scout.rope_scaling.factor == 16.0 and maverick.rope_scaling is None


def test_llama4_config_round_trips_through_hf_and_dict():
    for name in LLAMA4:
        c = get_variant(name).config
        hf = c.to_hf() | {"model_type": "llama4_text"}
        back = ModelConfig.from_hf(hf, name=name)
        assert back.describe_mismatch(c) == []
        assert back.moe_layer_indices() == c.moe_layer_indices() and back.no_rope_layers == c.no_rope_layers
        assert ModelConfig.from_dict(c.to_dict()) == c
        nested = ModelConfig.from_hf({"model_type": "llama4", "text_config": hf}, name=name)  # multimodal config.json
        assert nested.num_parameters() == c.num_parameters()
