"""`lower-quant-ort`: quantized MatMuls -> ONNX Runtime's `com.microsoft::MatMulNBits` (or, for
int8-sq with `--ort-kernels integer`, `MatMulIntegerToFloat`).

Runs after `validate-quantization` (which checks the backend-neutral Q/DQ graph, the one TensorRT
gets) and only in the ORT pipeline (`ORT_ONLY_PASSES`), with `--ort-kernels fast` (the default) or
`integer`:

    x -> MatMul <- DequantizeLinear <- W_q, scale      ==>      MatMulNBits(x, B, scales)

  int4 (int4-awq / int4-rtn)  block-wise DQ (axis 0, block_size B): bits=4, the same blocks;
  int8 (int8-wo)              per-output-channel DQ (axis 1): bits=8, blocks of INT8_BLOCK_SIZE
                              input channels, each block carrying its channel's scale (the same
                              numbers: a per-channel scale is a block scale that never changes).

The codes are the same integers (stored as q + 2^(bits-1), MatMulNBits' default zero point; see
graphs/quantization/int4.py for the layout), so the weights mean exactly what the DQ graph says.
What differs is the compute: `accuracy_level` 4 quantizes each activation block to int8 inside the
kernel and multiplies in integers (the fast path: measured in docs/quantization.md, with the
quality it keeps), level 1 computes in fp32. `--ort-kernels exact` skips this pass and the engine
runs the DQ graph as written (see `recipes.ort_session_config`).

int8-sq's per-token form (graphs/passes/quantize.py `insert_per_token_qdq`: x's per-token scale
s = max|x_row| / 127 computed in the graph, QuantizeLinear -> DequantizeLinear on x, per-channel int8
weight through DequantizeLinear):

  * `--ort-kernels fast` (the default): the MatMul reads x itself and becomes the int8 MatMulNBits
    above, with the same weight codes. The kernel rounds x to int8 per token *and block* of
    INT8_BLOCK_SIZE input channels, finer than the graph's per-token scale, in one fused op: the
    per-token form costs ~10 graph ops per linear (~680 nodes on the 125M bench model against ~150),
    and ran at half onnxruntime-genai's int8 speed (docs/benchmarks.md#make-bench-quant).
  * `--ort-kernels integer`: ORT's integer GEMM with the graph's own codes:

    q = QuantizeLinear(x, s)                       (kept: int8 codes, as the DQ graph has them)
    a = Cast(Cast(q, int32) + 128, uint8)          (the same codes as uint8 with zero point 128)
    y = MatMulIntegerToFloat(a, W_q, 1, w_scale, 128, 0) * s

The integer sums are exact (int32), so y differs from the DQ graph's fp32 MatMul only by float
rounding, provided the kernel does not saturate: ORT's u8s8 kernel on x86 CPUs without VNNI adds
pairs of u8 x s8 products in int16 and saturates (docs/quantization.md). The engine keeps
`session.x64quantprecision=1` in its manifest (ORT then runs the exact u8u8 kernel) and
runtime/core/engine.py drops it on CPUs with VNNI, whose u8s8 kernel sums in int32: exact and faster.

MoE experts (inside the lowered MoE's Loop, read through Gather) stay in their DQ form: MatMulNBits
needs a constant weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from llamaforge.graphs.passes.quantize import const_value, drop_if_unused, per_token_source, register
from llamaforge.graphs.passes.weights import lazy_weight
from llamaforge.graphs.quantization.int4 import matmulnbits_scales, matmulnbits_weight
from llamaforge.graphs.quantization.recipes import QuantContext

MS_DOMAIN = "com.microsoft"
FAST_ACCURACY_LEVEL = 4  # int8 activations inside the kernel: the fastest on CPU (docs/quantization.md)
INT8_BLOCK_SIZE = 128  # input channels per MatMulNBits block for per-channel int8 weights (measured, docs)


@dataclass(frozen=True)
class WeightOnly:
    """A MatMul reading a stored quantized weight through DequantizeLinear."""

    matmul: ir.Node
    dq: ir.Node
    codes: ir.Value  # int4 [K, N] or int8 [K, N]
    scale: ir.Value  # [K / B, N] or [N]
    bits: int
    block_size: int


def _constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    return value.const_value if value is not None and value.is_initializer() else None


def weight_only(node: ir.Node) -> WeightOnly | None:
    """The match for a main-graph float32 MatMul whose weight input is DQ(constant int4/int8), else None."""
    if node.op_type != "MatMul" or node.domain != "" or node.inputs[1] is None:
        return None
    dq = node.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or dq.domain != "" or len(node.inputs[1].uses()) != 1:
        return None
    x = node.inputs[0].producer() if node.inputs[0] is not None else None
    if x is not None and x.op_type == "DequantizeLinear":
        return None  # W8A8 (int8-sq): an integer GEMM's, see per_token_int8 (static: ORT's own QDQ fusion)
    codes, scale = dq.inputs[0], dq.inputs[1]
    q, s = _constant(codes), _constant(scale)
    if q is None or s is None or codes is None or scale is None or len(q.shape) != 2 or s.dtype != ir.DataType.FLOAT:
        return None
    zero = _constant(dq.inputs[2]) if len(dq.inputs) > 2 else None
    if zero is not None and np.any(zero.numpy().astype(np.float32) != 0):
        return None  # MatMulNBits' default zero point is the symmetric one only
    block = dq.attributes.get_int("block_size", 0)
    axis = dq.attributes.get_int("axis", 1)
    if q.dtype == ir.DataType.INT4 and block and axis == 0 and len(s.shape) == 2:
        return WeightOnly(node, dq, codes, scale, 4, block)
    if q.dtype == ir.DataType.INT8 and not block and axis == 1 and len(s.shape) == 1:
        return WeightOnly(node, dq, codes, scale, 8, INT8_BLOCK_SIZE)
    return None


@dataclass(frozen=True)
class PerTokenInt8:
    """A MatMul of int8-sq's per-token form: DQ(Q(x, s), s) x DQ(W_q int8, w_scale [N], axis 1)."""

    matmul: ir.Node
    act_dq: ir.Node
    quantize: ir.Node
    weight_dq: ir.Node


