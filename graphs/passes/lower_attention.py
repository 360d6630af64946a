"""Lower every `llamaforge::LlamaAttention` node for a backend."""

from __future__ import annotations

import onnx_ir as ir

from llamaforge.graphs.passes.plugin_node import drop_opset_if_unused, replace_plugin_node
from llamaforge.plugins.attention import ort_lowering
from llamaforge.plugins.attention.schema import DOMAIN, OP_TYPE, AttentionAttrs


def attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == OP_TYPE and n.domain == DOMAIN]


def node_attrs(node: ir.Node) -> AttentionAttrs:
    return AttentionAttrs.from_onnx_attributes({k: a.value for k, a in node.attributes.items()})


MAX_POSITIONS_KEY = "llamaforge.max_positions"


class LowerAttentionForORT(ir.passes.InPlacePass):
    """Replace the plugin op for ONNX Runtime (see `plugins/attention/ort_lowering.py`): an `If`
    between ORT's GroupQueryAttention kernel and a standard-op decomposition, or the decomposition
    alone where GQA has no kernel (bf16) or `use_gqa=False`."""

    def __init__(self, use_gqa: bool = True) -> None:
        super().__init__()
        self.use_gqa = use_gqa

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = attention_nodes(graph)
        max_positions = int(model.metadata_props.get(MAX_POSITIONS_KEY, "0"))
        # One GqaCall per past_lengths input (one per graph): every layer's If reads the first's.
        calls: dict[int, ort_lowering.GqaCall] = {}
        for node in nodes:
            attrs = node_attrs(node)
            dtype, _ = ort_lowering.activation_and_cache_types(node)
            if self.use_gqa and max_positions and ort_lowering.gqa_supports(attrs, dtype):
                cos = ort_lowering.rope_cache(attrs, max_positions, dtype, "cos")
                sin = ort_lowering.rope_cache(attrs, max_positions, dtype, "sin")
                for table in (cos, sin):
                    if table.name not in graph.initializers:
                        graph.register_initializer(table)
                key = id(node.inputs[5])
                new_nodes, outputs, calls[key] = ort_lowering.lower_with_gqa(
                    node, attrs, graph.initializers[cos.name], graph.initializers[sin.name],  # type: ignore[index]
                    calls.get(key))
            else:
                new_nodes, outputs = ort_lowering.decompose(node, attrs)
            replace_plugin_node(graph, node, new_nodes, outputs, node.name or f"attention_{nodes.index(node)}")
        if nodes:
            drop_opset_if_unused(model, DOMAIN)
        if nodes and self.use_gqa:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, bool(nodes))
