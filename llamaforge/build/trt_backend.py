"""TensorRT engine build (BACKEND=trt): pass-processed ONNX -> `engine.plan`, with TensorRT 10's Python API.

  parse     OnnxParser.parse_from_file on the engine's model.onnx, so weights stream from its
            external data; the network is STRONGLY_TYPED (explicit quantization: Q/DQ and the
            graph's own types decide every precision; no FP16/INT8 builder flags) and prefers AOT
            Python plugins, so `llamaforge::LlamaAttention` runs the PTX that
            plugins/attention/trt_plugin.py compiled into the engine (no Python at run time).
  profiles  0 "context" (prefill) and 1 "generation" (decode), from MAX_BATCH, MAX_INPUT_LEN and
            MAX_KV_TOKENS (`optimization_profiles`).
  config    workspace memory-pool limit, builder optimization level, a timing cache loaded before
            and saved after the build, tqdm bars from TensorRT's IProgressMonitor.

Importing this module needs no TensorRT; `build_plan` needs the real library (checked by the caller).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from llamaforge.plugins.all_reduce import trt_plugin as all_reduce_trt
from llamaforge.plugins.attention import trt_plugin
from llamaforge.plugins.cross_attention import trt_plugin as cross_trt_plugin

if TYPE_CHECKING:
    import tensorrt as trt

PLAN_FILE = "engine.plan"
TIMING_CACHE_FILE = "timing.cache"
CONTEXT_PROFILE, GENERATION_PROFILE = "context", "generation"


class TensorRTBuildError(RuntimeError):
    """The TensorRT build cannot proceed; the message names the input, node or setting."""


@dataclass(frozen=True)
class ProfileLimits:
    """What the engine must accept: MAX_BATCH rows, prompts (or prefill chunks) of up to
    MAX_INPUT_LEN tokens, and a KV cache of up to MAX_KV_TOKENS positions per row."""

    max_batch: int = 8
    max_input_len: int = 512
    max_kv_tokens: int = 2048

    def validate(self, max_positions: int) -> None:
        for name, value in (("MAX_BATCH", self.max_batch), ("MAX_INPUT_LEN", self.max_input_len),
                            ("MAX_KV_TOKENS", self.max_kv_tokens)):
            if value < 1:
                raise TensorRTBuildError(f"{name}={value} must be at least 1")
        if self.max_kv_tokens < self.max_input_len:
            raise TensorRTBuildError(f"MAX_KV_TOKENS={self.max_kv_tokens} must be at least MAX_INPUT_LEN="
                                     f"{self.max_input_len}: a prompt's tokens are written to the KV cache")
        if max_positions and self.max_kv_tokens > max_positions:
            raise TensorRTBuildError(f"MAX_KV_TOKENS={self.max_kv_tokens} exceeds the model's context length "
                                     f"({max_positions} positions)")


Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def optimization_profiles(num_layers: int, num_kv_heads: int, head_dim: int, limits: ProfileLimits) -> list[Profile]:
    """Profile 0 "context": input_ids [1..B, 1..S] (opt [1, S]: one long prompt is the latency-critical
    prefill), past_lengths [1..B], logits_index [1..B, 1..S] (opt one per row), caches
    [1..B, kv_heads, 1..C, head_dim] (opt capacity S).
    Profile 1 "generation": one new token per row, input_ids [1..B, 1] (opt [B, 1]: decode batches
    run full under in-flight batching), caches opt capacity C/2. B = MAX_BATCH, S = MAX_INPUT_LEN,
    C = MAX_KV_TOKENS; the KV cache is the plugin's bhcd-slots layout."""
    b, s, c = limits.max_batch, limits.max_input_len, limits.max_kv_tokens

    def shapes(ids: tuple[Shape, Shape, Shape], batch: tuple[int, int, int],
               capacity: tuple[int, int, int]) -> dict[str, tuple[Shape, Shape, Shape]]:
        # logits_index [B, N]: at most one position per input token; opt one per row (serving).
        logits = ((ids[0][0], 1), (ids[1][0], 1), ids[2])
        out = {"input_ids": ids, "past_lengths": ((batch[0],), (batch[1],), (batch[2],)), "logits_index": logits}
        lo, opt, hi = ((batch[i], num_kv_heads, capacity[i], head_dim) for i in range(3))
        for layer in range(num_layers):
            out[f"past_key.{layer}"] = out[f"past_value.{layer}"] = (lo, opt, hi)
        return out

    context = shapes(((1, 1), (1, s), (b, s)), (1, 1, b), (1, s, c))
    generation = shapes(((1, 1), (b, 1), (b, 1)), (1, b, b), (1, max(1, c // 2), c))
    return [Profile(CONTEXT_PROFILE, context), Profile(GENERATION_PROFILE, generation)]


@dataclass
class TensorRTOptions:
    limits: ProfileLimits = field(default_factory=ProfileLimits)
    timing_cache: Path | None = None  # None: <engine dir>/timing.cache, carried over from the previous engine
    workspace_bytes: int | None = None  # None: TensorRT's default (the device's memory)
    optimization_level: int = 3  # TensorRT's builder optimization level, 0..5 (its default is 3)
    verbose: bool = False


def tensorrt_version() -> str:
    import tensorrt as trt

    return str(trt.__version__)


# Each plugin op's TensorRT creator: its id -> (its name, its version); the namespace is the id's prefix.
PLUGINS = {trt_plugin.PLUGIN_ID: (trt_plugin.PLUGIN_NAME, trt_plugin.QDP_PLUGIN_VERSION),
           cross_trt_plugin.PLUGIN_ID: (cross_trt_plugin.PLUGIN_NAME, cross_trt_plugin.QDP_PLUGIN_VERSION),
           all_reduce_trt.PLUGIN_ID: (all_reduce_trt.PLUGIN_NAME, all_reduce_trt.PLUGIN_VERSION)}


def register_plugins() -> None:
    """Register llama-forge's TensorRT plugins (the attention op's and the cross-attention op's); the
    ONNX parser needs them before it meets the nodes."""
    try:
        trt_plugin.register()
        cross_trt_plugin.register()
    except trt_plugin.TensorRTUnavailable as e:  # one class for both plugins (plugins/trt_aot.py)
        raise TensorRTBuildError(f"BACKEND=trt: {e}") from None


def _check_plugin_registered(builder: trt.Builder, plugin_ids: Sequence[str]) -> None:
    for plugin_id in plugin_ids:
        name, version = PLUGINS[plugin_id]
        creator = builder.get_plugin_registry().get_creator(name, version, plugin_id.split("::")[0])
        if creator is None:
            raise TensorRTBuildError(f"the TensorRT plugin {plugin_id} (version {version}) is not in TensorRT's "
                                     f"plugin registry after registration; the ONNX parser could not import the "
                                     f"{name} nodes")


def _parse(parser: trt.OnnxParser, model_path: Path) -> None:
    # From the file, not bytes: the parser then reads external data (model.onnx.data) itself.
    if parser.parse_from_file(str(model_path)):
        return
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        errors.append(f"node {err.node_name()!r} ({err.node_operator()}): {err.desc()}")
    raise TensorRTBuildError(f"{model_path}: TensorRT's ONNX parser rejected the graph:\n  " + "\n  ".join(errors))


def _add_profiles(builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig,
                  profiles: Sequence[Profile]) -> None:
    import tensorrt as trt

    names = [network.get_input(i).name for i in range(network.num_inputs)]
    for spec in profiles:
        missing = sorted(set(names) - set(spec.shapes))
        if missing:
            raise TensorRTBuildError(f"profile {spec.name!r}: no shapes for network input(s) {missing}")
        profile = builder.create_optimization_profile()
        for name in names:
            lo, opt, hi = (trt.Dims(list(s)) for s in spec.shapes[name])
            try:
                profile.set_shape(name, lo, opt, hi)
            except ValueError as e:
                raise TensorRTBuildError(f"profile {spec.name!r}, input {name!r}: {e}") from None
        if config.add_optimization_profile(profile) < 0:
            raise TensorRTBuildError(f"profile {spec.name!r}: TensorRT rejected it (min <= opt <= max per input?)")


def _load_timing_cache(config: trt.IBuilderConfig, path: Path | None) -> trt.ITimingCache:
    data = path.read_bytes() if path is not None and path.exists() else b""
    cache = config.create_timing_cache(data)
    # ignore_mismatch=False: a cache from another GPU or TensorRT version is not applied.
    if not config.set_timing_cache(cache, False) and data:
        print(f"warning: timing cache {path} does not match this GPU / TensorRT; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def _save_atomically(path: Path, data: memoryview | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _progress_monitor() -> trt.IProgressMonitor:
    """TensorRT's build phases as nested tqdm bars. TensorRT calls back from its own threads."""
    import tensorrt as trt

    class TqdmProgressMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()
            self._bars: dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
            with self._lock:
                self._bars[phase_name] = tqdm(total=num_steps, desc=phase_name, position=len(self._bars),
                                              leave=parent_phase is None, unit="step")

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                bar = self._bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                bar = self._bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return TqdmProgressMonitor()


def build_plan(model_path: Path, plan_path: Path, num_layers: int, num_kv_heads: int, head_dim: int,
               options: TensorRTOptions, previous_timing_cache: Path | None = None) -> dict[str, Any]:
    """Build `plan_path` from a text model's ONNX graph at `model_path` (its two profiles,
    `optimization_profiles`); returns what the manifest records.

    The timing cache is read from `options.timing_cache` (or `previous_timing_cache`, the one the
    engine being replaced carried) and written next to the plan (and to `options.timing_cache`).
    """
    profiles = optimization_profiles(num_layers, num_kv_heads, head_dim, options.limits)
    return build_plan_with_profiles(model_path, plan_path, profiles, [trt_plugin.PLUGIN_ID], options,
                                    previous_timing_cache)


def build_rank_plan(model_path: Path, plan_path: Path, num_layers: int, kv_heads_per_rank: int, head_dim: int,
                    plugin_library: Path, options: TensorRTOptions,
                    previous_timing_cache: Path | None = None) -> dict[str, Any]:
    """`build_plan` for one tensor-parallel rank's graph: TensorRT-LLM's plugin library loaded and its
    creators registered first (the ONNX parser imports each all-reduce node as `tensorrt_llm::AllReduce`
    through them), the KV inputs' profiles at the rank's KV heads. The plan is built on the current
    GPU; the plugin opens no NCCL communicator while building, so one GPU builds every rank's plan."""
    try:
        all_reduce_trt.load_plugin_library(plugin_library)
    except all_reduce_trt.PluginLibraryMissing as e:
        raise TensorRTBuildError(f"BACKEND=trt TP: {e}") from None
    profiles = optimization_profiles(num_layers, kv_heads_per_rank, head_dim, options.limits)
    return build_plan_with_profiles(model_path, plan_path, profiles, [trt_plugin.PLUGIN_ID, all_reduce_trt.PLUGIN_ID],
                                    options, previous_timing_cache)


def build_plan_with_profiles(model_path: Path, plan_path: Path, profiles: Sequence[Profile], plugin_ids: Sequence[str],
                             options: TensorRTOptions, previous_timing_cache: Path | None = None) -> dict[str, Any]:
    """`build_plan` for any graph: its optimization profiles and the plugin ops it holds given."""
    import tensorrt as trt

    register_plugins()
    logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    _check_plugin_registered(builder, plugin_ids)
    flags = (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) | (
        1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    _parse(parser, model_path)

    config = builder.create_builder_config()
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if not 0 <= options.optimization_level <= 5:
        raise TensorRTBuildError(f"TRT_OPT_LEVEL={options.optimization_level} is not in 0..5")
    config.builder_optimization_level = options.optimization_level
    monitor = _progress_monitor()  # TensorRT does not own it: keep it alive until the build is done
    config.progress_monitor = monitor
    _add_profiles(builder, network, config, profiles)
    cache_in = options.timing_cache if options.timing_cache is not None else previous_timing_cache
    timing_cache = _load_timing_cache(config, cache_in)

    serialized = builder.build_serialized_network(network, config)
    del monitor
    if serialized is None:
        raise TensorRTBuildError(f"{model_path}: TensorRT could not build an engine (its log above says why)")
    _save_atomically(plan_path, memoryview(serialized))
    cache_bytes = memoryview(timing_cache.serialize())
    _save_atomically(plan_path.with_name(TIMING_CACHE_FILE), cache_bytes)
    if options.timing_cache is not None:
        _save_atomically(options.timing_cache, cache_bytes)
    return {
        "plan_file": plan_path.name,
        "tensorrt_version": str(trt.__version__),
        "strongly_typed": True,
        "plugins": list(plugin_ids),
        "builder_optimization_level": options.optimization_level,
        "workspace_bytes": options.workspace_bytes,
        "timing_cache": {"file": TIMING_CACHE_FILE, "loaded_from": str(cache_in) if cache_in else None},
        "profiles": [{"index": i, "name": p.name,
                      "shapes": {k: {"min": v[0], "opt": v[1], "max": v[2]} for k, v in p.shapes.items()}}
                     for i, p in enumerate(profiles)],
        "limits": {"max_batch": options.limits.max_batch, "max_input_len": options.limits.max_input_len,
                   "max_kv_tokens": options.limits.max_kv_tokens},
    }
