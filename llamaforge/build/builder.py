"""The build stage: checkpoint -> traced graph -> pass pipeline -> engine directory.

An engine directory holds `model.onnx` + `model.onnx.data`, the tokenizer, and `manifest.json`.
It is assembled in a temporary sibling directory and renamed into place, so a failed build
never leaves a partial engine behind and never clobbers a previous good one.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from llamaforge.build.atomic import staged_dir
from llamaforge.build.errors import BuildError
from llamaforge.build.mllama import build_mllama_engine
from llamaforge.build.trt_backend import PLAN_FILE, TIMING_CACHE_FILE, TensorRTBuildError, TensorRTOptions, build_plan
from llamaforge.export.checkpoint_base import Checkpoint
from llamaforge.export.checkpoint_errors import CheckpointError
from llamaforge.export.config import ModelConfig
from llamaforge.export.exporter import (
    PRECISIONS,
    bind_placeholder_weights,
    export_model,
    model_source,
    save_streaming,
    timed,
    tqdm_progress,
)
from llamaforge.export.mllama_checkpoint import MllamaCheckpoint
from llamaforge.export.tensor_parallel import RankShard
from llamaforge.export.tokenizer_files import copy_tokenizer
from llamaforge.export.variants import VARIANTS, UnknownVariantError
from llamaforge.graphs.pipeline import pipeline, run_pipeline
from llamaforge.graphs.quantization.awq import awq_search
from llamaforge.graphs.quantization.calibrate import (
    CalibrationError,
    CalibrationText,
    calibrate,
    calibration_batch,
    read_calibration_text,
)
from llamaforge.graphs.quantization.int4 import INT4_PRECISIONS
from llamaforge.graphs.quantization.int4_shapes import int4_weight_problems
from llamaforge.graphs.quantization.recipes import (
    DEFAULT_FP8_ACTIVATION_SCALE,
    DEFAULT_FP8_WEIGHT_SCALE,
    DEFAULT_FP8_WEIGHTS,
    QUANT_PRECISIONS,
    CalibrationStats,
    QuantConfig,
    QuantContext,
    QuantizationError,
    ValueHeads,
    ort_session_config,
)
from llamaforge.graphs.quantization.search import backend_int8_activation, layer_search
from llamaforge.graphs.quantization.sharding import shard_stats
from llamaforge.plugins.attention.schema import KV_LAYOUT
from llamaforge.runtime.core.manifest import (
    MANIFEST_FILE,
    EngineManifest,
    KVCacheInfo,
    KVQuantization,
    QuantizationInfo,
    SpecialTokens,
    TensorInfo,
    TokenizerInfo,
)
from llamaforge.runtime.core.tokenizer import load_tokenizer

MANIFEST = MANIFEST_FILE
MODEL_FILE = "model.onnx"
CALIBRATION_FILE = "calibration.safetensors"
FORMAT_VERSION = 1
BACKENDS = ("ort", "trt")
__all__ = ["BuildError", "BuildOptions", "build_engine", "tensorrt_available"]


@dataclass
class BuildOptions:
    model: str | None = None
    checkpoint: Path | None = None
    out: Path | None = None
    precision: str = "fp32"
    backend: str = "ort"
    weights: bool = True
    dump_after: Sequence[str] = ()
    dump_dir: Path | None = None
    # Quantization (PRECISION=fp8|int8-sq|int8-wo, KV_CACHE=fp8): calibrated on CALIB (default: the
    # demo model's held-out text); see graphs/quantization/recipes.py.
    kv_cache: str | None = None
    calib: Path | None = None
    smoothquant_alpha: float | None = None  # int8-sq, int8-wo fast: None = searched per layer at calibration
    int8_activation: str | None = None  # int8-sq: per-token | static; None = per-token (ort), static (trt)
    fp8_activation_scale: str = DEFAULT_FP8_ACTIVATION_SCALE  # fp8: amax | percentile | mse
    fp8_weight_scale: str = DEFAULT_FP8_WEIGHT_SCALE  # fp8: amax | mse
    fp8_weights: str = DEFAULT_FP8_WEIGHTS  # fp8: per-tensor | per-channel (ort only)
    quantize_lm_head: bool | None = None  # None: QuantConfig.with_lm_head_default (on for int8-wo/int4-* on ORT fast)
    int4_block_size: int = 128  # PRECISION=int4-*: input channels per weight scale
    ort_kernels: str = "fast"  # int8-wo / int4-*: fast (MatMulNBits) | exact (the Q/DQ graph), see recipes.ORT_KERNELS
    tensorrt: TensorRTOptions = field(default_factory=TensorRTOptions)  # BACKEND=trt only
    tp: int = 1  # TP=N: one graph per rank in rank{i}/ (llamaforge/build/tensor_parallel.py)


def tensorrt_available() -> bool:
    """True only for the real TensorRT library: `tensorrt-stubs` makes the import succeed too."""
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")


def tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("llama-forge", "torch", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def io_spec(proto_graph: onnx.GraphProto) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The graph's inputs and outputs as the manifest lists them."""
    def spec(vi: onnx.ValueInfoProto) -> TensorInfo:
        t = vi.type.tensor_type
        dims: list[int | str] = [d.dim_param or d.dim_value for d in t.shape.dim]
        return TensorInfo(vi.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims)

    return [spec(v) for v in proto_graph.input], [spec(v) for v in proto_graph.output]


