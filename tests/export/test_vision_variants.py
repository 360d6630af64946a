"""Llama 3.2 Vision in the registry: the published config numbers, the parameter count (against
transformers' own model as the oracle, and the published totals), and the clear refusal to export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamaforge import cli
from llamaforge.build.builder import BuildError, BuildOptions, build_engine
from llamaforge.export.checkpoint import open_checkpoint
from llamaforge.export.checkpoint_errors import CheckpointError
from llamaforge.export.config import ConfigError
from llamaforge.export.exporter import model_source
from llamaforge.export.variants import (
    VARIANTS,
    Variant,
    VariantNotExportableError,
    get_variant,
    require_exportable,
)
from llamaforge.export.vision_config import MLLAMA_EXTRA_EMBEDDINGS, VisionConfig, mllama_num_parameters

VISION_NAMES = ["llama3.2-11b-vision", "llama3.2-11b-vision-instruct", "llama3.2-90b-vision", "llama3.2-90b-vision-instruct"]

# The numbers of each HF repo's config.json (as written by transformers' converter from Meta's
# params.json; sources in export/variants.py): text hidden, decoder layers (self + cross), heads,
# ffn, cross-attention layers, tile size.
EVERY_FIFTH_FROM_3 = {"11b": list(range(3, 40, 5)), "90b": list(range(3, 100, 5))}
PUBLISHED = {
    "llama3.2-11b-vision": (4096, 40, 32, 14336, EVERY_FIFTH_FROM_3["11b"], 448),
    "llama3.2-11b-vision-instruct": (4096, 40, 32, 14336, EVERY_FIFTH_FROM_3["11b"], 560),
    "llama3.2-90b-vision": (8192, 100, 64, 28672, EVERY_FIFTH_FROM_3["90b"], 560),
    "llama3.2-90b-vision-instruct": (8192, 100, 64, 28672, EVERY_FIFTH_FROM_3["90b"], 560),
}


def vision_of(name: str) -> VisionConfig:
    v = get_variant(name).vision
    assert v is not None
    return v


@pytest.mark.parametrize("name", VISION_NAMES)
def test_published_config_numbers(name: str) -> None:
    v = get_variant(name)
    c, vision = v.config, vision_of(name)
    hidden, layers, heads, ffn, cross, tile = PUBLISHED[name]
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size) == (
        hidden, layers, heads, 8, 128, ffn)
    assert list(vision.cross_attention_layers) == cross
    assert len(cross) == (8 if hidden == 4096 else 20)
    assert (c.vocab_size, c.rope_theta, c.max_position_embeddings, c.norm_eps) == (128256, 500000.0, 131072, 1e-5)
    rs = c.rope_scaling
    assert rs is not None and (rs.rope_type, rs.factor, rs.low_freq_factor, rs.high_freq_factor,
                               rs.original_max_position_embeddings) == ("llama3", 8.0, 1.0, 4.0, 8192)
    assert not c.tie_word_embeddings and not c.is_moe
    assert (c.bos_token_id, c.pad_token_id) == (128000, 128004)
    assert c.eos_token_id == ((128001, 128008, 128009) if name.endswith("-instruct") else (128001,))
    # The vision tower: the same constants in all four releases; only the base 11B has 448-pixel tiles.
    assert (vision.image_size, vision.patch_size, vision.max_num_tiles) == (tile, 14, 4)
    assert (vision.hidden_size, vision.num_layers, vision.num_global_layers, vision.num_heads,
            vision.intermediate_size, vision.vision_output_dim) == (1280, 32, 8, 16, 5120, 7680)
    assert vision.intermediate_layers_indices == (3, 7, 15, 23, 30)
    assert vision.supported_aspect_ratios == ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
    assert vision.image_token_index == 128256
    assert v.tokenizer == "tiktoken" and v.hf_repo.startswith("meta-llama/Llama-3.2-")


@pytest.mark.parametrize("name", VISION_NAMES)
def test_computed_params_within_3pct_of_published(name: str) -> None:
    v = get_variant(name)
    assert abs(v.computed_params - v.published_params) / v.published_params < 0.03, (v.computed_params, v.published_params)
    # The text decoder alone is not the model: the vision tower and projector are ~0.9B.
    assert v.computed_params - v.config.num_parameters() > 800_000_000


def test_11b_instruct_count_is_the_published_safetensors_total() -> None:
    v = get_variant("llama3.2-11b-vision-instruct")
    assert v.published_params == 10_670_220_835
    assert v.computed_params == v.published_params


@pytest.mark.parametrize("name", VISION_NAMES)
def test_count_equals_transformers_model(name: str) -> None:
    """The count from the architecture numbers is exactly the parameters of transformers'
    MllamaForConditionalGeneration built (on the meta device, no memory) from the same numbers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    v = get_variant(name)
    vision = vision_of(name)
    text = v.config.to_hf() | {"cross_attention_layers": list(vision.cross_attention_layers)}
    config = transformers.MllamaConfig(vision_config=vision.to_hf(), text_config=text)
    with torch.device("meta"):
        model = transformers.MllamaForConditionalGeneration(config)
    assert model.get_input_embeddings().weight.shape[0] == v.config.vocab_size + MLLAMA_EXTRA_EMBEDDINGS
    assert sum(p.numel() for p in model.parameters()) == v.computed_params


def test_hf_config_round_trip() -> None:
    for name in VISION_NAMES:
        vision, text = vision_of(name), get_variant(name).config
        hf = {"model_type": "mllama", "vision_config": vision.to_hf(),
              "text_config": text.to_hf() | {"cross_attention_layers": list(vision.cross_attention_layers)}}
        assert VisionConfig.from_hf(json.loads(json.dumps(hf))) == vision
    with pytest.raises(ConfigError, match="vision_config"):
        VisionConfig.from_hf({"model_type": "mllama", "text_config": {}})


