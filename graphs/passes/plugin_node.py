"""What every lowering pass of a plugin op does to the graph: put the op's replacement where the
node was, and drop the plugin opset once no plugin op is left."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from llamaforge.plugins.attention.ort_lowering import name_values

__all__ = ["replace_plugin_node", "drop_opset_if_unused"]


def replace_plugin_node(graph: ir.Graph, node: ir.Node, new_nodes: list[ir.Node], outputs: Sequence[ir.Value],
                        prefix: str) -> None:
    """Insert `new_nodes` (named under `prefix`) before `node`, hand each of its outputs' uses to
    the matching value of `outputs`, and remove it. Graph outputs keep their public names
    (present_key.N, logits ...), which clients and the manifest read."""
    name_values(prefix, new_nodes)
    graph.insert_before(node, new_nodes)
    for old, new in zip(node.outputs, outputs):
        new.shape, new.type = old.shape, old.type
        if old.is_graph_output():
            name, old.name = old.name, f"{old.name}.lowered"
            new.name = name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def drop_opset_if_unused(model: ir.Model, domain: str) -> None:
    """Remove `domain` from the opset imports when no node of the graph uses it any more (other
    plugin ops of the same domain may still be there, lowered by their own pass)."""
    if domain in model.opset_imports and not any(n.domain == domain for n in model.graph):
        del model.opset_imports[domain]
