"""INT4 weight-only passes (PRECISION=int4-awq | int4-rtn; arithmetic in graphs/quantization/int4.py).

  awq-scale      AWQ (Lin et al., 2024): x W = (x / s)(diag(s) W) with the per-input-channel s that
                 the calibration's search chose (graphs/quantization/awq.py, stored in the statistics),
                 applied exactly as SmoothQuant's smoothing is (`quantize.apply_smoothing`: 1/s folded
                 into the RMSNorm weight in front of q/k/v and gate/up, into up_proj's output columns
                 for down_proj, into the value columns of the QKV weight for o_proj, whose s the search
                 tied over query heads). Exact in real arithmetic; it only changes what rounds to int4.
                 lm_head (where it is quantized) and MoE experts are not searched: RTN.
  quantize-int4  every linear's weight W [in, out] stored as int4 with one float32 scale per block of
                 `int4_block_size` input channels and output channel, read through
                 `DequantizeLinear(axis=0, block_size=B)` with an int4 zero point of 0, the form of
                 TensorRT's weight-only INT4 (symmetric block quantization of a constant weight
                 feeding a MatMul). Activations stay float (W4A16). B is the configured block, or
                 the largest smaller one that divides a weight it does not (`int4.block_for`).

The quantized weight and its scales are lazy tensors computed from the (smoothed) float weight when
the engine is written, one weight in memory at a time.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from llamaforge.graphs.passes.quantize import (
    Linear,
    apply_smoothing,
    by_input,
    const_value,
    drop_if_unused,
    linears,
    register,
)
from llamaforge.graphs.passes.weights import lazy_weight
from llamaforge.graphs.quantization.int4 import block_for, block_problem, int4_scales, quantize_int4
from llamaforge.graphs.quantization.recipes import QuantContext, QuantizationError


class AWQScale(ir.passes.InPlacePass):
    """Apply the AWQ scales of the calibration statistics (see the module docstring)."""

    def __init__(self, ctx: QuantContext) -> None:
        super().__init__()
        self.ctx = ctx

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, stats = model.graph, self.ctx.stats
        if not stats.awq_scale:
            raise QuantizationError("PRECISION=int4-awq: the calibration statistics hold no AWQ scales "
                                    "(calibration.safetensors from an older build?); recalibrate")
        groups = by_input(linears(graph, self.ctx))
        # a quantized head: the search covers the decoder layers; the head is RTN
        groups = [(x, g) for x, g in groups if not ([lin.name for lin in g] == ["lm_head"] and "lm_head" not in stats.awq_scale)]
        for x, group in groups:
            scales = [stats.awq_factors(lin.name) for lin in group]
            if any(not np.array_equal(s, scales[0]) for s in scales[1:]):
                raise QuantizationError(f"{[lin.name for lin in group]} read one input but their AWQ scales differ: "
                                        "the calibration grouped them otherwise")
            s = scales[0].astype(np.float32)
            width = QuantizeInt4.inputs(group[0])
            if s.shape != (width,):
                raise QuantizationError(f"AWQ scale of {group[0].name!r} has shape {s.shape}, its weight has {width} inputs")
            apply_smoothing(graph, x, group, s, stats)
        return ir.passes.PassResult(model, bool(groups))


class QuantizeInt4(ir.passes.InPlacePass):
    """Block-wise symmetric INT4 weights before every linear MatMul (see the module docstring)."""

    def __init__(self, ctx: QuantContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.block = ctx.config.int4_block_size

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        items = linears(graph, self.ctx)
        problems = [p for lin in items if (p := block_problem(str(lin.weight.name), self.inputs(lin), self.block))]
        if problems:  # the builder checks the checkpoint's shapes before the export; this is the graph's own check
            raise QuantizationError("INT4: " + "; ".join(problems))
        for lin in items:
            self._quantize(graph, lin)
        return ir.passes.PassResult(model, bool(items))

    @staticmethod
    def inputs(lin: Linear) -> int:
        source = lin.weight.const_value
        assert source is not None
        return int(source.shape.numpy()[0])

    def _quantize(self, graph: ir.Graph, lin: Linear) -> None:
        old, source = lin.weight, lin.weight.const_value
        assert source is not None and old.name is not None
        rows, cols = (int(d) for d in source.shape.numpy())
        block = block_for(rows, self.block)
        assert block is not None  # checked in call()
        scale_shape = [rows // block, cols]
        scale = lazy_weight(f"{old.name}.scale", [source], lambda w: int4_scales(w, block), ir.DataType.FLOAT, scale_shape)
        quantized = lazy_weight(f"{old.name}.int4", [source], lambda w: quantize_int4(w, int4_scales(w, block), block),
                                ir.DataType.INT4, [rows, cols])
        zero = const_value(f"{old.name}.zero_point", np.zeros(scale_shape, dtype=ml_dtypes.int4))
        dq = ir.node("DequantizeLinear", [register(graph, quantized), register(graph, scale), register(graph, zero)],
                     attributes={"axis": 0, "block_size": block}, name=f"{lin.name}/weight_dequantize")
        dq.outputs[0].name = f"{old.name}.dequantized"
        dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(source.dtype), ir.Shape([rows, cols])
        graph.insert_before(lin.node, dq)
        lin.node.replace_input_with(1, dq.outputs[0])
        drop_if_unused(graph, old)
