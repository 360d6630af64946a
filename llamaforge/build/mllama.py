"""The build of a Llama 3.2 Vision engine: two graphs in one engine directory.

    model.onnx + model.onnx.data     the text decoder with its cross-attention layers (export/mllama_text.py),
                                     through the same ORT pass pipeline as a text model
    vision.onnx + vision.onnx.data   the vision encoder + projector (export/mllama_vision.py), through `clean`
    manifest.json                    the text model's entries plus `vision` (runtime/core/manifest.py VisionInfo)

From an HF mllama checkpoint, or without weights from a registry variant (WEIGHTS=none: both graphs
complete and checked, their external data sparse files of the right size, as a text model's
graph-only build).

Precisions: fp32/fp16/bf16 trace both graphs in that type (the vision graph's pixel_values input
stays float32). A quantized PRECISION (and KV_CACHE=fp8, ORT only) quantizes the text decoder, its
cross-attention layers included, calibrated with image states (graphs/quantization/mllama_images.py);
the vision graph stays unquantized in the text graph's activation type (`vision_precision`).
BACKEND=trt runs the `trt` pipeline on the text graph and `clean` + `check-trt-ops` on the vision
graph, then builds one plan per graph (llamaforge/build/mllama_trt.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import onnx_ir as ir

from llamaforge.build.atomic import staged_dir
from llamaforge.build.errors import BuildError
from llamaforge.export.config import ModelConfig
from llamaforge.export.exporter import (
    PRECISIONS,
    bind_placeholder_weights,
    bind_weights,
    save_streaming,
    timed,
    tqdm_progress,
)
from llamaforge.export.mllama_checkpoint import MllamaCheckpoint
from llamaforge.export.mllama_export import trace_text, trace_vision
from llamaforge.export.mllama_text import cache_names
from llamaforge.export.tokenizer_files import copy_tokenizer
from llamaforge.export.vision_config import VisionConfig
from llamaforge.graphs.pipeline import pipeline, run_pipeline
from llamaforge.graphs.quantization.calibrate import CalibrationError, CalibrationText, calibrate, calibration_batch
from llamaforge.graphs.quantization.mllama_images import calibration_image_states
from llamaforge.graphs.quantization.recipes import CalibrationStats, QuantConfig, QuantContext, QuantizationError
from llamaforge.graphs.trt_ops import UnsupportedForTensorRT
from llamaforge.runtime.core.manifest import EngineManifest, TensorInfo, VisionInfo
from llamaforge.runtime.core.tokenizer import load_tokenizer

if TYPE_CHECKING:  # builder.py imports this module: the type only, for mypy
    from llamaforge.build.builder import BuildOptions

VISION_FILE = "vision.onnx"
VISION_PASSES = {"ort": ["clean"], "trt": ["clean", "check-trt-ops"]}
SMALL_CONSTANT_BYTES = 1024  # save_streaming's threshold: larger tensors go to external data


def refuse_unsupported(opts: BuildOptions, quant: QuantConfig) -> None:
    """BuildError naming the first option a Llama 3.2 Vision build cannot honour."""
    what = "Llama 3.2 Vision (mllama)"
    if opts.backend == "trt" and quant.kv_cache:
        raise BuildError(f"KV_CACHE={quant.kv_cache} with BACKEND=trt: neither TensorRT plugin has an FP8 cache "
                         f"(docs/tensorrt.md); {what} engines keep their caches in the activation type there")


def vision_precision(precision: str) -> str:
    """The vision graph's precision: never quantized (TensorRT-LLM builds the visual engine unquantized,
    in the checkpoint's dtype, and quantizes the decoder only), in the text graph's activation type,
    which its output (`cross_attention_states`) feeds."""
    from llamaforge.build.builder import activation_precision

    return activation_precision(precision)


def vision_info(config: ModelConfig, vision: VisionConfig, inputs: list[TensorInfo],
                outputs: list[TensorInfo]) -> VisionInfo:
    """The manifest's `vision` entry; `inputs`/`outputs` are the vision graph's."""
    layers = config.num_layers
    past = [n for n in cache_names(vision, layers, "past") if "_cross_" in n]
    present = [n for n in cache_names(vision, layers, "present") if "_cross_" in n]
    return VisionInfo(
        model_file=VISION_FILE, external_data=VISION_FILE + ".data", inputs=inputs, outputs=outputs,
        config=vision.to_hf(), cross_attention_layers=list(vision.cross_attention_layers),
        image_token_id=vision.image_token_index, image_size=vision.image_size,
        max_num_tiles=vision.max_num_tiles, tokens_per_tile=vision.num_patches,
        past_inputs=past, present_outputs=present,
    )


def _save(model: ir.Model, path: Path, with_weights: bool, what: str) -> None:
    if with_weights:
        save_streaming(model, path, tqdm_progress(f"write {what} weights"))
        return
    # Graph only: the weights (and what passes derived from them) point into a sparse file of the right
    # size; the small constants the passes computed (e.g. the vision graph's Slice bounds, which shape
    # inference must read) keep their values.
    computed = {name: value.const_value for name, value in model.graph.initializers.items()
                if isinstance(value.const_value, ir.Tensor) and value.const_value.nbytes <= SMALL_CONSTANT_BYTES}
    bind_placeholder_weights(model, path.parent / (path.name + ".data"))
    for name, tensor in computed.items():
        model.graph.initializers[name].const_value = tensor
    ir.save(model, path)


def _calibrate(ckpt: MllamaCheckpoint, text: CalibrationText, quant: QuantConfig, tmp: Path) -> CalibrationStats:
    """The text decoder's calibration statistics, its cross-attention layers fed image states."""
    from llamaforge.build.builder import layer_search_for  # the text build's search choice (int8-sq alpha, AWQ)

    try:
        tokenizer = load_tokenizer(tmp, copy_tokenizer(ckpt, tmp))
        tokens = calibration_batch(tokenizer, text, seq_len=min(256, ckpt.config.max_position_embeddings))
        print(f"calibration data: {text.source}; image states of generated images (graphs/quantization/mllama_images.py)")
        images = calibration_image_states(ckpt, ckpt.vision, ckpt.config.hidden_size, tokens)
        stats = calibrate(ckpt, tokens, search=layer_search_for(quant, text, tokens, ckpt.config), images=images)
    except CalibrationError as e:
        raise BuildError(str(e)) from None
    stats.source = text.source
    return stats


