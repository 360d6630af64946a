"""BACKEND=trt: optimization profiles, limits, CLI wiring, fail-fast without TensorRT, the mypy check
of the builder against tensorrt-stubs, and (where TensorRT and a GPU exist) a real engine build."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from tiny_models import make_hf_checkpoint, tiny_config
from typecheck import link_tree

from llamaforge import cli
from llamaforge.build.builder import BuildOptions, build_engine, tensorrt_available
from llamaforge.build.trt_backend import (
    PLAN_FILE,
    TIMING_CACHE_FILE,
    ProfileLimits,
    TensorRTBuildError,
    TensorRTOptions,
    optimization_profiles,
)
from llamaforge.export.exporter import trace

ROOT = Path(__file__).resolve().parents[2]
TYPED_MODULES = ["llamaforge.build.trt_backend", "llamaforge.graphs.trt_ops", "llamaforge.plugins.attention.trt_plugin",
                 "llamaforge.build.mllama_trt", "llamaforge.plugins.cross_attention.trt_plugin",
                 "llamaforge.plugins.all_reduce.trt_plugin", "llamaforge.build.tensor_parallel"]


def test_profiles_cover_every_graph_input_with_consistent_shapes() -> None:
    cfg = tiny_config()
    graph = trace(cfg, "fp16").graph
    limits = ProfileLimits(max_batch=4, max_input_len=64, max_kv_tokens=256)
    context, generation = optimization_profiles(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, limits)
    assert (context.name, generation.name) == ("context", "generation")
    inputs = {v.name: v for v in graph.inputs}
    for profile in (context, generation):
        assert set(profile.shapes) == set(inputs), profile.name
        for name, (lo, opt, hi) in profile.shapes.items():
            dims = inputs[name].shape
            assert len(lo) == len(opt) == len(hi) == len(dims), name
            for d, a, b, c in zip(dims, lo, opt, hi):
                assert 1 <= a <= b <= c, (profile.name, name, lo, opt, hi)
                if isinstance(d, int):  # static dims (kv heads, head dim) are pinned to the graph's
                    assert a == b == c == d, (profile.name, name)
    assert context.shapes["input_ids"] == ((1, 1), (1, 64), (4, 64))
    assert generation.shapes["input_ids"] == ((1, 1), (4, 1), (4, 1)), "decode: one new token per row"
    assert context.shapes["past_key.0"][2] == (4, cfg.num_kv_heads, 256, cfg.head_dim)
    assert generation.shapes["past_value.1"][1] == (4, cfg.num_kv_heads, 128, cfg.head_dim)
    assert generation.shapes["past_lengths"] == ((1,), (4,), (4,))


@pytest.mark.parametrize("limits, message", [
    (ProfileLimits(max_batch=0), "MAX_BATCH=0 must be at least 1"),
    (ProfileLimits(max_input_len=1024, max_kv_tokens=512), "MAX_KV_TOKENS=512 must be at least MAX_INPUT_LEN=1024"),
    (ProfileLimits(max_kv_tokens=1 << 20), "exceeds the model's context length"),
])
def test_bad_limits_are_named(limits: ProfileLimits, message: str) -> None:
    with pytest.raises(TensorRTBuildError, match=message):
        limits.validate(max_positions=131072)


def test_cli_flags_reach_the_builder_options() -> None:
    args = cli.parser().parse_args(["build", "--backend", "trt", "--max-batch", "16", "--max-input-len", "256",
                                    "--max-kv-tokens", "4096", "--timing-cache", "/tmp/x.cache",
                                    "--trt-workspace-gib", "2", "--trt-opt-level", "5"])
    opts = cli._tensorrt_options(args)
    assert opts.limits == ProfileLimits(16, 256, 4096)
    assert opts.timing_cache == Path("/tmp/x.cache") and opts.workspace_bytes == 2 << 30
    assert opts.optimization_level == 5
    defaults = cli._tensorrt_options(cli.parser().parse_args(["build"]))
    assert defaults == TensorRTOptions()


def test_cli_trt_without_tensorrt_exits_with_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs gives
    rc = cli.main(["build", "--model", "llama3.2-1b", "--weights", "none", "--backend", "trt",
                   "--out", str(tmp_path / "e")])
    assert rc == 2
    assert "BACKEND=trt needs NVIDIA TensorRT" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


# -- mypy against tensorrt-stubs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as mypy reads it (links), with the repaired tensorrt-stubs in tree/stubs."""
    return link_tree(tmp_path_factory.mktemp("typecheck"))


def mypy(args: list[str], tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *args],
                          cwd=tree, capture_output=True, text=True, timeout=600,
                          env={"MYPYPATH": "stubs", "PATH": "/usr/bin:/bin"})


@pytest.mark.slow
def test_builder_type_checks_against_tensorrt_stubs(tree: Path) -> None:
    result = mypy([arg for module in TYPED_MODULES for arg in ("-m", module)], tree)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_mypy_catches_tensorrt_api_misuse(tree: Path) -> None:
    """The check above means something only if the stubs are really used: a misspelt TensorRT method
    and a wrong argument type in a copy of the builder must be reported."""
    source = (ROOT / "llamaforge/build/trt_backend.py").read_text()
    broken = source.replace("config.set_memory_pool_limit(", "config.set_memory_pool_limt(").replace(
        "parser.parse_from_file(str(model_path))", "parser.parse_from_file(model_path)")
    assert broken.count("set_memory_pool_limt") == 1 and "parse_from_file(model_path)" in broken
    copy = tree / "trt_build_broken.py"
    copy.write_text(broken)
    result = mypy([copy.name], tree)
    assert result.returncode == 1
    assert '"IBuilderConfig" has no attribute "set_memory_pool_limt"' in result.stdout
    assert 'Argument 1 to "parse_from_file" of "OnnxParser" has incompatible type "Path"; expected "str"' in result.stdout


# -- a real build (TensorRT + GPU only) -------------------------------------------------------------------


@pytest.mark.skipif(not tensorrt_available(), reason="needs NVIDIA TensorRT (tensorrt.Builder) and a GPU")
def test_trt_engine_build_and_timing_cache_reuse(tmp_path: Path) -> None:
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", tiny_config(), seed=3)
    out = tmp_path / "engine"
    opts = BuildOptions(checkpoint=ckpt, out=out, precision="fp16", backend="trt",
                        tensorrt=TensorRTOptions(limits=ProfileLimits(2, 16, 64), optimization_level=0))
    build_engine(opts)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "trt" and (out / PLAN_FILE).stat().st_size > 0
    assert [p["name"] for p in manifest["tensorrt"]["profiles"]] == ["context", "generation"]
    assert (out / TIMING_CACHE_FILE).exists() and manifest["tensorrt"]["timing_cache"]["loaded_from"] is None
    build_engine(opts)  # the rebuild starts from the replaced engine's timing cache
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tensorrt"]["timing_cache"]["loaded_from"] == str(out / TIMING_CACHE_FILE)