def _cache_writers(graph: onnx.GraphProto) -> list[onnx.NodeProto | None]:
    """The node that produces each present_key / present_value output (None where none does)."""
    producers = {out: node for node in graph.node for out in node.output}
    return [producers.get(o.name) for o in graph.output if o.name.startswith(("present_key.", "present_value."))]


def _is_gqa(node: onnx.NodeProto | None) -> bool:
    return node is not None and (node.domain, node.op_type) == ("com.microsoft", "GroupQueryAttention")


def decode_writes_cache_in_place(graph: onnx.GraphProto) -> bool:
    """Whether every layer's cache update, in a decode call (seq 1), is ORT's GroupQueryAttention:
    the GQA node itself, or the fallback `If`'s then-branch (plugins/attention/ort_lowering.py),
    which decode calls always take. That kernel writes the new token into the cache without copying
    the past when past and present are one buffer, so the runtime may bind them together
    (runtime/core/engine.py)."""
    writers = _cache_writers(graph)
    for node in writers:
        if node is not None and node.op_type == "If":
            then = next((a.g for a in node.attribute if a.name == "then_branch"), None)
            if then is None or not any(_is_gqa(n) for n in then.node):
                return False
        elif not _is_gqa(node):
            return False
    return bool(writers)


def takes_batched_continuation(graph: onnx.GraphProto) -> bool:
    """False when some layer's attention is a GroupQueryAttention node in the main graph (no fallback
    `If` around it): the kernel refuses a call of several rows that continue after a past, which
    the runtime then runs one row at a time."""
    return not any(_is_gqa(node) for node in graph.node)


def manifest_for(config: ModelConfig, opts: BuildOptions, graph: onnx.GraphProto, tokenizer: dict[str, Any],
                 passes: list[str], source: dict[str, Any]) -> EngineManifest:
    """The manifest of an unquantized ORT engine; `tokenizer` is copy_tokenizer's entry ({"kind": "none"}
    for none). build_engine adds what quantization and TensorRT add."""
    kv_dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[activation_precision(opts.precision)]
    inputs, outputs = io_spec(graph)
    return EngineManifest(
        format_version=FORMAT_VERSION,
        variant=config.name,
        config=config.to_dict(),
        precision=opts.precision,
        backend=opts.backend,
        weights="checkpoint" if opts.weights else "none",
        model_file=MODEL_FILE,
        external_data=MODEL_FILE + ".data",
        inputs=inputs,
        outputs=outputs,
        kv_cache=KVCacheInfo(
            layout=KV_LAYOUT,
            dtype=kv_dtype,
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            max_capacity=config.max_position_embeddings,
            past_inputs=["past_key.{layer}", "past_value.{layer}"],
            present_outputs=["present_key.{layer}", "present_value.{layer}"],
            lengths_input="past_lengths",
            decode_in_place=decode_writes_cache_in_place(graph),
            batched_continuation=None if takes_batched_continuation(graph) else False,
        ),
        special_tokens=SpecialTokens(config.bos_token_id, list(config.eos_token_id), config.pad_token_id),
        tokenizer=None if tokenizer.get("kind", "none") == "none" else
        TokenizerInfo.from_json(tokenizer, "copy_tokenizer's entry"),
        passes=passes,
        source=source,
        tools=tool_versions(),
    )