def build_mllama_engine(opts: BuildOptions, config: ModelConfig, vision: VisionConfig, ckpt: MllamaCheckpoint | None,
                        source: dict[str, Any], out: Path, quant: QuantConfig,
                        calib_text: CalibrationText | None = None) -> Path:
    """`build_engine` for Llama 3.2 Vision: from an opened mllama checkpoint, or graph only (`ckpt`
    None, WEIGHTS=none) from a registry variant's `config` and `vision`. `opts` and `quant` are
    checked by the caller and by `refuse_unsupported`; `calib_text` is given when `quant` is active."""
    # Imported here: builder.py imports this module, and these are the text build's own pieces.
    from llamaforge.build.builder import (
        CALIBRATION_FILE,
        MODEL_FILE,
        activation_precision,
        io_spec,
        manifest_for,
        quantized_manifest,
    )
    from llamaforge.build.mllama_trt import build_mllama_plans

    refuse_unsupported(opts, quant)
    text_precision, image_precision = activation_precision(opts.precision), vision_precision(opts.precision)
    with staged_dir(out) as tmp:
        done = timed(f"trace {config.name} (text decoder: {config.num_layers} layers, "
                     f"{len(vision.cross_attention_layers)} cross-attention, {text_precision}; "
                     f"vision encoder, {image_precision})")
        text = trace_text(config, vision, text_precision)
        image = trace_vision(vision, config.hidden_size, image_precision)
        done()
        if ckpt is not None:
            bind_weights(text, ckpt, PRECISIONS[text_precision])
            bind_weights(image, ckpt, PRECISIONS[image_precision])
        else:  # passes that make weights need every initializer to have a location
            bind_placeholder_weights(text, tmp / "scratch-text.data")
            bind_placeholder_weights(image, tmp / "scratch-vision.data")
        stats = _calibrate(ckpt, calib_text, quant, tmp) if ckpt is not None and calib_text is not None else None
        context = QuantContext(quant, stats.copy()) if stats is not None else None
        passes = pipeline(opts.backend, quant)
        done = timed(f"pass pipeline ({opts.backend}): text decoder, then the vision graph")
        try:
            run_pipeline(text, passes, opts.dump_after, opts.dump_dir or (out.parent / f"{out.name}.dump"), quant=context)
            run_pipeline(image, VISION_PASSES[opts.backend])
        except (QuantizationError, UnsupportedForTensorRT) as e:
            raise BuildError(str(e)) from None
        done()
        _save(text, tmp / MODEL_FILE, ckpt is not None, "text")
        _save(image, tmp / VISION_FILE, ckpt is not None, "vision")
        for scratch in tmp.glob("scratch-*.data"):
            scratch.unlink()
        done = timed("onnx.checker (full_check)")
        for name in (MODEL_FILE, VISION_FILE):
            onnx.checker.check_model(str(tmp / name), full_check=True)
        done()
        tokenizer = copy_tokenizer(ckpt, tmp) if ckpt is not None else {"kind": "none"}
        graph = onnx.load(str(tmp / MODEL_FILE), load_external_data=False).graph
        manifest: EngineManifest = manifest_for(config, opts, graph, tokenizer, list(passes), source)
        vision_graph = onnx.load(str(tmp / VISION_FILE), load_external_data=False).graph
        manifest = replace(manifest, vision=vision_info(config, vision, *io_spec(vision_graph)))
        if stats is not None:
            stats.save(tmp / CALIBRATION_FILE)
            manifest = quantized_manifest(manifest, quant, stats, opts.backend)
        if opts.backend == "trt":
            manifest = replace(manifest, tensorrt=build_mllama_plans(tmp, config, vision, opts.tensorrt, out))
        manifest.write(tmp)
    print(f"engine: {out}")
    return out