def test_inconsistent_vision_numbers_are_refused() -> None:
    vision = vision_of("llama3.2-11b-vision-instruct")
    with pytest.raises(ConfigError, match="vision_output_dim"):
        vision.replace(vision_output_dim=1280)
    with pytest.raises(ConfigError, match="patch_size"):
        vision.replace(image_size=561)
    with pytest.raises(ConfigError, match="max_num_tiles"):
        vision.replace(max_num_tiles=2)
    text = get_variant("llama3.2-11b-vision-instruct").config
    with pytest.raises(ConfigError, match="cross_attention_layers"):
        Variant(config=text, published_params=1, tokenizer="tiktoken", hf_repo="x/y",
                vision=vision.replace(cross_attention_layers=(3, 40)))
    with pytest.raises(ConfigError, match="cross_attention_layers"):
        mllama_num_parameters(text, vision.replace(cross_attention_layers=(3, 3)))


# -- the refusal to export -------------------------------------------------------------------------

NOT_YET = "not implemented yet"


@pytest.mark.parametrize("name", VISION_NAMES)
def test_require_exportable_refuses_naming_the_variant(name: str) -> None:
    v = get_variant(name)
    assert not v.exportable
    with pytest.raises(VariantNotExportableError) as ei:
        require_exportable(v)
    assert isinstance(ei.value, ValueError)  # the CLI reports ValueErrors as `error: ...`, exit 2
    assert name in str(ei.value) and NOT_YET in str(ei.value) and "Llama 3.2 Vision" in str(ei.value)
    with pytest.raises(VariantNotExportableError, match=name):
        model_source(name, None)


def test_text_variants_stay_exportable() -> None:
    assert [n for n, v in VARIANTS.items() if not v.exportable] == VISION_NAMES
    assert require_exportable(get_variant("llama3.2-1b")).name == "llama3.2-1b"
    assert model_source("llama3.2-1b", None)[1] == get_variant("llama3.2-1b").config


def test_build_from_the_registry_needs_weights_none(tmp_path: Path) -> None:
    """`make engine MODEL=llama3.2-11b-vision` without CHECKPOINT=: the weights are asked for first (the
    graph alone is built with WEIGHTS=none, tests/build/test_mllama_graph_only.py) and nothing is written."""
    with pytest.raises(BuildError, match=r"CHECKPOINT= is required \(or WEIGHTS=none"):
        build_engine(BuildOptions(model="llama3.2-11b-vision", out=tmp_path / "engine"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, match", [({"backend": "trt"}, "BACKEND=trt"),
                                            ({"precision": "int8-wo"}, "CHECKPOINT= is required")])
def test_graph_only_builds_refuse_what_is_not_there(tmp_path: Path, options: dict[str, str], match: str) -> None:
    """Refused before anything is traced, naming the option: TensorRT where it is not installed (and a
    plan needs weights), quantization without the weights it is calibrated on."""
    with pytest.raises(BuildError, match=match):
        build_engine(BuildOptions(model="llama3.2-90b-vision", weights=False, out=tmp_path / "engine", **options))
    assert list(tmp_path.iterdir()) == []


def test_build_with_a_checkpoint_is_not_refused_by_the_registry(tmp_path: Path) -> None:
    """With CHECKPOINT= the engine is built from the checkpoint (tests/runtime/test_mllama_engine.py): a
    missing one is reported as missing, not as the registry's refusal."""
    with pytest.raises(BuildError, match="does not exist") as ei:
        build_engine(BuildOptions(model="llama3.2-11b-vision", out=tmp_path / "engine", checkpoint=tmp_path / "nothing"))
    assert NOT_YET not in str(ei.value)


def test_cli_export_reports_the_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`llamaforge export` writes one graph: a vision variant has two (and the single-graph export of its
    checkpoint points at the build: tests/export/test_mllama_vision.py)."""
    out = tmp_path / "model.onnx"
    assert cli.main(["export", "--model", "llama3.2-90b-vision-instruct", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "llama3.2-90b-vision-instruct" in err and NOT_YET in err
    assert "Traceback" not in err and not out.exists()


def test_mllama_checkpoints_are_read_as_mllama(tmp_path: Path) -> None:
    """A Llama 3.2 Vision checkpoint given without MODEL=: the HF config.json (model_type mllama) is read as
    an mllama checkpoint (here it has no weights, which is what is reported, not a missing text field);
    Meta's params.json (vision_chunk_size) is still refused for what it is."""
    hf = tmp_path / "hf"
    hf.mkdir()
    vision, text = vision_of("llama3.2-11b-vision-instruct"), get_variant("llama3.2-11b-vision-instruct").config
    (hf / "config.json").write_text(json.dumps({
        "model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"], "vision_config": vision.to_hf(),
        "text_config": text.to_hf() | {"cross_attention_layers": list(vision.cross_attention_layers)}}))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights"):
        open_checkpoint(hf)
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({
        "dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
        "vision_chunk_size": 560, "vision_max_num_chunks": 4, "vision_num_cross_attention_layers": 8}))
    with pytest.raises(CheckpointError, match=rf"params.json: field 'vision_chunk_size'.*{NOT_YET}"):
        open_checkpoint(meta)
    with pytest.raises(BuildError, match=rf"vision_chunk_size.*{NOT_YET}"):
        build_engine(BuildOptions(checkpoint=meta, out=tmp_path / "engine"))
    assert not (tmp_path / "engine").exists()
