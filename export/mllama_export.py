"""Trace Llama 3.2 Vision's graphs to ONNX: the vision encoder + projector (`vision.onnx`).

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

from llamaforge.export.mllama_vision import INPUT_NAMES, OUTPUT_NAMES, VisionGraph
from llamaforge.export.vision_config import VisionConfig

OPSET = 23


def trace_vision(vision: VisionConfig, text_hidden_size: int) -> ir.Model:
    """`vision.onnx`'s graph (float32), every weight a data-less initializer."""
    with torch.device("meta"):
        model = VisionGraph(vision, text_hidden_size).eval()
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
