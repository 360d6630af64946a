"""Quantization of MoE expert weights, after `lower-moe-ort`.

Why a pass after the lowering and not inside it: the lowering decides how an expert's weight is
read (inside the Loop body, `Gather(axis=0, expert id)` -> `MatMul` input B), and that is exactly
where a per-expert scale must be picked. Working on the lowered graph keeps the MoE lowering
precision-agnostic, runs in the same place of the pipeline as `QuantizeMatMuls` (after the fusions,
before the attention lowering) and lets `validate-quantization` check the very graph that is saved.

For each expert weight W [E, in, out] (`...feed_forward.experts.gate_up_proj` / `.down_proj`, x @ W
layout), stored quantized as a lazy initializer (computed when the engine is written, one tensor in
memory at a time), every read `Gather(W, e) -> MatMul` becomes

    Gather(W_q, e) [in, out] -> DequantizeLinear(axis=1) -> MatMul
    Gather(scale, e)         ----^        (zero point: a constant of zeros)

  int8-wo  per expert and output channel: scale [E, out] = amax / 127, row [out] per expert;
  fp8      per expert: scale [E] = amax / 448 (a scalar per expert), and W8A8: the MatMul's
           activation input gets QuantizeLinear -> DequantizeLinear with one per-tensor scale per
           MoE layer and matmul, from calibration (`graphs/quantization/calibrate.py` records the experts'
           inputs: the router-score-scaled hidden states and the SwiGLU output).

ONNX has no Gather for float8 (its type constraint excludes float8 in every opset up to 25; the
opset-26 BitCast that could reinterpret gathered uint8 codes is not implemented by ONNX Runtime 1.31),
so fp8 expert weights are dequantized whole, `DequantizeLinear(W_q [E, in, out], scale [E], axis=0)`
in the main graph, once per step, and the Loop body gathers the expert's float slice from that. The
numbers are the same as the per-slice form; the cost is not: on ONNX Runtime (where fp8 is simulated
anyway, see `ort_session_config`) the step dequantizes all E experts, so fp8 experts do not keep
`make bench-moe`'s active-experts scaling. A TensorRT build would need an MoE plugin for fp8 experts.

  int4     (int4-awq / int4-rtn) per expert, output channel and block of input channels: scale
           [E, in / B, out] = block amax / 7 (graphs/quantization/int4.py, B as for the dense
           weights, `int4.block_for`); ONNX has no Gather for int4 either (its only int4 readers
           are Q/DQ, Cast, Reshape, Transpose, Pad and the like), so int4 experts are dequantized
           whole as fp8's are: `DequantizeLinear(W_q [E, in, out], scale, axis=1, block_size=B)`
           in the main graph, the Loop body gathering the expert's float slice. Per-expert blocks
           keep the numbers of a per-expert quantization; the engine stores 4-bit experts on disk,
           but the step dequantizes every expert (like fp8 experts). AWQ does not scale experts
           (their inputs are score-scaled per expert: no shared place to fold a scale into), so
           int4-awq's experts are round-to-nearest.

The router is not an expert weight and is never touched here (it stays in the activation dtype).
int8-sq (SmoothQuant) leaves experts unquantized: smoothing needs a per-expert fold that the
experts' inputs (score-scaled, gathered per expert) have no place for.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from llamaforge.graphs.passes.quantize import FORMATS, const_value, insert_input_qdq, register, zero_point
from llamaforge.graphs.passes.weights import lazy_weight
from llamaforge.graphs.quantization.int4 import INT4_PRECISIONS, block_for, block_problem, int4_scales, quantize_int4
from llamaforge.graphs.quantization.recipes import QuantContext, QuantizationError, scale_from_amax

EXPERT_WEIGHT_SUFFIXES = (".feed_forward.experts.gate_up_proj", ".feed_forward.experts.down_proj")
EXPERT_PRECISIONS = ("fp8", "int8-wo", *INT4_PRECISIONS)


def expert_weights(graph: ir.Graph) -> list[ir.Value]:
    """The float expert-weight initializers [E, in, out] of the main graph."""
    return [v for name, v in graph.initializers.items() if name.endswith(EXPERT_WEIGHT_SUFFIXES)
            and (t := v.const_value) is not None and len(t.shape) == 3
            and t.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)]


def earliest_user(graph: ir.Graph, nodes: list[ir.Node]) -> ir.Node:
    """The earliest main-graph node that is one of `nodes` or holds one in its subgraphs (the Loop)."""
    def holds(top: ir.Node, node: ir.Node) -> bool:
        return top is node or any(inner is node for attr in top.attributes.values()
                                  if attr.type == ir.AttributeType.GRAPH
                                  for inner in ir.traversal.RecursiveGraphIterator(attr.as_graph()))

    for top in graph:
        if any(holds(top, n) for n in nodes):
            return top
    raise QuantizationError(f"{nodes[0].name!r}: no main-graph node holds it")


def gathered_matmul(value: ir.Value, gather: ir.Node) -> ir.Node:
    """The MatMul that reads `Gather(value, e)` as its weight input, or a clear error."""
    if gather.op_type != "Gather" or gather.inputs[0] is not value or gather.attributes.get_int("axis", 0) != 0:
        raise QuantizationError(f"expert weight {value.name!r} is read by {gather.op_type} {gather.name!r}, not by "
                                "Gather(axis=0, expert id): run lower-moe-ort before quantizing experts")
    uses = list(gather.outputs[0].uses())
    if len(uses) != 1 or uses[0][0].op_type != "MatMul" or uses[0][1] != 1:
        raise QuantizationError(f"{gather.name!r}: the gathered expert weight {value.name!r} must feed exactly one "
                                "MatMul's weight input")
    return uses[0][0]


class QuantizeExperts(ir.passes.InPlacePass):
    def __init__(self, ctx: QuantContext, precision: str) -> None:
        super().__init__()
        if precision not in EXPERT_PRECISIONS:
            raise QuantizationError(f"expert quantization supports {list(EXPERT_PRECISIONS)}, not {precision!r}")
        self.ctx = ctx
        self.int4 = precision in INT4_PRECISIONS
        self.fmt = FORMATS["int8-wo" if self.int4 else precision]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        weights = expert_weights(graph)
        for old in weights:
            self._quantize_int4(graph, old) if self.int4 else self._quantize(graph, old)
        return ir.passes.PassResult(model, bool(weights))

    def _quantize_int4(self, graph: ir.Graph, old: ir.Value) -> None:
        """Per-expert INT4 blocks along the input channels, dequantized whole (see the module docstring)."""
        name, source = old.name, old.const_value
        assert source is not None and name is not None
        experts, inputs, outputs = (int(d) for d in source.shape.numpy())
        block = block_for(inputs, self.ctx.config.int4_block_size)
        if block is None:
            raise QuantizationError(f"INT4: {block_problem(name, inputs, self.ctx.config.int4_block_size)}")
        scale_shape = [experts, inputs // block, outputs]
        quantized = register(graph, lazy_weight(f"{name}.int4", [source], lambda w: quantize_int4(w, int4_scales(w, block, 1), block, 1),
                                                ir.DataType.INT4, [experts, inputs, outputs]))
        scales = register(graph, lazy_weight(f"{name}.scale", [source], lambda w: int4_scales(w, block, 1),
                                             ir.DataType.FLOAT, scale_shape))
        zero = register(graph, const_value(f"{name}.zero_point", np.zeros(scale_shape, ml_dtypes.int4)))
        gathers = [node for node, _ in old.uses()]
        if not gathers:
            raise QuantizationError(f"expert weight {name!r} has no reader")
        for gather in gathers:
            gathered_matmul(old, gather)  # the form the lowering writes, or a clear error
        dq = ir.node("DequantizeLinear", [quantized, scales, zero], attributes={"axis": 1, "block_size": block},
                     name=f"{name}/dequantize")
        dq.outputs[0].name = f"{name}.dequantized"
        dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(source.dtype), ir.Shape([experts, inputs, outputs])
        graph.insert_before(earliest_user(graph, gathers), dq)
        for gather in gathers:
            gather.replace_input_with(0, dq.outputs[0])
        graph.initializers.pop(name)

    def _amax(self, old: ir.Value, source: ir.TensorProtocol) -> np.ndarray:
        """[E, out]: from calibration, else read from the weight (one tensor)."""
        experts, _, outputs = source.shape.numpy()
        amax = self.ctx.stats.weight_out_amax.get(old.name or "")
        if amax is None:
            amax = np.abs(source.numpy().astype(np.float32)).max(axis=1)
        if amax.shape != (experts, outputs):
            raise QuantizationError(f"{old.name}: calibration weight amax has shape {amax.shape}, expected "
                                    f"[experts, outputs] = {[experts, outputs]}")
        return amax

    def _quantize(self, graph: ir.Graph, old: ir.Value) -> None:
        fmt, name, source = self.fmt, old.name, old.const_value
        assert source is not None and name is not None
        amax = self._amax(old, source)
        # fp8: per expert, over all its output channels (a TP rank's cut gate_up: the unsharded expert's max)
        per_expert = self.ctx.stats.whole_expert_amax.get(name)
        if per_expert is None:
            per_expert = amax.max(axis=1)
        scale = scale_from_amax(amax if fmt.weight_per_channel else per_expert, fmt.qmax)  # [E, out] | [E]
        broadcast = scale[:, None, :] if fmt.weight_per_channel else scale[:, None, None]
        quantized = register(graph, lazy_weight(f"{name}.{fmt.name}", [source], lambda w: fmt.quantize(w, broadcast),
                                                fmt.weight_dtype, list(source.shape.numpy())))
        scales = register(graph, const_value(f"{name}.scale", scale))
        zero = register(graph, const_value(f"{name}.zero_point", zero_point(fmt.weight_dtype, scale.shape[1:] if fmt.weight_per_channel
                                                                                 else scale.shape)))  # fp8: whole DQ, [E]
        gathers = [node for node, _ in old.uses()]
        if not gathers:
            raise QuantizationError(f"expert weight {name!r} has no reader")
        matmuls = [gathered_matmul(old, gather) for gather in gathers]
        if fmt.weight_dtype == ir.DataType.FLOAT8E4M3FN:  # no float8 Gather: dequantize whole (see module doc)
            dq = ir.node("DequantizeLinear", [quantized, scales, zero], attributes={"axis": 0}, name=f"{name}/dequantize")
            dq.outputs[0].name = f"{name}.dequantized"
            dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(source.dtype), ir.Shape(source.shape.numpy())
            graph.insert_before(earliest_user(graph, gathers), dq)
            for gather, matmul in zip(gathers, matmuls):
                gather.replace_input_with(0, dq.outputs[0])
                self._quantize_activation(graph, gather.graph, matmul, name)  # type: ignore[arg-type]
            graph.initializers.pop(name)
            return
        for gather, matmul in zip(gathers, matmuls):
            body = gather.graph
            assert body is not None
            expert = gather.inputs[1]
            gather.replace_input_with(0, quantized)
            gather.outputs[0].type = ir.TensorType(fmt.weight_dtype)
            row = ir.node("Gather", [scales, expert], attributes={"axis": 0}, name=f"{gather.name}/scale")
            row.outputs[0].name = f"{gather.outputs[0].name}.scale"
            row.outputs[0].type, row.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(scale.shape[1:])
            dq = ir.node("DequantizeLinear", [gather.outputs[0], row.outputs[0], zero],
                         attributes={"axis": 1} if fmt.weight_per_channel else {}, name=f"{gather.name}/dequantize")
            dq.outputs[0].name = f"{gather.outputs[0].name}.dequantized"
            dq.outputs[0].type = ir.TensorType(source.dtype)
            dq.outputs[0].shape = ir.Shape(source.shape.numpy()[1:])
            body.insert_after(gather, [row, dq])
            matmul.replace_input_with(1, dq.outputs[0])
            if fmt.activations:
                self._quantize_activation(graph, body, matmul, name)
        graph.initializers.pop(name)

    def _quantize_activation(self, graph: ir.Graph, body: ir.Graph, matmul: ir.Node, weight: str) -> None:
        fmt = self.fmt
        x = matmul.inputs[0]
        assert x is not None
        amax = self.ctx.stats.act_amax.get(weight)
        if amax is None:
            raise QuantizationError(f"calibration statistics have no activation amax for the experts {weight!r} "
                                    f"(PRECISION={fmt.name} quantizes the experts' inputs); recalibrate")
        scale = register(graph, const_value(f"{weight}.input_scale", scale_from_amax(float(amax.max()), fmt.qmax)))
        zero = register(graph, const_value(f"{weight}.input_zero_point", zero_point(fmt.weight_dtype, ())))
        insert_input_qdq(body, matmul, x, scale, zero, fmt.weight_dtype, str(matmul.name), weight)
