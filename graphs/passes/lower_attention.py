"""Lower every `llamaforge::LlamaAttention` node for a backend."""

from __future__ import annotations

import onnx_ir as ir

from llamaforge.graphs.passes.plugin_node import drop_opset_if_unused, replace_plugin_node
from llamaforge.plugins.attention import ort_lowering
from llamaforge.plugins.attention.schema import DOMAIN, OP_TYPE, AttentionAttrs
from llamaforge.plugins.cross_attention.schema import OP_TYPE as CROSS_OP_TYPE


def attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == OP_TYPE and n.domain == DOMAIN]


def node_attrs(node: ir.Node) -> AttentionAttrs:
    return AttentionAttrs.from_onnx_attributes({k: a.value for k, a in node.attributes.items()})


MAX_POSITIONS_KEY = "llamaforge.max_positions"


class LowerAttentionForORT(ir.passes.InPlacePass):
    """Replace the plugin op for ONNX Runtime (see `plugins/attention/ort_lowering.py`): ORT's
    GroupQueryAttention kernel, or the decomposition alone where GQA has no kernel (bf16) or
    `use_gqa=False`. GQA refuses a batch of rows that continue after a past; the runtime runs such a
    call one row at a time (the manifest's `kv_cache.batched_continuation`). With `fallback`, and in a
    Llama 3.2 Vision graph (whose calls carry per-row image inputs), each layer is instead an `If`
    between GQA and the decomposition, which computes every call in one graph."""

    def __init__(self, use_gqa: bool = True, fallback: bool = False) -> None:
        super().__init__()
        self.use_gqa = use_gqa
        self.fallback = fallback

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = attention_nodes(graph)
        max_positions = int(model.metadata_props.get(MAX_POSITIONS_KEY, "0"))
        # One GqaCall per past_lengths input (one per graph): every layer reads the first's.
        calls: dict[int, ort_lowering.GqaCall] = {}
        fallback = self.fallback or any(n.op_type == CROSS_OP_TYPE and n.domain == DOMAIN for n in graph)
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
                    calls.get(key), fallback)
            else:
                new_nodes, outputs = ort_lowering.decompose(node, attrs)
            replace_plugin_node(graph, node, new_nodes, outputs, node.name or f"attention_{nodes.index(node)}")
        if nodes:
            drop_opset_if_unused(model, DOMAIN)
        if nodes and self.use_gqa:
            model.opset_imports.setdefault("com.microsoft", 1)
        return ir.passes.PassResult(model, bool(nodes))
