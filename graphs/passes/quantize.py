"""Quantization passes: SmoothQuant folding, Q/DQ insertion before MatMuls, FP8 KV-cache scales.

A "linear" here is a MatMul whose second input is a constant rank-2 weight [in, out] (after
`fold-weight-transposes`), named after the checkpoint's module (`...self_attn.qkv_proj` for the
packed projection). Scales come from `CalibrationStats`; new weights are lazy tensors, computed one
at a time when the engine is written, like every other weight-rewriting pass (bounded memory).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from llamaforge.graphs.passes.weights import constant_input, lazy_weight
from llamaforge.graphs.quantization.recipes import (
    FP8_MAX,
    INT8_MAX,
    PER_TOKEN_SCALE_FLOOR,
    CalibrationStats,
    QuantContext,
    QuantizationError,
    ValueHeads,
    fp8_weight_scale,
    is_router,
    quantize_fp8,
    quantize_int8,
    scale_from_amax,
    smoothquant_factors,
)
from llamaforge.plugins.attention.schema import DOMAIN, OP_TYPE, AttentionAttrs

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


LAYER_PREFIX = re.compile(r"model\.layers\.\d+\.")


def linear_name(node: ir.Node) -> str:
    if any(o.name == LOGITS and o.is_graph_output() for o in node.outputs):
        return "lm_head"  # by position: a tied lm_head's weight is named after the embedding
    name = node.inputs[1].name or ""  # type: ignore[union-attr]
    stripped = None
    while stripped != name:  # model.layers.0.mlp.up_proj.weight.T(.smoothed) -> model.layers.0.mlp.up_proj
        stripped, name = name, name.removesuffix(".smoothed").removesuffix(".T").removesuffix(".weight")
    return name


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


def by_input(items: list[Linear]) -> list[tuple[ir.Value, list[Linear]]]:
    """The linears grouped by the tensor they read, one group per decoder layer: Llama 3.2 Vision's
    cross-attention layers all read the graph input `cross_attention_states` (k_proj, v_proj), and
    calibration measures and searches each layer on its own, so each layer's pair is a group (an
    input smoothed gets one Mul per layer). In a text model no tensor feeds two layers' linears."""
    groups: dict[tuple[ir.Value, str], list[Linear]] = {}
    for lin in items:
        x = lin.node.inputs[0]
        assert x is not None
        layer = LAYER_PREFIX.match(lin.name)
        groups.setdefault((x, layer.group(0) if layer else ""), []).append(lin)
    return [(x, group) for (x, _), group in groups.items()]


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
    gate/up), 1/s is folded into the norm's weight; into up_proj's output columns for down_proj;
    into the value columns of the QKV weight for o_proj, whose statistics are first tied over the
    query heads sharing a value head (recipes.ValueHeads), as calibration's search tied them (see
    `apply_smoothing`). Linears sharing an input share s (computed over all their weights).
    alpha is `--smoothquant-alpha` when forced, else the one calibration's search chose for the
    group (graphs/quantization/search.py). The statistics in the context are updated to describe
    the smoothed model."""

    def __init__(self, ctx: QuantContext) -> None:
        super().__init__()
        self.ctx = ctx

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph, stats = model.graph, self.ctx.stats
        groups = by_input(linears(graph, self.ctx))
        if self.ctx.config.smoothquant_alpha is None:
            # the alpha search covers the decoder layers: a quantized lm_head keeps its input as it is
            groups = [(x, g) for x, g in groups if all(lin.name != "lm_head" for lin in g)]
        for x, group in groups:
            alpha = self._alpha(group)
            a = np.maximum.reduce([stats.activation_amax(lin.name) for lin in group])
            w = np.maximum.reduce([stats.weight_amax_per_input(lin.name) for lin in group])
            attention = attention_producing(x)
            s = smoothquant_factors(a, w, alpha, value_heads(attention) if attention is not None else None)
            apply_smoothing(graph, x, group, s, stats)
        return ir.passes.PassResult(model, bool(groups))

    def _alpha(self, group: list[Linear]) -> float:
        forced = self.ctx.config.smoothquant_alpha
        if forced is not None:
            return forced
        alphas = {self.ctx.stats.searched_alpha(lin.name) for lin in group}
        if len(alphas) != 1:
            raise QuantizationError(f"{[lin.name for lin in group]} read one input but calibration searched different "
                                    f"SmoothQuant alphas for them {sorted(alphas)}")
        return alphas.pop()


def _fold_into_norm(graph: ir.Graph, x: ir.Value, group: list[Linear], s: np.ndarray, stats: CalibrationStats) -> bool:
    """x = RMSNorm(h) * gamma feeding only `group`: 1/s goes into gamma."""
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


def _fold_into_gated_linear(graph: ir.Graph, x: ir.Value, group: list[Linear], s: np.ndarray,
                            stats: CalibrationStats) -> bool:
    """x = a * (h W_up), the SwiGLU product down_proj reads: x / s = a * (h (W_up diag(1/s))), so 1/s
    goes exactly into the up projection's output columns, where the explicit Mul would cost a
    kernel launch per layer and step. Only where x feeds nothing but `group` and W_up's output
    feeds nothing but the product."""
    product = x.producer()
    if product is None or (product.op_type, product.domain) != ("Mul", "") or {n for n, _ in x.uses()} != {lin.node for lin in group}:
        return False
    for factor in sorted(product.inputs, key=lambda v: not linear_name_of(v).endswith("up_proj")):
        up = factor.producer() if factor is not None else None
        if factor is None or up is None or (up.op_type, up.domain) != ("MatMul", "") or len(factor.uses()) != 1:
            continue
        weight = up.inputs[1]
        source = constant_input(weight)
        if weight is None or source is None or source.shape.rank() != 2 or source.shape.numpy()[1] != len(s) or len(weight.uses()) != 1:
            continue
        scaled = lazy_weight(f"{weight.name}.smoothed", [source], lambda w: w / s[None, :].astype(w.dtype),
                             source.dtype, list(source.shape.numpy()))
        up.replace_input_with(1, register(graph, scaled))
        drop_if_unused(graph, weight)
        stats.output_scaled(linear_name(up))
        return True
    return False


def attention_producing(x: ir.Value) -> ir.Node | None:
    """The self-attention op whose output `x` is, or None."""
    node = x.producer()
    if node is None or (node.domain, node.op_type) != (DOMAIN, OP_TYPE) or x is not node.outputs[0]:
        return None
    return node


def value_heads(attention: ir.Node) -> ValueHeads:
    attrs = AttentionAttrs.from_onnx_attributes({k: a.value for k, a in attention.attributes.items()})
    return ValueHeads(attrs.head_dim, attrs.group_size)


def _value_columns(v: ir.Value, width: int) -> tuple[ir.Node, slice] | None:
    """(the MatMul computing `v`, v's columns of its weight): v_proj's own MatMul, or the last output of
    the Split of fuse-qkv's packed MatMul (q, k, v in that order, so v is its last `width` columns).
    None for any other producer (a bias Add, a TP rank's gather...)."""
    node = v.producer()
    if node is not None and (node.op_type, node.domain) == ("Split", "") and v is node.outputs[-1] and node.inputs[0] is not None:
        matmul, packed = node.inputs[0].producer(), node.inputs[0]
        if matmul is None or len(packed.uses()) != 1:
            return None
    else:
        matmul, packed = node, v
    if matmul is None or (matmul.op_type, matmul.domain) != ("MatMul", "") or matmul.outputs[0] is not packed:
        return None
    weight = constant_input(matmul.inputs[1])
    if weight is None or weight.shape.rank() != 2 or len(v.uses()) != 1 or len(matmul.inputs[1].uses()) != 1:  # type: ignore[union-attr]
        return None
    columns = weight.shape.numpy()[1]
    return (matmul, slice(columns - width, columns)) if columns >= width else None


def _fold_into_value_projection(graph: ir.Graph, x: ir.Value, group: list[Linear], s: np.ndarray,
                                stats: CalibrationStats) -> bool:
    """x = attention(q, k, v), o_proj's input: channel d of query head h is a softmax-weighted sum of
    channel d of value head h // group, so x / s = attention(q, k, v / s_v) when s is the same on
    every query head of a group (s_v its value per value channel), and 1/s_v goes exactly into v's
    columns of the (packed QKV) weight. Not with an fp8 KV cache: its V scale was measured on v as
    it was. Stats: the QKV weight's are re-measured (its per-output-channel scales move with the
    columns, so int8's and int4's rounding of it is unchanged)."""
    attention = attention_producing(x)
    if attention is None or {n for n, _ in x.uses()} != {lin.node for lin in group}:
        return False
    attrs = AttentionAttrs.from_onnx_attributes({k: a.value for k, a in attention.attributes.items()})
    s_v = value_heads(attention).per_value_channel(s)
    v = attention.inputs[2]
    if attrs.kv_cache_quant != "none" or s_v is None or v is None or len(s_v) != attrs.num_kv_heads * attrs.head_dim:
        return False
    found = _value_columns(v, len(s_v))
    if found is None:
        return False
    matmul, columns = found
    weight = matmul.inputs[1]
    source = constant_input(weight)
    assert weight is not None and source is not None

    def scaled(w: np.ndarray) -> np.ndarray:
        out = w.copy()
        out[:, columns] = w[:, columns] / s_v[None, :].astype(w.dtype)
        return out

    matmul.replace_input_with(1, register(graph, lazy_weight(f"{weight.name}.smoothed", [source], scaled, source.dtype,
                                                             list(source.shape.numpy()))))
    drop_if_unused(graph, weight)
    stats.output_scaled(linear_name(matmul))
    return True


def linear_name_of(value: ir.Value | None) -> str:
    """The linear that produces `value`, or "" (not a MatMul on a weight)."""
    node = value.producer() if value is not None else None
    return linear_name(node) if node is not None and node.op_type == "MatMul" and constant_input(node.inputs[1]) else ""


def apply_smoothing(graph: ir.Graph, x: ir.Value, group: list[Linear], s: np.ndarray, stats: CalibrationStats) -> None:
    """x W = (x / s)(diag(s) W) for every linear of `group` (they all read `x`): 1/s folded into the
    producing RMSNorm's weight when it feeds only this group, into the up projection's output
    columns when x is the SwiGLU product, into the value projection's columns when x is the
    attention output and s is tied over query heads, else an explicit Mul(x, 1/s); the weight rows multiplied by
    s (lazily); `stats` updated to describe the smoothed model. Shared by SmoothQuant and AWQ
    (graphs/passes/quantize_int4.py), which differ only in how s is chosen."""
    if not any(fold(graph, x, group, s, stats) for fold in (_fold_into_norm, _fold_into_gated_linear,
                                                             _fold_into_value_projection)):
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

    Symmetric (zero point 0 of the quantized type), per-tensor (fp8: `--fp8-weights per-channel`
    per output channel) or per-output-channel (int8) weight scale. Activation scale: per tensor from
    calibration (fp8: amax or the searched clip; int8-sq `--int8-activation static`), or int8-sq's
    per-token scale computed in the graph (`insert_per_token_qdq`). A Q/DQ pair per consuming
    MatMul, even where two MatMuls read one activation (gate/up): ORT fuses a Q -> DQ -> MatMul
    into its integer kernel only when the Q feeds nothing else. Each static pair has its own copy of
    the scale and zero point, so a later common-subexpression pass cannot merge them back."""

    def __init__(self, ctx: QuantContext, precision: str) -> None:
        super().__init__()
        self.ctx = ctx
        self.fmt = FORMATS[precision]
        config = ctx.config
        self.per_token = precision == "int8-sq" and config.int8_activation == "per-token"
        self.fp8 = precision == "fp8"
        self.weight_per_channel = self.fmt.weight_per_channel or (self.fp8 and config.fp8_weights == "per-channel")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        items = linears(graph, self.ctx)
        for lin in items:
            self._quantize_weight(graph, lin)
        if self.fmt.activations:
            for x, group in by_input(items):
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
        per_channel = self.weight_per_channel
        if self.fp8 and self.ctx.config.fp8_weight_scale != "amax":  # a clip search on the weight: read it now
            scale = fp8_weight_scale(source.numpy(), self.ctx.config.fp8_weight_scale, per_channel)
        else:
            amax = self._weight_amax(lin, source)
            scale = scale_from_amax(amax if per_channel else self.ctx.stats.weight_amax_per_tensor(lin.name, amax),
                                    fmt.qmax)
        quantized = lazy_weight(f"{old.name}.{fmt.name}", [source], lambda w: fmt.quantize(w, scale),
                                fmt.weight_dtype, list(source.shape.numpy()))
        w_scale = register(graph, const_value(f"{old.name}.scale", scale))
        w_zero = register(graph, const_value(f"{old.name}.zero_point", zero_point(fmt.weight_dtype, scale.shape)))
        dq = ir.node("DequantizeLinear", [register(graph, quantized), w_scale, w_zero],
                     attributes={"axis": 1} if per_channel else {}, name=f"{lin.name}/weight_dequantize")
        dq.outputs[0].name = f"{old.name}.dequantized"
        dq.outputs[0].type, dq.outputs[0].shape = ir.TensorType(source.dtype), ir.Shape(source.shape.numpy())
        graph.insert_before(lin.node, dq)
        lin.node.replace_input_with(1, dq.outputs[0])
        drop_if_unused(graph, old)

    def _quantize_activation(self, graph: ir.Graph, x: ir.Value, group: list[Linear]) -> None:
        """One Q -> DQ pair per consuming MatMul, all with the same scale: per tensor (calibrated
        amax, or fp8's searched clip) or per token (computed once for the group)."""
        fmt, stats = self.fmt, self.ctx.stats
        if self.per_token:
            insert_per_token_qdq(graph, x, [lin.node for lin in group], group[0].name, [lin.name for lin in group])
            return
        if self.fp8 and self.ctx.config.fp8_activation_scale != "amax":
            amax = max(stats.activation_clip(lin.name) for lin in group)
        else:
            amax = max(stats.activation_amax_per_tensor(lin.name) for lin in group)
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


# -- int8-sq's per-token activation quantization ------------------------------------------------------
#
# The graph computes each token's scale from the token itself and quantizes with it, in standard ops
# ONNX Runtime runs (opset 21+ block quantization with one block spanning the hidden axis):
#
#   scale = Max(Div(ReduceMax(Abs(x), axes=[-1], keepdims=1), 127), floor)      [..., 1]
#   x_q   = QuantizeLinear(x, scale, axis=-1, block_size=H, output_dtype=INT8)  (no zero point: 0)
#   x_dq  = DequantizeLinear(x_q, scale, axis=-1, block_size=H)                 -> MatMul input 0
#
# (the zero point is left out because a blocked zero point must have the scale's runtime shape;
# output_dtype gives the type, and an absent zero point is 0). TensorRT has no ONNX form for this
# (docs/quantization.md): the trt pipeline keeps int8-sq static.

PER_TOKEN_CHAIN = ("Abs", "ReduceMax", "Div", "Max")


def insert_per_token_qdq(graph: ir.Graph, x: ir.Value, matmuls: list[ir.Node], node_prefix: str,
                         value_prefixes: list[str]) -> None:
    """The per-token scale of `x` (once) and a Q -> DQ pair per MatMul reading `x` (input 0)."""
    weight = matmuls[0].inputs[1]
    hidden = weight.shape[0] if weight is not None and weight.shape is not None else None  # weight [in, out]
    if not isinstance(hidden, int):
        raise QuantizationError(f"{node_prefix}: per-token quantization needs the weight's input dimension to be "
                                f"static; {weight.name if weight else None!r} has shape {weight.shape if weight else None}")
    first = earliest(graph, matmuls)
    axes = register(graph, const_value(f"{node_prefix}.token_axes", np.array([-1], np.int64)))
    qmax = register(graph, const_value(f"{node_prefix}.token_qmax", np.array(INT8_MAX, np.float32)))
    floor = register(graph, const_value(f"{node_prefix}.token_scale_floor", np.array(PER_TOKEN_SCALE_FLOOR, np.float32)))
    scale_shape = ir.Shape([*list(x.shape)[:-1], 1]) if x.shape is not None else None
    nodes = [ir.node("Abs", [x], name=f"{node_prefix}/token_abs")]
    nodes.append(ir.node("ReduceMax", [nodes[-1].outputs[0], axes], attributes={"keepdims": 1},
                         name=f"{node_prefix}/token_amax"))
    nodes.append(ir.node("Div", [nodes[-1].outputs[0], qmax], name=f"{node_prefix}/token_scale_raw"))
    nodes.append(ir.node("Max", [nodes[-1].outputs[0], floor], name=f"{node_prefix}/token_scale"))
    for node, what in zip(nodes, ("abs", "amax", "scale_raw", "scale")):
        node.outputs[0].name = f"{node_prefix}.token_{what}"
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        node.outputs[0].shape = x.shape if what == "abs" else scale_shape
    graph.insert_before(first, nodes)
    scale = nodes[-1].outputs[0]
    block = {"axis": -1, "block_size": hidden}
    for matmul, prefix in zip(matmuls, value_prefixes):
        q = ir.node("QuantizeLinear", [x, scale], attributes={**block, "output_dtype": int(ir.DataType.INT8)},
                    name=f"{prefix}/input_quantize")
        q.outputs[0].name = f"{prefix}.input_quantized"
        q.outputs[0].type, q.outputs[0].shape = ir.TensorType(ir.DataType.INT8), x.shape
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale], attributes=block, name=f"{prefix}/input_dequantize")
        dq.outputs[0].name = f"{prefix}.input_dequantized"
        dq.outputs[0].type, dq.outputs[0].shape = x.type, x.shape
        graph.insert_before(matmul, [q, dq])
        matmul.replace_input_with(0, dq.outputs[0])


def _scalar(value: ir.Value | None) -> float | None:
    tensor = constant_input(value)
    if tensor is None or tensor.shape.numpy() not in ((), (1,)):
        return None
    return float(tensor.numpy().reshape(-1)[0])


def per_token_source(scale: ir.Value | None) -> ir.Value | None:
    """x when `scale` is the per-token scale of x (the chain above, constants included), else None."""
    chain: list[ir.Node] = []
    value = scale
    for op in reversed(PER_TOKEN_CHAIN):
        node = value.producer() if value is not None else None
        if node is None or node.op_type != op or node.domain != "":
            return None
        chain.append(node)
        value = node.inputs[0]
    top_max, div, reduce, _ = chain
    axes = constant_input(reduce.inputs[1]) if len(reduce.inputs) > 1 else None
    floor = _scalar(top_max.inputs[1])
    if (_scalar(div.inputs[1]) != INT8_MAX or floor is None or not 0 < floor <= 1e-30 or axes is None
            or axes.numpy().tolist() != [-1] or reduce.attributes.get_int("keepdims", 1) != 1):
        return None
    return value


def _last_dim(x: ir.Value | None, quantize: ir.Node) -> int | None:
    """The quantized tensor's last dimension: from its shape, or from the weight [in, out] of a
    MatMul its dequantized copy feeds (graphs built without shape inference)."""
    if x is not None and x.shape is not None and isinstance(x.shape[-1], int):
        return x.shape[-1]
    for dq, _ in quantize.outputs[0].uses():
        for matmul, index in dq.outputs[0].uses():
            weight = matmul.inputs[1]
            if matmul.op_type == "MatMul" and index == 0 and weight is not None and weight.shape is not None \
                    and isinstance(weight.shape[0], int):
                return weight.shape[0]
    return None


def check_per_token_qdq(node: ir.Node) -> None:
    """int8-sq's per-token Q or DQ (the form above), or a QuantizationError naming the node."""
    def fail(message: str) -> QuantizationError:
        return QuantizationError(f"validate-quantization: node {node.name!r} ({node.op_type}): per-token quantization: {message}")

    data, scale = node.inputs[0], node.inputs[1]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        raise fail("has a zero point; the per-token form leaves it out (0) and sets output_dtype")
    quantize = node if node.op_type == "QuantizeLinear" else (data.producer() if data is not None else None)
    if quantize is None or quantize.op_type != "QuantizeLinear":
        raise fail(f"input {data.name if data else None!r} is not a QuantizeLinear output")
    x = quantize.inputs[0]
    if quantize.inputs[1] is not scale:
        raise fail(f"scale {scale.name if scale else None!r} is not its QuantizeLinear's scale")
    if per_token_source(scale) is not x:
        raise fail(f"scale {scale.name if scale else None!r} is not max(ReduceMax(|x|, axes=[-1]) / 127, floor) "
                   f"of the quantized input {x.name if x else None!r}")
    hidden = _last_dim(x, quantize)
    if node.attributes.get_int("axis", 1) != -1 or node.attributes.get_int("block_size", 0) != hidden:
        raise fail(f"axis {node.attributes.get_int('axis', 1)}, block_size {node.attributes.get_int('block_size', 0)}; "
                   f"one block must span the last axis (axis -1, block_size {hidden})")
    if node is quantize and node.attributes.get_int("output_dtype", 0) != int(ir.DataType.INT8):
        raise fail("output_dtype is not INT8")


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
