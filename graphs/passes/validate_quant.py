"""`validate-quantization`: check a quantized graph against TensorRT's explicit-quantization rules.

Rules (each failure names the node and tensor):
  * only standard-domain QuantizeLinear / DequantizeLinear; no fused or integer ops
    (QLinearMatMul, MatMulInteger, MatMulNBits, DynamicQuantizeLinear, ...);
  * block quantization only for INT4 weights (int4-awq / int4-rtn): a DequantizeLinear of a stored
    int4 weight [in, out] with axis 0 and block_size the one `int4.block_for` gives that weight
    (the configured --int4-block-size, or the largest smaller one dividing `in`), its scale
    [in / block, out]; no int4 without blocks, no blocks on anything else;
  * quantized types are the precision's own (int8, int4 or float8e4m3fn);
  * symmetric: every zero point is a constant of zeros of the quantized type;
  * scales are constant float32, finite and > 0, scalar (per tensor) or [C] matching the axis dim;
    except int8-sq's per-token activation scale (--int8-activation per-token), which the graph
    computes from the quantized tensor itself: max(ReduceMax(|x|, axes=[-1]) / 127, floor), with
    one block spanning the last axis and no zero point (graphs/passes/quantize.py);
  * placement: a DequantizeLinear feeds only MatMul inputs; one reading a stored weight feeds the
    MatMul's weight input; a QuantizeLinear feeds only DequantizeLinears with its own scale;
  * coverage: every linear MatMul that the configuration quantizes reads a quantized weight through
    DequantizeLinear, and with W8A8 a Q/DQ'd activation;
  * KV cache: with KV_CACHE=fp8, every attention op still present carries positive K/V scales.
  * MoE experts (inside the lowered MoE's Loop body, which is checked like the main graph): a
    DequantizeLinear may read one expert's slice, `Gather(axis=0, e)` of a stored quantized weight
    [E, ...], with its scale `Gather(axis=0, e)` of a constant table [E] or [E, C] and the same e;
    no float expert weight may remain when the precision quantizes experts. fp8 experts (ONNX has
    no float8 Gather) are dequantized whole instead: a DequantizeLinear with per-expert scales
    (axis 0) of a stored [E, ...] weight may feed `Gather(axis=0)`s that feed MatMul weight inputs.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llamaforge.graphs.passes.quantize import FORMATS, PER_TOKEN_CHAIN, check_per_token_qdq, linears
from llamaforge.graphs.passes.quantize_experts import EXPERT_PRECISIONS, EXPERT_WEIGHT_SUFFIXES, expert_weights
from llamaforge.graphs.quantization.int4 import INT4_PRECISIONS, block_for
from llamaforge.graphs.quantization.recipes import QuantContext, QuantizationError
from llamaforge.plugins.attention.schema import DOMAIN, OP_TYPE

QDQ = ("QuantizeLinear", "DequantizeLinear")
FUSED_QUANT_OPS = {"QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "MatMulNBits", "DynamicQuantizeLinear",
                   "DynamicQuantizeMatMul", "QGemm", "QAttention", "QLinearConv", "ConvInteger", "GatherBlockQuantized"}


def _fail(node: ir.Node, message: str) -> QuantizationError:
    return QuantizationError(f"validate-quantization: node {node.name!r} ({node.op_type}): {message}")


class ValidateQuantization(ir.passes.InPlacePass):
    """Fails with `QuantizationError` on the first rule broken; changes nothing."""

    def __init__(self, ctx: QuantContext) -> None:
        super().__init__()
        self.ctx = ctx
        precision = ctx.config.precision
        self.int4 = precision in INT4_PRECISIONS
        self.allowed = {ir.DataType.INT4 if self.int4 else FORMATS[precision].weight_dtype} if precision else set()
        if ctx.config.kv_cache == "fp8":
            self.allowed.add(ir.DataType.FLOAT8E4M3FN)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for node in ir.traversal.RecursiveGraphIterator(graph):  # Loop bodies (lowered MoE) included
            if node.op_type in FUSED_QUANT_OPS:
                raise _fail(node, "fused/integer quantized op: explicit quantization allows only QuantizeLinear/DequantizeLinear")
            if node.op_type in QDQ:
                if node.domain != "":
                    raise _fail(node, f"domain {node.domain!r}: only the standard ONNX {node.op_type} is allowed")
                self._check_qdq(node)
        self._check_coverage(graph)
        self._check_kv(graph)
        return ir.passes.PassResult(model, False)

    # -- one Q or DQ node -----------------------------------------------------------------------------
    def _check_qdq(self, node: ir.Node) -> None:
        data, scale_v, zero_v = (list(node.inputs) + [None, None])[:3]
        producer = scale_v.producer() if scale_v is not None else None
        if producer is not None and producer.op_type == PER_TOKEN_CHAIN[-1]:  # int8-sq's per-token form (quantize.py)
            self._check_per_token(node)
            return
        if node.attributes.get_int("block_size", 0) or (data is not None and data.dtype == ir.DataType.INT4):
            self._check_int4_block(node)
        if zero_v is None:
            raise _fail(node, "no zero point: symmetric quantization needs an explicit zero point of 0 (it also sets the type)")
        zero = self._const(node, zero_v, "zero point")
        if zero.dtype not in self.allowed:
            raise _fail(node, f"zero point {zero_v.name!r} has type {zero.dtype.name}; this precision allows "
                              f"{sorted(d.name for d in self.allowed) or 'no quantized types'}")
        if np.any(zero.numpy().astype(np.float32) != 0):
            raise _fail(node, f"zero point {zero_v.name!r} is not 0 (asymmetric quantization)")
        assert scale_v is not None
        gathered = self._gathered_pair(node)
        scale = self._const(node, scale_v, "scale") if gathered is None else gathered[1]
        table = scale.numpy()
        values = table if gathered is None else table[0]  # one expert's row: the shape of each
        if scale.dtype != ir.DataType.FLOAT:
            raise _fail(node, f"scale {scale_v.name!r} has type {scale.dtype.name}, expected FLOAT")
        if not np.all(np.isfinite(table)) or np.any(table <= 0):
            raise _fail(node, f"scale {scale_v.name!r} has values that are not finite and > 0 (min {table.min()})")
        if values.shape != zero.numpy().shape:
            raise _fail(node, f"scale {scale_v.name!r} shape {values.shape} != zero point shape {zero.numpy().shape}")
        blocked = bool(node.attributes.get_int("block_size", 0))
        if values.ndim > 1 and not blocked:
            raise _fail(node, f"scale {scale_v.name!r} has rank {values.ndim}; expected a scalar or one scale per channel")
        if node.op_type == "QuantizeLinear":
            self._check_quantize(node)
        else:
            self._check_dequantize(node, () if blocked else values.shape, gathered)

    def _check_per_token(self, node: ir.Node) -> None:
        """int8-sq's per-token activation Q/DQ: a scale computed in the graph from the quantized
        tensor itself (max |x_token| / 127), one block spanning the hidden axis; placement as usual."""
        config = self.ctx.config
        if config.precision != "int8-sq" or config.int8_activation != "per-token":
            raise _fail(node, "per-token activation quantization is only int8-sq's --int8-activation per-token form (this "
                              f"build: PRECISION={config.precision}, --int8-activation {config.int8_activation})")
        check_per_token_qdq(node)
        if node.op_type == "DequantizeLinear":
            self._check_dequantize(node, (), None)
            return
        out = node.outputs[0]  # a QuantizeLinear: only DequantizeLinears of its own scale read it
        for user, _ in out.uses():
            if user.op_type != "DequantizeLinear" or user.inputs[1] is not node.inputs[1]:
                raise _fail(node, f"output {out.name!r} feeds {user.op_type} {user.name!r}; a QuantizeLinear must "
                                  "feed only DequantizeLinears with the same scale")
        if out.is_graph_output():
            raise _fail(node, f"output {out.name!r} is a graph output")

    def _check_int4_block(self, node: ir.Node) -> None:
        """The INT4 weight-only form (module docstring); the shared checks (zero point, scale values,
        placement) follow in _check_qdq."""
        data, scale_v = node.inputs[0], node.inputs[1]
        block, axis = node.attributes.get_int("block_size", 0), node.attributes.get_int("axis", 1)
        if not self.int4:
            raise _fail(node, f"block quantization (block_size={block}) is only INT4 weight-only's form "
                              f"(PRECISION=int4-awq|int4-rtn), not PRECISION={self.ctx.config.precision}'s")
        weight = data.const_value if data is not None and data.is_initializer() else None
        # A dense weight [in, out], or MoE experts [E, in, out] (dequantized whole, quantize_experts.py).
        experts = weight is not None and len(weight.shape) == 3 and str(data.name).endswith(  # type: ignore[union-attr]
            tuple(f"{suffix}.int4" for suffix in EXPERT_WEIGHT_SUFFIXES))
        if (node.op_type != "DequantizeLinear" or weight is None or weight.dtype != ir.DataType.INT4
                or not (len(weight.shape) == 2 or experts)):
            what = f"a stored {weight.dtype.name} tensor of rank {len(weight.shape)}" if weight is not None else "not stored"
            raise _fail(node, f"input {data.name if data else None!r} ({what}): INT4 is weight-only here, a stored "
                              "INT4 weight [in, out] (MoE experts: [E, in, out]) read by DequantizeLinear")
        shape = tuple(int(d) for d in weight.shape.numpy())
        rows, in_axis = shape[-2], len(shape) - 2
        want = block_for(rows, self.ctx.config.int4_block_size)
        if not block or axis != in_axis or block != want:
            raise _fail(node, f"weight {data.name!r} {list(shape)} has block_size={block} on axis {axis}; INT4 "  # type: ignore[union-attr]
                              f"weights take block_size={want} on axis {in_axis} (--int4-block-size "
                              f"{self.ctx.config.int4_block_size})")
        assert scale_v is not None and data is not None
        scale = self._const(node, scale_v, "scale")
        need = (*shape[:-2], rows // block, shape[-1])
        if tuple(scale.shape.numpy()) != need:
            raise _fail(node, f"scale {scale_v.name!r} has shape {tuple(scale.shape.numpy())}; blocks of {block} "
                              f"over weight {data.name!r} {list(shape)} need {need}")

    def _gathered_pair(self, node: ir.Node) -> tuple[ir.TensorProtocol, ir.TensorProtocol] | None:
        """(stored weight [E, ...], scale table [E] | [E, C]) when this DequantizeLinear reads one
        expert's slice (data and scale both `Gather(axis=0)` of constants, with the same index);
        None when its data is not a gathered slice."""
        data, scale_v = node.inputs[0], node.inputs[1]
        gather = data.producer() if data is not None else None
        if node.op_type != "DequantizeLinear" or data is None or gather is None or gather.op_type != "Gather":
            return None
        table_gather = scale_v.producer() if scale_v is not None else None
        stored = gather.inputs[0]
        if stored is None or not stored.is_initializer() or stored.const_value is None:
            raise _fail(node, f"input {data.name!r} gathers from {stored.name if stored else None!r}, not a stored weight")
        if (table_gather is None or table_gather.op_type != "Gather" or table_gather.inputs[1] is not gather.inputs[1]
                or gather.attributes.get_int("axis", 0) != 0 or table_gather.attributes.get_int("axis", 0) != 0):
            raise _fail(node, f"gathered weight slice {data.name!r} needs its scale gathered (axis 0) with the same index")
        table = self._const(node, table_gather.inputs[0], "scale table")  # type: ignore[arg-type]
        if table.shape.numpy()[:1] != stored.const_value.shape.numpy()[:1]:
            raise _fail(node, f"scale table {table_gather.inputs[0].name!r} has {table.shape.numpy()[:1]} rows, "  # type: ignore[union-attr]
                              f"weight {stored.name!r} has {stored.const_value.shape.numpy()[:1]} experts")
        return stored.const_value, table

    @staticmethod
    def _const(node: ir.Node, value: ir.Value, what: str) -> ir.TensorProtocol:
        tensor = value.const_value if value.is_initializer() else None
        if tensor is None:
            producer = value.producer()
            if producer is not None and producer.op_type == "Constant":
                tensor = producer.attributes["value"].as_tensor()
        if tensor is None:
            raise _fail(node, f"{what} {value.name!r} is not a constant")
        return tensor

    def _check_quantize(self, node: ir.Node) -> None:
        out = node.outputs[0]

        def same(a: ir.Value | None, b: ir.Value | None, what: str) -> bool:
            if a is b:
                return True
            if a is None or b is None:
                return False
            x, y = self._const(node, a, what), self._const(node, b, what)
            return x.dtype == y.dtype and np.array_equal(x.numpy(), y.numpy())

        for user, _ in out.uses():
            if (user.op_type != "DequantizeLinear" or not same(user.inputs[1], node.inputs[1], "scale")
                    or not same(user.inputs[2], node.inputs[2], "zero point")):
                raise _fail(node, f"output {out.name!r} feeds {user.op_type} {user.name!r}; a QuantizeLinear must "
                                  "feed only DequantizeLinears with the same scale and zero point")
        if out.is_graph_output():
            raise _fail(node, f"output {out.name!r} is a graph output")

    def _check_dequantize(self, node: ir.Node, scale_shape: tuple[int, ...],
                          gathered: tuple[ir.TensorProtocol, ir.TensorProtocol] | None) -> None:
        data = node.inputs[0]
        assert data is not None
        weight = data.const_value if data.is_initializer() else None
        shape = weight.shape if weight is not None else data.shape
        if gathered is not None:  # one expert's slice of a stored weight: shaped like a weight row
            weight, shape = gathered[0], ir.Shape(gathered[0].shape.numpy()[1:])
        source = data.producer()
        if weight is None and (source is None or source.op_type != "QuantizeLinear"):
            raise _fail(node, f"input {data.name!r} is neither a stored quantized weight nor a QuantizeLinear output")
        if scale_shape:
            axis = node.attributes.get_int("axis", 1)
            if shape is None or not isinstance(shape[axis], int) or shape[axis] != scale_shape[0]:
                raise _fail(node, f"per-channel scale of {scale_shape[0]} does not match axis {axis} of {data.name!r} (shape {shape})")
        out = node.outputs[0]
        if out.is_graph_output():
            raise _fail(node, f"output {out.name!r} is a graph output")
        for user, index in out.uses():
            if (user.op_type == "Gather" and weight is not None and len(weight.shape) == 3 and index == 0
                    and node.attributes.get_int("axis", 1) == (1 if node.attributes.get_int("block_size", 0) else 0)
                    and user.attributes.get_int("axis", 0) == 0):  # fp8 (per expert, axis 0) / int4 (blocks, axis 1) experts
                user, index = self._expert_slice_reader(node, user)
            if user.op_type != "MatMul":
                raise _fail(node, f"output {out.name!r} feeds {user.op_type} {user.name!r}: Q/DQ must sit right before MatMul inputs")
            if weight is not None and index != 1:
                raise _fail(node, f"stored weight {data.name!r} feeds input {index} of MatMul {user.name!r}, not its weight input")

    @staticmethod
    def _expert_slice_reader(node: ir.Node, gather: ir.Node) -> tuple[ir.Node, int]:
        """The one (MatMul, input index) that reads the expert slice `gather` takes from `node`'s output."""
        uses = list(gather.outputs[0].uses())
        if len(uses) != 1:
            raise _fail(node, f"expert slice {gather.outputs[0].name!r} feeds {len(uses)} nodes; expected one MatMul")
        return uses[0]

    # -- the graph as a whole -------------------------------------------------------------------------
    def _check_coverage(self, graph: ir.Graph) -> None:
        precision = self.ctx.config.precision
        if precision is None:
            return
        for lin in linears(graph, self.ctx):  # an unquantized float weight still feeding a linear
            raise _fail(lin.node, f"weight {lin.weight.name!r} of {lin.name!r} is stored unquantized; "
                                  f"PRECISION={precision} needs it quantized and followed by DequantizeLinear")
        if precision in EXPERT_PRECISIONS:
            for value in expert_weights(graph):
                reader = next((n for n, _ in value.uses()), None)
                if reader is not None:
                    raise _fail(reader, f"MoE expert weight {value.name!r} is stored unquantized; PRECISION={precision} "
                                        "needs it quantized and followed by DequantizeLinear")
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.op_type != "MatMul":
                continue
            dq = node.inputs[1].producer() if node.inputs[1] is not None else None
            if dq is not None and dq.op_type == "Gather" and dq.inputs[0] is not None:  # fp8 experts: DQ -> Gather
                dq = dq.inputs[0].producer()
            data = dq.inputs[0] if dq is not None and dq.op_type == "DequantizeLinear" else None
            gather = data.producer() if data is not None else None
            stored = data is not None and (data.is_initializer() or (gather is not None and gather.op_type == "Gather"))
            if not stored:
                continue
            if precision in FORMATS and FORMATS[precision].activations:
                x = node.inputs[0].producer() if node.inputs[0] is not None else None
                if x is None or x.op_type != "DequantizeLinear":
                    raise _fail(node, f"PRECISION={precision} is W8A8 but activation input {node.inputs[0].name!r} "  # type: ignore[union-attr]
                                      "has no QuantizeLinear/DequantizeLinear pair in front")

    def _check_kv(self, graph: ir.Graph) -> None:
        if self.ctx.config.kv_cache != "fp8":
            return
        for node in graph:
            if node.op_type == OP_TYPE and node.domain == DOMAIN:
                attrs = node.attributes
                if attrs.get_string("kv_cache_quant", "none") != "fp8":
                    raise _fail(node, "KV_CACHE=fp8 but the attention op has no kv_cache_quant=fp8")
                for key in ("k_scale", "v_scale"):
                    value = attrs.get_float(key, 0.0)
                    if not np.isfinite(value) or value <= 0:
                        raise _fail(node, f"attribute {key}={value} must be finite and > 0")