def _check_out_dir(out: Path) -> None:
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"OUT={out}: cannot create parent directory {parent}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BuildError(f"OUT={out}: directory {parent} is not writable")
    if out.exists() and not out.is_dir():
        raise BuildError(f"OUT={out}: exists and is not a directory")


def _build_tensorrt_plan(model_path: Path, plan_path: Path, config: ModelConfig, opts: BuildOptions,
                         out: Path) -> dict[str, Any]:
    previous_cache = out / TIMING_CACHE_FILE  # the engine being replaced carries the last build's timings
    try:
        return build_plan(model_path, plan_path, config.num_layers, config.num_kv_heads, config.head_dim,
                          opts.tensorrt, previous_cache if previous_cache.exists() else None)
    except TensorRTBuildError as e:
        raise BuildError(str(e)) from None


def activation_precision(precision: str) -> str:
    """The traced graph's dtype: quantized precisions quantize an fp32 graph."""
    return "fp32" if precision in QUANT_PRECISIONS else precision


def _calibration_text(opts: BuildOptions) -> CalibrationText:
    try:
        return read_calibration_text(opts.calib)
    except CalibrationError as e:
        raise BuildError(str(e)) from None


def layer_search_for(quant: QuantConfig | None, text: CalibrationText, tokens: Any, config: ModelConfig) -> Any:
    """The per-layer search calibration runs for `quant`: AWQ's scales (int4-awq), SmoothQuant's alpha
    or fp8's clip (graphs/quantization/search.py), or None. Told `config`'s heads, so o_proj's factors
    come out tied as the passes fold them (recipes.ValueHeads)."""
    heads = ValueHeads.of(config)
    if quant is not None and quant.precision == "int4-awq":
        return awq_search(quant.int4_block_size, text, tokens, heads)
    return layer_search(quant, text, tokens, heads) if quant is not None else None


def _calibrate(ckpt: Checkpoint, text: CalibrationText, tmp: Path, quant: QuantConfig | None = None) -> CalibrationStats:
    """Calibration statistics for a quantized build (PyTorch, one decoder layer in memory at a time);
    int4-awq adds AWQ's per-layer scale search (graphs/quantization/awq.py) to the same pass."""
    try:
        tokenizer = load_tokenizer(tmp, copy_tokenizer(ckpt, tmp))
        tokens = calibration_batch(tokenizer, text, seq_len=min(256, ckpt.config.max_position_embeddings))
    except CalibrationError as e:
        raise BuildError(str(e)) from None
    print(f"calibration data: {text.source}")
    try:
        stats = calibrate(ckpt, tokens, search=layer_search_for(quant, text, tokens, ckpt.config))
    except CalibrationError as e:
        raise BuildError(str(e)) from None
    stats.source = text.source
    return stats


def quantized_manifest(manifest: EngineManifest, quant: Any, stats: Any, backend: str) -> EngineManifest:
    """The manifest of a quantized engine: what was quantized, on which data, the ONNX Runtime session
    settings it needs (applied by runtime/core/engine.py; see graphs.quantization.ort_session_config)
    and, for KV_CACHE=fp8, how the cache is rounded (the runtime allocates kv_cache.dtype)."""
    info = QuantizationInfo.from_json({**quant.describe(), "calibration": stats.describe(), "statistics": CALIBRATION_FILE},
                                      "the quantization recipe's description")
    kv_cache = manifest.kv_cache
    if quant.kv_cache == "fp8":
        kv_cache = replace(kv_cache, quantization=KVQuantization("float8e4m3fn", simulated=backend == "ort"))
    return replace(manifest, quantization=info, kv_cache=kv_cache,
                   ort_session_config=ort_session_config(quant.precision, quant.kv_cache, quant.ort_kernels))


def _refuse_tp(opts: BuildOptions, what: str) -> None:
    if opts.tp != 1:
        raise BuildError(f"TP={opts.tp}: tensor-parallel engines of {what} are not supported yet; build with TP=1")


