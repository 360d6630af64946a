"""BACKEND=trt for Llama 3.2 Vision (llamaforge/build/mllama_trt.py): the two plans' optimization
profiles against the traced graphs' inputs, the fail-fast without TensorRT, and (where TensorRT and a
GPU exist) a real two-plan build of the tiny model."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from tiny_mllama import make_mllama_checkpoint, tiny_mllama_configs

from llamaforge.build.builder import BuildOptions, build_engine, tensorrt_available
from llamaforge.build.errors import BuildError
from llamaforge.build.mllama_trt import VISION_PLAN_FILE, text_profiles, vision_profiles
from llamaforge.build.trt_backend import PLAN_FILE, ProfileLimits, TensorRTOptions
from llamaforge.export.mllama_export import trace_text, trace_vision

VISION, TEXT = tiny_mllama_configs()
OPTIONS = TensorRTOptions(limits=ProfileLimits(max_batch=4, max_input_len=64, max_kv_tokens=256))


def test_profiles_cover_every_input_of_both_graphs() -> None:
    graphs = {"text": (trace_text(TEXT, VISION, "fp16"), text_profiles(TEXT, VISION, OPTIONS)),
              "vision": (trace_vision(VISION, TEXT.hidden_size, "fp16"), vision_profiles(VISION, OPTIONS))}
    for kind, (model, profiles) in graphs.items():
        inputs = {v.name: v.shape for v in model.graph.inputs}
        for profile in profiles:
            assert set(profile.shapes) == set(inputs), (kind, profile.name)
            for name, (lo, opt, hi) in profile.shapes.items():
                dims = list(inputs[name])
                assert len(lo) == len(opt) == len(hi) == len(dims), (kind, name)
                for d, a, b, c in zip(dims, lo, opt, hi):
                    assert 0 <= a <= b <= c, (kind, profile.name, name, lo, opt, hi)
                    if isinstance(d, int):  # static dims (heads, head dim, tiles, pixels) pinned to the graph's
                        assert a == b == c == d, (kind, profile.name, name)
    context, generation = graphs["text"][1]
    tokens = VISION.num_patches * VISION.max_num_tiles  # one image of every tile: MAX_IMAGES = 1
    assert context.shapes["cross_attention_states"] == ((1, VISION.num_patches, TEXT.hidden_size),
                                                        (1, tokens, TEXT.hidden_size), (4, tokens, TEXT.hidden_size))
    assert generation.shapes["cross_attention_states"][2] == (4, 0, TEXT.hidden_size), "decode: no new image states"
    assert generation.shapes["past_cross_key.1"][2] == (4, TEXT.num_kv_heads, tokens, TEXT.head_dim)
    assert "past_key.1" not in context.shapes and "past_key.0" in context.shapes
    assert context.shapes["cross_attention_mask"][2] == (4, 64, VISION.max_num_tiles)


def test_trt_without_tensorrt_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs gives
    with pytest.raises(BuildError, match="BACKEND=trt needs NVIDIA TensorRT"):
        build_engine(BuildOptions(checkpoint=tmp_path / "not-read", backend="trt", out=tmp_path / "engine"))
    assert not (tmp_path / "engine").exists()


@pytest.mark.skipif(not tensorrt_available(), reason="needs NVIDIA TensorRT (tensorrt.Builder) and a GPU")
def test_two_plan_build(tmp_path: Path) -> None:
    ckpt = make_mllama_checkpoint(tmp_path / "ckpt")
    out = build_engine(BuildOptions(checkpoint=ckpt, backend="trt", precision="fp16", out=tmp_path / "engine",
                                    tensorrt=OPTIONS))
    assert (out / PLAN_FILE).stat().st_size > 0 and (out / VISION_PLAN_FILE).stat().st_size > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensorrt"]["plugins"] == ["llamaforge::LlamaAttention", "llamaforge::CrossAttention"]
    assert manifest["tensorrt"]["vision"]["plan_file"] == VISION_PLAN_FILE


def test_fp8_kv_cache_with_tensorrt_is_refused_naming_it() -> None:
    """Reached only where TensorRT is installed (the build stops at its absence first): refused before
    anything is traced, as neither plugin has an FP8 cache."""
    from llamaforge.build.mllama import refuse_unsupported
    from llamaforge.graphs.quantization.recipes import QuantConfig

    with pytest.raises(BuildError, match="KV_CACHE=fp8 with BACKEND=trt"):
        refuse_unsupported(BuildOptions(backend="trt", kv_cache="fp8"), QuantConfig(None, "fp8"))
    refuse_unsupported(BuildOptions(backend="ort", kv_cache="fp8"), QuantConfig(None, "fp8"))  # ORT: built
