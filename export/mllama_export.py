"""Trace Llama 3.2 Vision's graphs to ONNX: the vision encoder + projector (`vision.onnx`) and the
text decoder with its cross-attention layers (`model.onnx`).

Like `exporter.trace`, on PyTorch's meta device (no weight is allocated) with symbolic batch and
image counts; weights are bound afterwards with `exporter.bind_weights` and streamed at save time.
The tile count, tile size and positions are static: transformers' embeddings reshape to
`max_num_tiles` tiles, so every image is padded to that many (the processor does).
"""

from __future__ import annotations

import logging
import warnings

import onnx_ir as ir
import torch

from llamaforge.export.config import ModelConfig
from llamaforge.export.exporter import PRECISIONS, ExportError
from llamaforge.export.mllama_text import MllamaTextDecoder, input_names, output_names
from llamaforge.export.mllama_vision import INPUT_NAMES, OUTPUT_NAMES, VisionGraph
from llamaforge.export.vision_config import VisionConfig
from llamaforge.plugins.attention.torch_op import TRANSLATION_TABLE
from llamaforge.plugins.cross_attention.torch_op import TRANSLATION_TABLE as CROSS_TRANSLATION_TABLE

OPSET = 23


def trace_vision(vision: VisionConfig, text_hidden_size: int, precision: str = "fp32") -> ir.Model:
    """`vision.onnx`'s graph in `precision` (its pixel_values input float32 all the same), every
    weight a data-less initializer."""
    if precision not in PRECISIONS:
        raise ExportError(f"PRECISION={precision!r} is not one of {sorted(PRECISIONS)}")
    with torch.device("meta"):
        model = VisionGraph(vision, text_hidden_size).to(PRECISIONS[precision]).eval()
        batch, images, tiles, size = 2, 3, vision.max_num_tiles, vision.image_size  # distinct sample sizes
        args = (torch.zeros(batch, images, tiles, vision.num_channels, size, size),
                torch.zeros(batch, images, dtype=torch.int64),
                torch.zeros(batch, images, tiles, dtype=torch.int64))
    b, i = torch.export.Dim("batch"), torch.export.Dim("max_images")
    dynamic_shapes = ({0: b, 1: i}, {0: b, 1: i}, {0: b, 1: i})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(model, args, dynamo=True, optimize=False, opset_version=OPSET,
                                    input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
                                    dynamic_shapes=dynamic_shapes, verbose=False)
    assert program is not None
    ir_model = program.model
    ir_model.producer_name = "llama-forge"
    graph = ir_model.graph
    graph.inputs[0].shape = ir.Shape(["batch", "max_images", tiles, vision.num_channels, size, size])
    graph.inputs[1].shape = ir.Shape(["batch", "max_images"])
    graph.inputs[2].shape = ir.Shape(["batch", "max_images", tiles])
    graph.outputs[0].shape = ir.Shape(["batch", "num_image_tokens", text_hidden_size])
    return ir_model


def trace_text(config: ModelConfig, vision: VisionConfig, precision: str = "fp32") -> ir.Model:
    """`model.onnx`'s graph: the text decoder (export/mllama_text.py), symbolic in batch, sequence,
    cache capacity, new image tokens, image tokens cached and image tiles."""
    if precision not in PRECISIONS:
        raise ExportError(f"PRECISION={precision!r} is not one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    cross = vision.cross_attention_layers
    # Distinct sample sizes, so that no two symbolic dims are unified by accident.
    batch, seq, num_logits, capacity, new, image_tokens, tiles = 2, 5, 3, 8, 6, 10, 4
    with torch.device("meta"):
        model = MllamaTextDecoder(config, vision).to(dtype).eval()
        args: list[torch.Tensor] = [
            torch.zeros(batch, seq, dtype=torch.int64), torch.zeros(batch, dtype=torch.int32),
            torch.zeros(batch, num_logits, dtype=torch.int64), torch.zeros(batch, new, config.hidden_size, dtype=dtype),
            torch.zeros(batch, seq, tiles, dtype=torch.int64)]
        for i in range(config.num_layers):
            length = image_tokens if i in cross else capacity
            # Two distinct tensors: torch.export would make one graph input of a tensor passed twice.
            args += [torch.zeros(batch, config.num_kv_heads, length, config.head_dim, dtype=dtype) for _ in range(2)]
    b, s, n = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("num_logits")
    c, new_dim = torch.export.Dim("capacity"), torch.export.Dim("new_image_tokens")
    image_dim, tile_dim = torch.export.Dim("image_tokens"), torch.export.Dim("image_tiles")
    caches = []
    for i in range(config.num_layers):
        caches += [{0: b, 2: image_dim if i in cross else c}] * 2
    dynamic_shapes = ({0: b, 1: s}, {0: b}, {0: b, 1: n}, {0: b, 1: new_dim}, {0: b, 1: s, 2: tile_dim}, tuple(caches))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(model, tuple(args), dynamo=True, optimize=False, opset_version=OPSET,
                                    input_names=input_names(config, vision), output_names=output_names(config, vision),
                                    dynamic_shapes=dynamic_shapes,
                                    custom_translation_table={**TRANSLATION_TABLE, **CROSS_TRANSLATION_TABLE},
                                    verbose=False)
    assert program is not None
    ir_model = program.model
    ir_model.producer_name = "llama-forge"
    ir_model.metadata_props["llamaforge.max_positions"] = str(config.max_position_embeddings)
    graph = ir_model.graph
    kvh, d = config.num_kv_heads, config.head_dim
    graph.inputs[0].shape = ir.Shape(["batch", "seq"])
    graph.inputs[1].shape = ir.Shape(["batch"])
    graph.inputs[2].shape = ir.Shape(["batch", "num_logits"])
    graph.inputs[3].shape = ir.Shape(["batch", "new_image_tokens", config.hidden_size])
    graph.inputs[4].shape = ir.Shape(["batch", "seq", "image_tiles"])
    for i in range(config.num_layers):
        shape = ir.Shape(["batch", kvh, "image_tokens" if i in cross else "capacity", d])
        for v in (graph.inputs[5 + 2 * i], graph.inputs[6 + 2 * i], graph.outputs[1 + 2 * i], graph.outputs[2 + 2 * i]):
            v.shape = shape
    graph.outputs[0].shape = ir.Shape(["batch", "num_logits", config.vocab_size])
    return ir_model
