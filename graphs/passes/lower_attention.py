"""Lower every `llamaforge::LlamaAttention` node for a backend."""

from __future__ import annotations

import onnx_ir as ir

from plugins.attention import ort_lowering
from plugins.attention.schema import DOMAIN, OP_TYPE, AttentionAttrs


def attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == OP_TYPE and n.domain == DOMAIN]


def node_attrs(node: ir.Node) -> AttentionAttrs:
    return AttentionAttrs.from_onnx_attributes({k: a.value for k, a in node.attributes.items()})


class LowerAttentionForORT(ir.passes.InPlacePass):
    """Replace the plugin op by standard ONNX ops (see `plugins/attention/ort_lowering.py`)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = attention_nodes(graph)
        for node in nodes:
            new_nodes, outputs = ort_lowering.decompose(node, node_attrs(node))
            graph.insert_before(node, new_nodes)
            for old, new in zip(node.outputs, outputs):
                new.shape, new.type = old.shape, old.type
                if old.is_graph_output():  # graph outputs keep their public names (present_key.N ...)
                    name = old.name
                    old.name = f"{name}.lowered"
                    new.name = name
                ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            graph.remove(node, safe=True)
        if nodes and DOMAIN in model.opset_imports:
            del model.opset_imports[DOMAIN]
        return ir.passes.PassResult(model, bool(nodes))