def per_token_int8(node: ir.Node) -> PerTokenInt8 | None:
    if node.op_type != "MatMul" or node.domain != "" or node.inputs[0] is None or node.inputs[1] is None:
        return None
    act_dq, weight_dq = node.inputs[0].producer(), node.inputs[1].producer()
    if act_dq is None or weight_dq is None or act_dq.op_type != "DequantizeLinear" or weight_dq.op_type != "DequantizeLinear":
        return None
    quantize = act_dq.inputs[0].producer() if act_dq.inputs[0] is not None else None
    if (quantize is None or quantize.op_type != "QuantizeLinear" or quantize.inputs[1] is not act_dq.inputs[1]
            or per_token_source(quantize.inputs[1]) is not quantize.inputs[0]):
        return None
    codes, scale = _constant(weight_dq.inputs[0]), _constant(weight_dq.inputs[1])
    zero = _constant(weight_dq.inputs[2]) if len(weight_dq.inputs) > 2 else None
    if (codes is None or scale is None or codes.dtype != ir.DataType.INT8 or len(codes.shape) != 2
            or len(scale.shape) != 1 or weight_dq.attributes.get_int("axis", 1) != 1
            or weight_dq.attributes.get_int("block_size", 0) != 0
            or (zero is not None and np.any(zero.numpy().astype(np.int32) != 0))):
        return None
    if len(act_dq.outputs[0].uses()) != 1 or len(node.inputs[1].uses()) != 1:
        return None
    return PerTokenInt8(node, act_dq, quantize, weight_dq)


