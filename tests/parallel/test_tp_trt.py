"""BACKEND=trt at TP=N (llamaforge/build/tensor_parallel.py `rank_plan`, trt_backend.py `build_rank_plan`):
each rank's graph, its all-reduce nodes in TensorRT-LLM's plugin form, handed to TensorRT's ONNX parser
after TensorRT-LLM's plugin library is loaded, and built into rank{i}/engine.plan.

Here (no TensorRT, no GPU): the build fails fast without TensorRT or without the plugin library,
writing nothing; and, with the plan build itself replaced by a recorder, every rank's graph as the
parser would get it maps each AllReduce node to `tensorrt_llm::AllReduce` over the group [0..N-1] with
the graph's type, NCCL, no fusion, and each rank's profiles take its KV heads. The real plan build
runs only where TensorRT and the plugin library are installed (a GPU machine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
import pytest
from tiny_models import TinyBuilds, tiny_config

from llamaforge.build import builder
from llamaforge.build import tensor_parallel as tp_build
from llamaforge.build.builder import BuildError, BuildOptions, build_engine, tensorrt_available
from llamaforge.build.trt_backend import PLAN_FILE, ProfileLimits, TensorRTOptions
from llamaforge.plugins.all_reduce import trt_plugin

TRT_OPTIONS = TensorRTOptions(limits=ProfileLimits(2, 16, 64), optimization_level=0)


@pytest.fixture(scope="module")
def checkpoint(tiny_builds: TinyBuilds) -> Path:
    return tiny_builds.hf_checkpoint(tiny_config(), seed=11)  # test_tp_quantized.py's


def plugin_library_found() -> bool:
    try:
        trt_plugin.find_plugin_library()
    except trt_plugin.PluginLibraryMissing:
        return False
    return True


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed: the fail-fast path is not taken")
def test_tp_trt_without_tensorrt_fails_fast(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="BACKEND=trt needs NVIDIA TensorRT"):
        build_engine(BuildOptions(checkpoint=checkpoint, out=tmp_path / "engine", tp=2, backend="trt", precision="fp16"))
    assert not (tmp_path / "engine").exists()


def test_tp_trt_without_the_plugin_library_fails_fast_naming_it(checkpoint: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builder, "tensorrt_available", lambda: True)  # as if TensorRT were installed
    missing = tmp_path / "nowhere" / trt_plugin.LIBRARY_NAME
    monkeypatch.setenv(trt_plugin.LIBRARY_ENV, str(missing))
    with pytest.raises(BuildError, match=f"TP=2 BACKEND=trt: {trt_plugin.LIBRARY_ENV}={missing}: no such file"):
        build_engine(BuildOptions(checkpoint=checkpoint, out=tmp_path / "engine", tp=2, backend="trt", precision="fp16"))
    assert not (tmp_path / "engine").exists()
    monkeypatch.delenv(trt_plugin.LIBRARY_ENV)
    if not plugin_library_found():  # no tensorrt_llm package here: the message says what to install or set
        with pytest.raises(trt_plugin.PluginLibraryMissing, match=f"tensorrt_llm package .* or set {trt_plugin.LIBRARY_ENV}"):
            trt_plugin.find_plugin_library()


def test_each_rank_hands_the_parser_all_reduce_nodes_as_the_tensorrt_llm_plugin_over_every_rank(
        checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    library = tmp_path / trt_plugin.LIBRARY_NAME
    library.write_bytes(b"")  # found, never loaded: the plan build is the recorder below
    monkeypatch.setenv(trt_plugin.LIBRARY_ENV, str(library))
    monkeypatch.setattr(builder, "tensorrt_available", lambda: True)
    calls: list[dict[str, Any]] = []

    def record(model_path: Path, plan_path: Path, num_layers: int, kv_heads: int, head_dim: int,
               plugin_library: Path, options: TensorRTOptions, previous: Path | None) -> dict[str, Any]:
        graph = onnx.load(str(model_path), load_external_data=False).graph
        nodes = [n for n in graph.node if n.op_type == trt_plugin.PLUGIN_NAME]
        calls.append({"model": model_path, "kv_heads": kv_heads, "library": plugin_library, "options": options,
                      "nodes": [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes],
                      "external_data": (model_path.parent / (model_path.name + ".data")).is_file()})
        plan_path.write_bytes(b"plan")
        return {"plan_file": plan_path.name, "plugins": ["llamaforge::LlamaAttention", trt_plugin.PLUGIN_ID]}

    monkeypatch.setattr(tp_build, "build_rank_plan", record)
    config = tiny_config()
    out = build_engine(BuildOptions(checkpoint=checkpoint, out=tmp_path / "engine", tp=2, backend="trt",
                                    precision="fp16", tensorrt=TRT_OPTIONS))
    assert len(calls) == 2, "one plan per rank"
    for rank, call in enumerate(calls):
        assert call["model"].parent.name == f"rank{rank}" and call["external_data"]
        assert call["library"] == library and call["options"] == TRT_OPTIONS
        assert call["kv_heads"] == config.num_kv_heads // 2
        assert len(call["nodes"]) == 2 * config.num_layers, "o_proj and down_proj of every layer"
        for fields in call["nodes"]:
            assert fields["plugin_namespace"] == b"tensorrt_llm" and fields["plugin_version"] == b"1"
            assert fields["group"] == [0, 1], "one group of every rank"
            assert fields["type_id"] == trt_plugin.TRT_DATA_TYPES["FLOAT16"]
            assert (fields["strategy"], fields["fusion_op"]) == (trt_plugin.STRATEGY_NCCL, trt_plugin.FUSION_NONE)
        manifest = json.loads((out / f"rank{rank}" / "manifest.json").read_text())
        assert manifest["backend"] == "trt" and manifest["tensorrt"]["plan_file"] == PLAN_FILE
        assert (out / f"rank{rank}" / PLAN_FILE).read_bytes() == b"plan"
    assert json.loads((out / "manifest.json").read_text())["tensor_parallel"]["size"] == 2


@pytest.mark.skipif(not tensorrt_available() or not plugin_library_found(),
                    reason="needs NVIDIA TensorRT (tensorrt.Builder), TensorRT-LLM's plugin library and a GPU")
def test_tp2_trt_plans_build(checkpoint: Path, tmp_path: Path) -> None:
    out = build_engine(BuildOptions(checkpoint=checkpoint, out=tmp_path / "engine", tp=2, backend="trt",
                                    precision="fp16", tensorrt=TRT_OPTIONS))
    for rank in range(2):
        manifest = json.loads((out / f"rank{rank}" / "manifest.json").read_text())
        assert trt_plugin.PLUGIN_ID in manifest["tensorrt"]["plugins"]
        assert (out / f"rank{rank}" / PLAN_FILE).stat().st_size > 0