def build_engine(opts: BuildOptions) -> Path:
    if opts.backend not in BACKENDS:
        raise BuildError(f"BACKEND={opts.backend!r} is not one of {list(BACKENDS)}")
    if opts.backend == "trt" and not tensorrt_available():
        raise BuildError(
            "BACKEND=trt needs NVIDIA TensorRT (the Python package with tensorrt.Builder), which is not "
            "installed here (an importable 'tensorrt' with no Builder is only the type stubs). Install it with "
            "`pip install .[tensorrt]` on a machine with a GPU, or use BACKEND=ort."
        )
    if opts.backend == "trt" and not opts.weights:
        raise BuildError("BACKEND=trt needs the checkpoint's weights (WEIGHTS=none builds ONNX graphs only)")
    if opts.precision not in PRECISIONS and opts.precision not in QUANT_PRECISIONS:
        raise BuildError(f"PRECISION={opts.precision!r} is not one of {sorted(PRECISIONS) + list(QUANT_PRECISIONS)}")
    try:
        quant = QuantConfig(opts.precision if opts.precision in QUANT_PRECISIONS else None, opts.kv_cache,
                            opts.smoothquant_alpha, bool(opts.quantize_lm_head), int4_block_size=opts.int4_block_size,
                            # ONNX Runtime's kernels: TensorRT builds the exact Q/DQ graph whatever was asked
                            ort_kernels=opts.ort_kernels if opts.backend == "ort" else "exact",
                            int8_activation=backend_int8_activation(opts.backend, opts.int8_activation),
                            fp8_activation_scale=opts.fp8_activation_scale, fp8_weight_scale=opts.fp8_weight_scale,
                            fp8_weights=opts.fp8_weights)
        if opts.backend == "trt" and quant.precision == "fp8" and quant.fp8_weights == "per-channel":
            raise QuantizationError("--fp8-weights per-channel: TensorRT's ONNX path takes per-tensor FP8 weights (NVIDIA's "
                                    "Model Optimizer exports no other FP8 form to ONNX); use per-tensor with BACKEND=trt")
    except QuantizationError as e:
        raise BuildError(str(e)) from None
    if quant.active and opts.checkpoint is None:
        raise BuildError(f"PRECISION={opts.precision} KV_CACHE={opts.kv_cache}: quantization is calibrated on the "
                         "checkpoint's weights; CHECKPOINT= is required")
    if opts.calib is not None and not quant.active:
        raise BuildError(f"CALIB={opts.calib}: calibration data is only used by PRECISION={'|'.join(QUANT_PRECISIONS)} "
                         "or KV_CACHE=fp8")
    calib_text = _calibration_text(opts) if quant.active else None  # bad CALIB fails before the export

    if opts.checkpoint is None and opts.weights:
        raise BuildError("CHECKPOINT= is required (or WEIGHTS=none to build the graph alone)")
    if opts.checkpoint is None and not opts.model:
        raise BuildError("MODEL= is required with WEIGHTS=none")
    vision_variant = VARIANTS.get(opts.model or "")
    if opts.checkpoint is None and vision_variant is not None and vision_variant.vision is not None:
        _refuse_tp(opts, "Llama 3.2 Vision")
        out = opts.out or Path("engines") / vision_variant.name  # graph only (WEIGHTS=none: checked above)
        _check_out_dir(out)
        return build_mllama_engine(opts, vision_variant.config, vision_variant.vision, None,
                                   {"checkpoint": None, "registry": opts.model}, out, quant)
    try:
        ckpt, config = model_source(opts.model, opts.checkpoint)  # a checkpoint's every header is validated
    except UnknownVariantError as e:
        raise BuildError(f"MODEL: {e.args[0] if e.args else e}") from None
    except CheckpointError as e:
        raise BuildError(str(e)) from None
    source: dict[str, Any]
    if ckpt is not None:
        for w in ckpt.warnings:
            print(f"warning: {opts.checkpoint}: {w}")
        source = {"checkpoint": str(opts.checkpoint), "layout": ckpt.layout, "warnings": list(ckpt.warnings)}
    else:
        source = {"checkpoint": None, "registry": opts.model}
    if isinstance(ckpt, MllamaCheckpoint):
        _refuse_tp(opts, "Llama 3.2 Vision")
    elif opts.tp != 1:  # before the export and calibration: a model TP cannot split fails here, named
        from llamaforge.build.tensor_parallel import check_tp_options

        check_tp_options(opts, config, quant)
    if opts.quantize_lm_head is None:
        quant = quant.with_lm_head_default(config.tie_word_embeddings)
    if quant.precision in INT4_PRECISIONS:  # before the export: a width no INT4 block divides fails here, named
        problems = int4_weight_problems(config, quant.int4_block_size, quant.quantize_lm_head)
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise BuildError(f"PRECISION={opts.precision}: {'; '.join(problems[:3])}{more}")
    if opts.backend == "trt":
        try:  # before the (long) export: bad profile limits fail at once
            opts.tensorrt.limits.validate(config.max_position_embeddings)
        except TensorRTBuildError as e:
            raise BuildError(str(e)) from None
    if isinstance(ckpt, MllamaCheckpoint):  # two graphs: llamaforge/build/mllama.py
        out = opts.out or Path("engines") / (opts.model or config.name)
        _check_out_dir(out)
        return build_mllama_engine(opts, ckpt.config, ckpt.vision, ckpt, source, out, quant, calib_text)

    out = opts.out or Path("engines") / (opts.model or config.name)
    _check_out_dir(out)
    if opts.tp > 1:
        from llamaforge.build.tensor_parallel import build_tp_engine  # imports this module

        return build_tp_engine(opts, config, ckpt, quant, calib_text, source, out)
    with staged_dir(out) as tmp:  # readable by a server running as another user (see staged_dir)
        # quant.active implies both (checked above): quantization needs the checkpoint and calibration text.
        stats = _calibrate(ckpt, calib_text, tmp, quant) if ckpt is not None and calib_text is not None else None
        graph, passes = write_graph(tmp, config, opts, ckpt, quant, stats, out)
        tokenizer = copy_tokenizer(ckpt, tmp) if ckpt is not None else {"kind": "none"}
        manifest = manifest_for(config, opts, graph, tokenizer, passes, source)
        if stats is not None:
            stats.save(tmp / CALIBRATION_FILE)  # as measured, before smoothing: reusable by another build
            manifest = quantized_manifest(manifest, quant, stats, opts.backend)
        if opts.backend == "trt":
            manifest = replace(manifest, tensorrt=_build_tensorrt_plan(tmp / MODEL_FILE, tmp / PLAN_FILE, config, opts, out))
        manifest.write(tmp)
    print(f"engine: {out}")
    return out


