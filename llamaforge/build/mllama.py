"""The build of a Llama 3.2 Vision engine: two graphs in one engine directory.

    model.onnx + model.onnx.data     the text decoder with its cross-attention layers (export/mllama_text.py),
                                     through the same ORT pass pipeline as a text model
    vision.onnx + vision.onnx.data   the vision encoder + projector (export/mllama_vision.py), through `clean`
    manifest.json                    the text model's entries plus `vision` (runtime/core/manifest.py VisionInfo)

From an HF mllama checkpoint, or without weights from a registry variant (WEIGHTS=none: both graphs
complete and checked, their external data sparse files of the right size, as a text model's
graph-only build). What is not built yet is refused before anything is traced, naming it: TensorRT
(neither graph has a TensorRT path: no plugin for the cross-attention op), quantized precisions and
KV_CACHE=fp8 (calibration runs the text model alone, without image states) and fp16/bf16 (the
vision graph is traced in float32 only).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import onnx_ir as ir
import torch

from llamaforge.build.atomic import staged_dir
from llamaforge.build.errors import BuildError
from llamaforge.export.config import ModelConfig
from llamaforge.export.exporter import bind_placeholder_weights, bind_weights, save_streaming, timed, tqdm_progress
from llamaforge.export.mllama_checkpoint import MllamaCheckpoint
from llamaforge.export.mllama_export import trace_text, trace_vision
from llamaforge.export.mllama_text import cache_names
from llamaforge.export.tokenizer_files import copy_tokenizer
from llamaforge.export.vision_config import VisionConfig
from llamaforge.graphs.pipeline import pipeline, run_pipeline
from llamaforge.runtime.core.manifest import EngineManifest, TensorInfo, VisionInfo

if TYPE_CHECKING:  # builder.py imports this module: the type only, for mypy
    from llamaforge.build.builder import BuildOptions

VISION_FILE = "vision.onnx"
VISION_PASSES = ["clean"]
SMALL_CONSTANT_BYTES = 1024  # save_streaming's threshold: larger tensors go to external data


def refuse_unsupported(opts: BuildOptions) -> None:
    """BuildError naming the first option a Llama 3.2 Vision build cannot honour yet."""
    what = "Llama 3.2 Vision (mllama)"
    if opts.backend != "ort":
        raise BuildError(f"BACKEND={opts.backend}: {what} engines are built for ONNX Runtime only; the "
                         "cross-attention op has no TensorRT plugin yet (docs/vision.md)")
    if opts.precision != "fp32" or opts.kv_cache:
        raise BuildError(f"PRECISION={opts.precision} KV_CACHE={opts.kv_cache}: {what} engines are fp32 only for now: "
                         "calibration does not run the cross-attention layers and the vision graph is traced in "
                         "float32 (docs/vision.md)")


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


def build_mllama_engine(opts: BuildOptions, config: ModelConfig, vision: VisionConfig, ckpt: MllamaCheckpoint | None,
                        source: dict[str, Any], out: Path) -> Path:
    """`build_engine` for Llama 3.2 Vision: from an opened mllama checkpoint, or graph only (`ckpt`
    None, WEIGHTS=none) from a registry variant's `config` and `vision`. `opts` is checked by the
    caller and by `refuse_unsupported`."""
    # Imported here: builder.py imports this module, and these are the text build's own pieces.
    from llamaforge.build.builder import MODEL_FILE, io_spec, manifest_for

    with staged_dir(out) as tmp:
        done = timed(f"trace {config.name} (text decoder: {config.num_layers} layers, "
                     f"{len(vision.cross_attention_layers)} cross-attention; vision encoder)")
        text = trace_text(config, vision)
        image = trace_vision(vision, config.hidden_size)
        done()
        if ckpt is not None:
            bind_weights(text, ckpt, torch.float32)
            bind_weights(image, ckpt, torch.float32)
        else:  # passes that make weights need every initializer to have a location
            bind_placeholder_weights(text, tmp / "scratch-text.data")
            bind_placeholder_weights(image, tmp / "scratch-vision.data")
        passes = pipeline("ort")
        done = timed("pass pipeline (ort): text decoder, then the vision graph")
        run_pipeline(text, passes, opts.dump_after, opts.dump_dir or (out.parent / f"{out.name}.dump"))
        run_pipeline(image, VISION_PASSES)
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
        manifest.write(tmp)
    print(f"engine: {out}")
    return out
