"""Lower every `llamaforge::CrossAttention` node for ONNX Runtime (see `plugins/cross_attention/ort_lowering.py`)."""

from __future__ import annotations

import onnx_ir as ir

from llamaforge.plugins.attention.ort_lowering import name_values
from llamaforge.plugins.cross_attention import ort_lowering
from llamaforge.plugins.cross_attention.schema import DOMAIN, OP_TYPE, CrossAttentionAttrs


def cross_attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == OP_TYPE and n.domain == DOMAIN]


class LowerCrossAttentionForORT(ir.passes.InPlacePass):
    """Replace the op by its standard-op decomposition; nothing changes in a model without it."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = cross_attention_nodes(graph)
        for index, node in enumerate(nodes):
            attrs = CrossAttentionAttrs.from_onnx_attributes({k: a.value for k, a in node.attributes.items()})
            new_nodes, outputs = ort_lowering.decompose(node, attrs)
            name_values(node.name or f"cross_attention_{index}", new_nodes)
            graph.insert_before(node, new_nodes)
            for old, new in zip(node.outputs, outputs):
                new.shape, new.type = old.shape, old.type
                if old.is_graph_output():  # graph outputs keep their public names (present_cross_key.N ...)
                    name, old.name = old.name, f"{old.name}.lowered"
                    new.name = name
                ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            graph.remove(node, safe=True)
        if nodes and not any(n.domain == DOMAIN for n in graph) and DOMAIN in model.opset_imports:
            del model.opset_imports[DOMAIN]
        return ir.passes.PassResult(model, bool(nodes))
