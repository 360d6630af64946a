"""Fusions that ONNX Runtime has kernels for: RMSNorm (+ residual add) and packed QKV."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

from llamaforge.graphs.passes.weights import constant_input, lazy_weight
from llamaforge.plugins.attention.schema import DOMAIN, OP_TYPE


class FuseRMSNorm(ir.passes.InPlacePass):
    """x * rsqrt(mean(x^2) + eps) * w -> one normalisation node, and the residual Add feeding it
    -> com.microsoft SkipSimplifiedLayerNormalization.

    onnxscript's rule emits ORT's `SimplifiedLayerNormalization`, which ORT registers in the ONNX
    domain where the checker cannot see it; the remainder become the standard opset-23
    `RMSNormalization` (same maths, float32 stash), which ORT runs natively.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = fuse_rms_normalization(model)
        count += fuse_skip_rms_normalization(model)
        for node in list(model.graph):
            if node.op_type == "SimplifiedLayerNormalization" and node.domain == "":
                tape = ir.tape.Tape()
                out = tape.op(
                    "RMSNormalization", list(node.inputs[:2]),
                    {"axis": node.attributes.get_int("axis", -1), "epsilon": node.attributes.get_float("epsilon", 1e-5),
                     "stash_type": 1},
                )
                model.graph.insert_before(node, tape.nodes)
                ir.convenience.replace_all_uses_with(node.outputs[0], out)
                model.graph.remove(node, safe=True)
        return ir.passes.PassResult(model, count > 0)


class FuseQKV(ir.passes.InPlacePass):
    """Three projections of the same input feeding one attention op -> one MatMul on a packed
    [hidden, q + 2 kv] weight, then Split. One pass over the activations instead of three."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != OP_TYPE or node.domain != DOMAIN:
                continue
            producers = [v.producer() if v is not None else None for v in node.inputs[:3]]
            matmuls = [p for p in producers if p is not None and p.op_type == "MatMul"]
            if len(matmuls) != 3:
                continue
            x = matmuls[0].inputs[0]
            constants = [constant_input(p.inputs[1]) for p in matmuls]
            weights = [w for w in constants if w is not None and w.shape.rank() == 2]
            if any(p.inputs[0] is not x for p in matmuls) or len(weights) != 3:
                continue
            shapes = [w.shape.numpy() for w in weights]  # initializers: every dim is an int
            widths = [shape[1] for shape in shapes]
            base = (weights[0].name or "").replace(".q_proj.", ".qkv_proj.")
            packed = lazy_weight(base, weights, lambda *ws: np.concatenate(ws, axis=1),
                                 weights[0].dtype, [shapes[0][0], sum(widths)])
            graph.register_initializer(packed)
            tape = ir.tape.Tape()
            qkv = tape.op("MatMul", [x, packed])
            split = tape.op("Constant", [], {"value": ir.tensor(np.array(widths, dtype=np.int64), name="qkv_split")})
            parts = tape.op_multi_out("Split", [qkv, split], {"axis": -1}, num_outputs=3)
            graph.insert_before(matmuls[0], tape.nodes)
            for old, new in zip(node.inputs[:3], parts):
                assert old is not None
                ir.convenience.replace_all_uses_with(old, new)
            for p in matmuls:
                graph.remove(p, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
