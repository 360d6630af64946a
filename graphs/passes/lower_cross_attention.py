"""Lower every `llamaforge::CrossAttention` node for ONNX Runtime (see `plugins/cross_attention/ort_lowering.py`)."""

from __future__ import annotations

import onnx_ir as ir

from llamaforge.graphs.passes.plugin_node import drop_opset_if_unused, replace_plugin_node
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
            replace_plugin_node(graph, node, new_nodes, outputs, node.name or f"cross_attention_{index}")
        if nodes:
            drop_opset_if_unused(model, DOMAIN)
        return ir.passes.PassResult(model, bool(nodes))