def write_graph(directory: Path, config: ModelConfig, opts: BuildOptions, ckpt: Checkpoint | None, quant: QuantConfig,
                stats: CalibrationStats | None, out: Path, shard: RankShard | None = None,
                traced: onnx.ModelProto | None = None) -> tuple[onnx.GraphProto, list[str]]:
    """Trace (with `shard`: that tensor-parallel rank; `traced`: copy that graph template instead), run the pass pipeline and write
    `directory/model.onnx` + external data (weights streamed one at a time, or WEIGHTS=none's
    placeholders); the checked graph (without weights) and the passes run."""
    where = f" rank {shard.rank}/{shard.size}" if shard is not None else ""
    done = timed(f"{'copy the traced graph' if traced is not None else 'trace'} {config.name}{where} "
                 f"({config.num_layers} layers, {config.num_parameters() / 1e9:.2f}B params)")
    model = export_model(config, activation_precision(opts.precision), ckpt, shard, traced)
    done()
    if ckpt is None:
        bind_placeholder_weights(model, directory / "scratch.data")
    rank_stats = None if stats is None else shard_stats(stats, shard) if shard is not None else stats.copy()
    context = QuantContext(quant, rank_stats) if rank_stats is not None else None  # passes update their copy
    passes = pipeline(opts.backend, quant)
    done = timed(f"pass pipeline ({opts.backend}){where}")
    try:
        run_pipeline(model, passes, opts.dump_after, opts.dump_dir or (out.parent / f"{out.name}.dump"), quant=context)
    except QuantizationError as e:
        raise BuildError(str(e)) from None
    done()
    path = directory / MODEL_FILE
    if ckpt is not None:
        save_streaming(model, path, tqdm_progress(f"write weights{where}"))
    else:
        bind_placeholder_weights(model, directory / (MODEL_FILE + ".data"))
        ir.save(model, path)
        (directory / "scratch.data").unlink()
    del model
    done = timed("onnx.checker (full_check)")
    onnx.checker.check_model(str(path), full_check=True)
    done()
    return onnx.load(str(path), load_external_data=False).graph, list(passes)
