"""Lower every `llamaforge::MoE` node for ONNX Runtime (see `plugins/moe/ort_lowering.py`)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llamaforge.graphs.passes.plugin_node import drop_opset_if_unused, replace_plugin_node
from llamaforge.graphs.passes.weights import constant_input, lazy_weight
from llamaforge.plugins.moe import ort_lowering
from llamaforge.plugins.moe.schema import DOMAIN, OP_TYPE, MoEAttrs


def transposed_router(graph: ir.Graph, node: ir.Node) -> ir.Value | None:
    """The router weight [E, H] as a lazily transposed initializer `<name>.T` [H, E], as
    `fold-weight-transposes` makes for every nn.Linear (None when the router is not a constant)."""
    source = constant_input(node.inputs[1])
    if source is None:
        return None
    name = f"{source.name}.T"
    if name not in graph.initializers:
        experts, hidden = source.shape.numpy()
        graph.register_initializer(lazy_weight(name, [source], np.transpose, source.dtype, [hidden, experts]))
    return graph.initializers[name]


def moe_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == OP_TYPE and n.domain == DOMAIN]


class LowerMoEForORT(ir.passes.InPlacePass):
    """Replace the MoE op by a Loop over the experts tokens were routed to (`dense=False`, the
    build's choice), or by transformers' every-expert formulation (`dense=True`, the benchmark's peer)."""

    def __init__(self, dense: bool = False) -> None:
        super().__init__()
        self.dense = dense

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = moe_nodes(graph)
        for index, node in enumerate(nodes):
            attrs = MoEAttrs.from_onnx_attributes({k: a.value for k, a in node.attributes.items()})
            lower = ort_lowering.decompose_dense if self.dense else ort_lowering.decompose
            new_nodes, outputs = lower(node, attrs, transposed_router(graph, node))
            replace_plugin_node(graph, node, new_nodes, outputs, node.name or f"moe_{index}")
        if nodes:
            drop_opset_if_unused(model, DOMAIN)
        return ir.passes.PassResult(model, bool(nodes))
