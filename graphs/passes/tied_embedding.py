"""`share-tied-embedding`: a tied LM head reads the embedding table itself, so the engine stores it
once (issue 18: twice cost +113 MB on a 135M model, +0.79 GB on Llama 3.2 3B).

`fold-weight-transposes` gives every `nn.Linear` a pre-transposed weight `W.T`, which is right for a
weight only its MatMul reads, but a tied head's `W` is also the embedding its Gather reads, so the
engine would hold `W` and `W.T`. This pass, run after quantization and lowering, rewrites such a
head `MatMul(x, W.T)` into `Gemm(x, W, transB=1)` between two Reshapes (Gemm is 2-D; ONNX Runtime
and TensorRT both read B transposed without copying it) and drops `W.T`.

A head that quantization rewrote (`--quantize-lm-head`) no longer reads `W.T` and is left alone:
its weight is then an 8-bit tensor of its own beside the float embedding.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llamaforge.graphs.passes.weights import TRANSPOSE_OF


def _tied_source(graph: ir.Graph, weight: ir.Value) -> ir.Value | None:
    """The initializer `weight` is the transpose of, when something else reads it too (a tie)."""
    source = graph.initializers.get(str(weight.meta.get(TRANSPOSE_OF, "")))
    if source is None or not weight.is_initializer() or source.const_value is None:
        return None
    return source if source.uses() else None


class ShareTiedEmbedding(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "MatMul" or node.domain != "" or node.inputs[1] is None:
                continue
            transposed = node.inputs[1]
            source = _tied_source(graph, transposed)
            x = node.inputs[0]
            if source is None or x is None or source.shape is None:
                continue
            rows, hidden = source.shape.numpy()
            name = node.name or "tied_head"
            const = _constants(graph, name, hidden, rows)
            shape = ir.node("Shape", [x], name=f"{name}/shape", num_outputs=1)
            lead = ir.node("Slice", [shape.outputs[0], const["start"], const["stop"]], name=f"{name}/lead")
            out_shape = ir.node("Concat", [lead.outputs[0], const["rows"]], attributes={"axis": 0},
                                name=f"{name}/out_shape")
            flat = ir.node("Reshape", [x, const["flat"]], name=f"{name}/flatten")
            gemm = ir.node("Gemm", [flat.outputs[0], source], attributes={"transB": 1}, name=f"{name}/gemm")
            y = ir.node("Reshape", [gemm.outputs[0], out_shape.outputs[0]], name=f"{name}/unflatten")
            out = node.outputs[0]
            y.outputs[0].type, y.outputs[0].shape = out.type, out.shape
            graph.insert_after(node, [shape, lead, out_shape, flat, gemm, y])
            # The head's output is usually the graph's `logits`: the new one takes its place and name.
            ir.convenience.replace_all_uses_with(out, y.outputs[0], replace_graph_outputs=True)
            y.outputs[0].name, out.name = out.name, f"{out.name}/untied"
            graph.remove(node, safe=True)
            if not transposed.uses():
                graph.initializers.pop(str(transposed.name))
            modified = True
        return ir.passes.PassResult(model, modified)


def _constants(graph: ir.Graph, prefix: str, hidden: int, rows: int) -> dict[str, ir.Value]:
    values = {"start": [0], "stop": [-1], "rows": [rows], "flat": [-1, hidden]}
    out = {}
    for key, data in values.items():
        name = f"{prefix}/{key}"
        tensor = ir.tensor(np.array(data, dtype=np.int64), name=name)
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([len(data)]),
                         const_value=tensor)
        graph.register_initializer(value)
        out[key] = value
    return out