class LowerQuantForORT(ir.passes.InPlacePass):
    def __init__(self, ctx: QuantContext, accuracy_level: int = FAST_ACCURACY_LEVEL) -> None:
        super().__init__()
        self.ctx = ctx
        self.accuracy_level = accuracy_level

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        integer = [m for node in list(graph) if (m := per_token_int8(node)) is not None]
        for per_token in integer:
            if self.ctx.config.ort_kernels == "integer":
                self._lower_per_token(graph, per_token)
            else:  # fast: the kernel rounds x itself (per token and block), so it reads x, not its codes
                per_token.matmul.replace_input_with(0, per_token.quantize.inputs[0])
                graph.remove(per_token.act_dq, safe=True)  # Q and the scale chain: the pipeline's final clean
        matches = [w for node in list(graph) if (w := weight_only(node)) is not None]
        for match in matches:
            self._lower(graph, match)
        if matches or integer:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, bool(matches or integer))

    @staticmethod
    def _lower_per_token(graph: ir.Graph, m: PerTokenInt8) -> None:
        name = str(m.matmul.name or m.weight_dq.inputs[0].name)  # type: ignore[union-attr]
        codes, scale = m.quantize.outputs[0], m.quantize.inputs[1]
        assert scale is not None
        weight, w_scale = m.weight_dq.inputs[0], m.weight_dq.inputs[1]
        assert weight is not None and w_scale is not None
        n = int(weight.const_value.shape.numpy()[1])  # type: ignore[union-attr]
        offset = register(graph, const_value(f"{name}.u8_offset", np.array(128, np.int32)))
        one = register(graph, const_value(f"{name}.act_unit_scale", np.array(1.0, np.float32)))
        a_zero = register(graph, const_value(f"{name}.act_zero_point", np.array(128, np.uint8)))
        w_zero = register(graph, const_value(f"{name}.weight_zero_point_s8", np.zeros(n, np.int8)))
        wide = ir.node("Cast", [codes], attributes={"to": int(ir.DataType.INT32)}, name=f"{name}/codes_i32")
        shifted = ir.node("Add", [wide.outputs[0], offset], name=f"{name}/codes_shift")
        unsigned = ir.node("Cast", [shifted.outputs[0]], attributes={"to": int(ir.DataType.UINT8)}, name=f"{name}/codes_u8")
        gemm = ir.node("MatMulIntegerToFloat", [unsigned.outputs[0], weight, one, w_scale, a_zero, w_zero],
                       domain=MS_DOMAIN, name=f"{name}/integer")
        y = ir.node("Mul", [gemm.outputs[0], scale], name=f"{name}/token_scale")
        old = m.matmul.outputs[0]
        for node, dtype in ((wide, ir.DataType.INT32), (shifted, ir.DataType.INT32), (unsigned, ir.DataType.UINT8),
                            (gemm, ir.DataType.FLOAT), (y, ir.DataType.FLOAT)):
            node.outputs[0].name = f"{node.name}.out"
            node.outputs[0].type = ir.TensorType(dtype)
        for node in (wide, shifted, unsigned):
            node.outputs[0].shape = codes.shape
        gemm.outputs[0].shape = y.outputs[0].shape = old.shape
        graph.insert_before(m.matmul, [wide, shifted, unsigned, gemm, y])
        ir.convenience.replace_all_uses_with(old, y.outputs[0], replace_graph_outputs=True)
        y.outputs[0].name, old.name = old.name, f"{old.name}.unlowered"
        dropped = [v for v in (*m.act_dq.inputs, *m.weight_dq.inputs) if v is not None and v is not weight]
        for node in (m.matmul, m.act_dq, m.weight_dq):
            graph.remove(node, safe=True)
        for value in dropped:
            drop_if_unused(graph, value)

    def _lower(self, graph: ir.Graph, m: WeightOnly) -> None:
        q, s = m.codes.const_value, m.scale.const_value
        assert q is not None and s is not None
        k, n = (int(d) for d in q.shape.numpy())
        blocks, bits, block = -(-k // m.block_size), m.bits, m.block_size
        name = str(m.codes.name)
        packed = lazy_weight(f"{name}.nbits", [q], lambda codes: matmulnbits_weight(codes, bits, block),
                             ir.DataType.UINT8, [n, blocks, block * bits // 8])
        if isinstance(s, ir.LazyTensor):
            scales = lazy_weight(f"{name}.nbits_scales", [s], lambda v: matmulnbits_scales(v, k, block),
                                 ir.DataType.FLOAT, [n * blocks])
        else:
            scales = const_value(f"{name}.nbits_scales", matmulnbits_scales(s.numpy(), k, block))
        x = m.matmul.inputs[0]
        node = ir.node("MatMulNBits", [x, register(graph, packed), register(graph, scales)], domain=MS_DOMAIN,
                       attributes={"K": k, "N": n, "bits": bits, "block_size": block,
                                   "accuracy_level": self.accuracy_level},
                       name=f"{m.matmul.name or name}/nbits")
        old = m.matmul.outputs[0]
        out = node.outputs[0]
        out.type, out.shape = old.type, old.shape
        graph.insert_before(m.matmul, node)
        ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        out.name, old.name = old.name, f"{old.name}.unlowered"  # a graph output (logits) keeps its name
        dq_inputs = [v for v in m.dq.inputs if v is not None]  # removal detaches them
        graph.remove(m.matmul, safe=True)
        graph.remove(m.dq, safe=True)
        for value in dq_inputs:
            drop_if_unused(graph, value)
