"""Quantization passes: SmoothQuant folding, Q/DQ insertion before MatMuls, FP8 KV-cache scales.

A "linear" here is a MatMul whose second input is a constant rank-2 weight [in, out] (after
`fold-weight-transposes`), named after the checkpoint's module (`...self_attn.qkv_proj` for the
packed projection). Scales come from `CalibrationStats`; new weights are lazy tensors, computed one
at a time when the engine is written, like every other weight-rewriting pass (bounded memory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from llamaforge.graphs.passes.weights import constant_input, lazy_weight
from llamaforge.graphs.quantization.recipes import (
    FP8_MAX,
    INT8_MAX,
    QuantContext,
    QuantizationError,
    quantize_fp8,
    quantize_int8,
    scale_from_amax,
    smoothing_factors,
)
from llamaforge.plugins.attention.schema import DOMAIN, OP_TYPE

LOGITS = "logits"
# Producers of a linear's input whose weight (input index) can absorb SmoothQuant's 1/s exactly.
NORM_WEIGHT_INPUT = {("", "RMSNormalization"): 1, ("", "SimplifiedLayerNormalization"): 1,
                     ("com.microsoft", "SimplifiedLayerNormalization"): 1,
                     ("com.microsoft", "SkipSimplifiedLayerNormalization"): 2}


@dataclass(frozen=True)
class Linear:
    node: ir.Node
    name: str  # checkpoint module name: model.layers.0.mlp.up_proj, lm_head, ...

    @property
    def weight(self) -> ir.Value:
        w = self.node.inputs[1]
        assert w is not None
        return w


def linear_name(node: ir.Node) -> str:
    if any(o.name == LOGITS and o.is_graph_output() for o in node.outputs):
        return "lm_head"  # by position: a tied lm_head's weight is named after the embedding
    name = node.inputs[1].name or ""  # type: ignore[union-attr]
    stripped = None
    while stripped != name:  # model.layers.0.mlp.up_proj.weight.T(.smoothed) -> model.layers.0.mlp.up_proj
        stripped, name = name, name.removesuffix(".smoothed").removesuffix(".T").removesuffix(".weight")
    return name


def is_router(name: str) -> bool:
    """MoE routers (Mixtral's `block_sparse_moe.gate`, Llama 4's `feed_forward.router`)."""
    return name.endswith(".router") or name.endswith(".gate")


def linears(graph: ir.Graph, ctx: QuantContext) -> list[Linear]:
    """The MatMuls this configuration quantizes (lm_head and routers only when asked)."""
    found = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain != "":
            continue
        w = constant_input(node.inputs[1])
        if w is None or w.shape.rank() != 2 or w.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            continue
        name = linear_name(node)
        if name == "lm_head" and not ctx.config.quantize_lm_head:
            continue
        if is_router(name) and not ctx.config.quantize_router:
            continue
        found.append(Linear(node, name))
    return found


def by_input(items: list[Linear]) -> dict[ir.Value, list[Linear]]:
    groups: dict[ir.Value, list[Linear]] = {}
    for lin in items:
        x = lin.node.inputs[0]
        assert x is not None
        groups.setdefault(x, []).append(lin)
    return groups


def const_value(name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape), const_value=tensor)


def register(graph: ir.Graph, value: ir.Value) -> ir.Value:
    if value.name in graph.initializers:
        raise QuantizationError(f"initializer {value.name!r} exists already: was this graph quantized twice?")
    graph.register_initializer(value)
    return value


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if value.is_initializer() and not value.uses() and not value.is_graph_output():
        assert value.name is not None
        graph.initializers.pop(value.name)


def earliest(graph: ir.Graph, nodes: list[ir.Node]) -> ir.Node:
    order = {n: i for i, n in enumerate(graph)}
    return min(nodes, key=lambda n: order[n])


class SmoothQuant(ir.passes.InPlacePass):
    """SmoothQuant (Xiao et al., 2023): x W = (x / s)(diag(s) W), with per-input-channel
    s = amax_x^alpha / amax_w^(1-alpha), which moves activation outliers into the weights before
    int8 quantization. Exact in real arithmetic, so the model computes the same function.

    Where the input comes straight from an RMSNorm whose output feeds only these linears (q/k/v,
    gate/up), 1/s is folded into the norm's weight; elsewhere (o_proj, down_proj) an explicit
    Mul(x, 1/s) is inserted. Linears sharing an input share s (computed over all their weights).
    The statistics in the context are updated to describe the smoothed model."""

    def __init__(self, ctx: QuantContext) -> None:
        super().__init__()
        self.ctx = ctx

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, stats, alpha = model.graph, self.ctx.stats, self.ctx.config.smoothquant_alpha
        groups = by_input(linears(graph, self.ctx))
        for x, group in groups.items():
            a = np.maximum.reduce([stats.activation_amax(lin.name) for lin in group])
            w = np.maximum.reduce([stats.weight_amax_per_input(lin.name) for lin in group])
            s = smoothing_factors(a, w, alpha)
            if not self._fold_into_norm(graph, x, group, s):
                inv = register(graph, const_value(f"{group[0].name}.smooth_inv", (1.0 / s).astype(np.float32)))
                mul = ir.node("Mul", [x, inv], name=f"{group[0].name}/smooth")
                mul.outputs[0].name = f"{group[0].name}.input_smoothed"
                mul.outputs[0].type, mul.outputs[0].shape = x.type, x.shape
                graph.insert_before(earliest(graph, [lin.node for lin in group]), mul)
                for lin in group:
                    lin.node.replace_input_with(0, mul.outputs[0])
            for lin in group:
                old = lin.weight
                source = old.const_value
                assert source is not None
                smoothed = lazy_weight(f"{old.name}.smoothed", [source],
                                       lambda w, s=s: w * s[:, None].astype(w.dtype), source.dtype, list(source.shape.numpy()))
                lin.node.replace_input_with(1, register(graph, smoothed))
                drop_if_unused(graph, old)
                stats.smoothed(lin.name, s)
        return ir.passes.PassResult(model, bool(groups))

    @staticmethod
    def _fold_into_norm(graph: ir.Graph, x: ir.Value, group: list[Linear], s: np.ndarray) -> bool:
        norm = x.producer()
        if norm is None or x is not norm.outputs[0]:
            return False
        index = NORM_WEIGHT_INPUT.get((norm.domain, norm.op_type))
        if norm.op_type == "Mul" and norm.domain == "":  # an unfused RMSNorm ends in weight * normalized
            index = next((i for i, v in enumerate(norm.inputs) if (c := constant_input(v)) is not None
                          and c.shape.numpy() == (len(s),)), None)
        if index is None or len(norm.inputs) <= index:
            return False
        gamma = norm.inputs[index]
        source = constant_input(gamma)
        users = {node for node, _ in x.uses()}
        if gamma is None or source is None or len(gamma.uses()) != 1 or users != {lin.node for lin in group}:
            return False
        folded = lazy_weight(f"{gamma.name}.smoothed", [source], lambda g: g / s.astype(g.dtype),
                             source.dtype, list(source.shape.numpy()))
        norm.replace_input_with(index, register(graph, folded))
        drop_if_unused(graph, gamma)
        return True


@dataclass(frozen=True)
class MatMulFormat:
    """How one precision quantizes a linear."""

    name: str
    weight_dtype: ir.DataType
    qmax: float
    weight_per_channel: bool  # per output channel (axis 1 of the [in, out] weight) vs per tensor
    activations: bool  # W8A8 (Q/DQ on the input) vs weight-only
    quantize: Callable[[np.ndarray, np.ndarray], np.ndarray]


FORMATS = {
    "fp8": MatMulFormat("fp8", ir.DataType.FLOAT8E4M3FN, FP8_MAX, False, True, quantize_fp8),
    "int8-sq": MatMulFormat("int8", ir.DataType.INT8, INT8_MAX, True, True, quantize_int8),
    "int8-wo": MatMulFormat("int8", ir.DataType.INT8, INT8_MAX, True, False, quantize_int8),
}


def zero_point(dtype: ir.DataType, shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, dtype=dtype.numpy())


class QuantizeMatMuls(ir.passes.InPlacePass):
    """Insert TensorRT-style explicit quantization before every linear MatMul:

        x -> QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear <- W_q (initializer)

    Symmetric (zero point 0 of the quantized type), per-tensor activation scale, per-tensor (fp8)
    or per-output-channel (int8) weight scale. A Q/DQ pair per consuming MatMul, even where two
    MatMuls read one activation (gate/up): ORT fuses a Q -> DQ -> MatMul into its integer kernel only
    when the Q feeds nothing else. Each pair has its own copy of the scale and zero point, so a later
    common-subexpression pass cannot merge them back."""

    def __init__(self, ctx: QuantContext, precision: str) -> None:
        super().__init__()
        self.ctx = ctx
        self.fmt = FORMATS[precision]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        items = linears(graph, self.ctx)
        for lin in items:
            self._quantize_weight(graph, lin)
        if self.fmt.activations:
            for x, group in by_input(items).items():
                self._quantize_activation(graph, x, group)
        return ir.passes.PassResult(model, bool(items))

    def _weight_amax(self, lin: Linear, source: ir.TensorProtocol) -> np.ndarray:
        """[out] per output channel: from calibration, or (after smoothing changed the weight) by
        reading this one weight now."""
        amax = self.ctx.stats.weight_amax_per_output(lin.name)
        if amax is None:
            amax = np.abs(source.numpy().astype(np.float32)).max(axis=0)
        outputs = source.shape.numpy()[1]
        if amax.shape != (outputs,):
            raise QuantizationError(f"{lin.weight.name}: calibration weight amax has shape {amax.shape}, "
                                    f"the weight has {outputs} output channels")
        return amax

    def _quantize_weight(self, graph: ir.Graph, lin: Linear) -> None:
        fmt, old = self.fmt, lin.weight
        source = old.const_value
        assert source is not None and old.name is not None
        amax = self._weight_amax(lin, source)
        scale = scale_from_amax(amax if fmt.weight_per_channel else amax.max(), fmt.qmax)
        quantized = lazy_weight(f"{old.name}.{fmt.name}", [source], lambda w: fmt.quantize(w, scale),
                                fmt.weight_dtype, list(source.shape.numpy()))
        w_scale = register(graph, const_value(f"{old.name}.scale", scale))
        w_zero = register(graph, const_value(f"{old.name}.zero_point", zero_point(fmt.weight_dtype, scale.shape)))
        dq = ir.node("DequantizeLinear", [register(graph, quantized), w_scale, w_zero],
                     attributes={"axis": 1} if fmt.weight_per_channel else {}, name=f"{lin.name}/weight_dequantize")
        dq.outputs[0].name = f"{old.name}.dequantized"
        dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(source.dtype), ir.Shape(source.shape.numpy())
        graph.insert_before(lin.node, dq)
        lin.node.replace_input_with(1, dq.outputs[0])
        drop_if_unused(graph, old)

    def _quantize_activation(self, graph: ir.Graph, x: ir.Value, group: list[Linear]) -> None:
        """One Q -> DQ pair per consuming MatMul, all with the same (per-tensor) scale."""
        fmt = self.fmt
        amax = max(float(self.ctx.stats.activation_amax(lin.name).max()) for lin in group)
        scale_array, zero_array = scale_from_amax(amax, fmt.qmax), zero_point(fmt.weight_dtype, ())
        for lin in group:
            scale = register(graph, const_value(f"{lin.name}.input_scale", scale_array))
            zero = register(graph, const_value(f"{lin.name}.input_zero_point", zero_array))
            insert_input_qdq(graph, lin.node, x, scale, zero, fmt.weight_dtype, lin.name, lin.name)


def insert_input_qdq(graph: ir.Graph, matmul: ir.Node, x: ir.Value, scale: ir.Value, zero: ir.Value,
                     qtype: ir.DataType, node_prefix: str, value_prefix: str) -> None:
    """QuantizeLinear -> DequantizeLinear of `x` right before `matmul`, which then reads the DQ output
    (TensorRT's explicit-quantization placement: the pair sits directly on the MatMul input)."""
    q = ir.node("QuantizeLinear", [x, scale, zero], name=f"{node_prefix}/input_quantize")
    q.outputs[0].name = f"{value_prefix}.input_quantized"
    q.outputs[0].type, q.outputs[0].shape = ir.TensorType(qtype), x.shape
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], name=f"{node_prefix}/input_dequantize")
    dq.outputs[0].name = f"{value_prefix}.input_dequantized"
    dq.outputs[0].type, dq.outputs[0].shape = x.type, x.shape
    graph.insert_before(matmul, [q, dq])
    matmul.replace_input_with(0, dq.outputs[0])


