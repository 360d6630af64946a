"""Lower every `llamaforge::AllReduce` node (tensor-parallel rank graphs) for a backend.

`lower-all-reduce-ort` (ONNX Runtime on the CPU, the build's): `ai.onnx.contrib::LlamaforgeAllReduce`,
run by MPI through runtime/parallel/collective.py. `LowerAllReduceForORT(cuda=True)` gives ONNX
Runtime's CUDA form instead, `com.microsoft::AllReduce` (NCCL). `lower-all-reduce-trt` keeps the
node and writes TensorRT-LLM's NCCL plugin fields onto it (plugins/all_reduce/trt_plugin.py).
All three change nothing in a graph without the op (TP=1).
"""

from __future__ import annotations

import onnx_ir as ir

from llamaforge.graphs.passes.plugin_node import drop_opset_if_unused, replace_plugin_node
from llamaforge.plugins.all_reduce import ort_lowering, trt_plugin
from llamaforge.plugins.all_reduce.schema import DOMAIN, OP_TYPE, AllReduceAttrs
from llamaforge.runtime.parallel.collective import ALL_REDUCE_DOMAIN


def all_reduce_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == OP_TYPE and n.domain == DOMAIN]


def node_attrs(node: ir.Node) -> AllReduceAttrs:
    return AllReduceAttrs.from_onnx_attributes({k: a.value for k, a in node.attributes.items()})


class LowerAllReduceForORT(ir.passes.InPlacePass):
    def __init__(self, cuda: bool = False) -> None:
        super().__init__()
        self.cuda = cuda

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = all_reduce_nodes(graph)
        lower = ort_lowering.lower_for_cuda if self.cuda else ort_lowering.lower_for_cpu
        for index, node in enumerate(nodes):
            node_attrs(node)  # a node of another plugin version is refused here, named
            new_nodes, outputs = lower(node)
            replace_plugin_node(graph, node, new_nodes, outputs, node.name or f"all_reduce_{index}")
        if nodes:
            drop_opset_if_unused(model, DOMAIN)
            domain = ort_lowering.CUDA_DOMAIN if self.cuda else ALL_REDUCE_DOMAIN
            model.opset_imports.setdefault(domain, 1)
        return ir.passes.PassResult(model, bool(nodes))


class LowerAllReduceForTensorRT(ir.passes.InPlacePass):
    """Each node becomes TensorRT-LLM's `tensorrt_llm::AllReduce` plugin node (same op type), its
    fields written as attributes for the ONNX parser's plugin importer (which ignores the op's own
    `world_size` and `reduce`, kept so the node still reads as the op)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = all_reduce_nodes(model.graph)
        for node in nodes:
            attrs = node_attrs(node)
            x = node.inputs[0]
            if x is None or x.dtype is None:
                raise ValueError(f"{node.name}: AllReduce input must declare its element type")
            fields = trt_plugin.plugin_fields(attrs.world_size, x.dtype.name)
            node.attributes["plugin_namespace"] = ir.AttrString("plugin_namespace", trt_plugin.PLUGIN_NAMESPACE)
            node.attributes["plugin_version"] = ir.AttrString("plugin_version", trt_plugin.PLUGIN_VERSION)
            for name, value in fields.items():
                node.attributes[name] = (ir.AttrInt64s(name, value) if isinstance(value, list) else
                                         ir.AttrFloat32(name, value) if isinstance(value, float) else ir.AttrInt64(name, value))
        return ir.passes.PassResult(model, bool(nodes))