def attention_layer(node: ir.Node) -> int:
    """The decoder layer of an attention node, from its present_key output (`present_key.{i}`)."""
    name = node.outputs[1].name or ""
    if not name.startswith("present_key."):
        raise QuantizationError(f"{node.name}: cannot tell its layer (present_key output is named {name!r})")
    return int(name.rsplit(".", 1)[1])


class QuantizeKVCache(ir.passes.InPlacePass):
    """FP8 E4M3 KV cache: set each `LlamaAttention` node's `kv_cache_quant`, `k_scale` and `v_scale`
    (separate per layer; K measured after RoPE, i.e. as cached). Backends implement it: the ORT
    lowering inserts Q/DQ on the rotated K and on V before they enter the cache."""

    def __init__(self, ctx: QuantContext) -> None:
        super().__init__()
        self.ctx = ctx

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        stats = self.ctx.stats
        nodes = [n for n in model.graph if n.op_type == OP_TYPE and n.domain == DOMAIN]
        if not nodes:
            raise QuantizationError(f"KV_CACHE=fp8: no {DOMAIN}::{OP_TYPE} node left to carry the cache scales "
                                    "(the pass must run before the attention lowering)")
        for node in nodes:
            layer = attention_layer(node)
            if layer >= len(stats.k_amax) or layer >= len(stats.v_amax):
                raise QuantizationError(f"{node.name}: calibration statistics have K/V amax for "
                                        f"{len(stats.k_amax)} layers, not layer {layer}")
            node.attributes["kv_cache_quant"] = ir.AttrString("kv_cache_quant", "fp8")
            node.attributes["k_scale"] = ir.AttrFloat32("k_scale", float(scale_from_amax(stats.k_amax[layer], FP8_MAX)))
            node.attributes["v_scale"] = ir.AttrFloat32("v_scale", float(scale_from_amax(stats.v_amax[layer], FP8_MAX)))
        return ir.passes.PassResult(model, True)
