"""`llamaforge::AllReduce`: the sum of one tensor over the ranks of a tensor-parallel engine.

A tensor-parallel rank graph (docs/tensor_parallel.md) holds one such node after each row-parallel
linear (o_proj, down_proj, a MoE layer's routed experts plus shared expert): each rank computes a
partial sum of the layer's output from its shard of the input channels, and every rank needs the
whole sum before the residual add.

Inputs
  0 x   T  any shape   this rank's partial sum
Outputs
  0 y   T  like x      the elementwise sum of x over all `world_size` ranks, the same on every rank

Attributes
  world_size  int      the number of ranks (the engine's TP size); 1 makes the op the identity
  reduce      string   "sum" (the only reduction tensor parallelism needs)

Lowerings (graphs/passes/lower_all_reduce.py): ONNX Runtime on the CPU runs it as
`ai.onnx.contrib::LlamaforgeAllReduce`, an onnxruntime-extensions Python op whose kernel
(runtime/parallel/collective.py) calls MPI's Allreduce; ONNX Runtime's CUDA build as
`com.microsoft::AllReduce` (NCCL); TensorRT as TensorRT-LLM's NCCL `AllReduce` plugin
(`trt_plugin.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import onnx
from onnx import defs

from llamaforge.plugins.op_schema import attrs_from_node, copy_input_types

DOMAIN = "llamaforge"
OP_TYPE = "AllReduce"
OPSET_VERSION = 1
PLUGIN_VERSION = "1"
REDUCTIONS = ("sum",)


@dataclass(frozen=True)
class AllReduceAttrs:
    world_size: int
    reduce: str = "sum"

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"{OP_TYPE}: world_size={self.world_size} must be >= 1")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"{OP_TYPE}: reduce={self.reduce!r} is not one of {list(REDUCTIONS)}")

    def onnx_attributes(self) -> dict[str, Any]:
        return {**asdict(self), "plugin_version": PLUGIN_VERSION}

    @classmethod
    def from_onnx_attributes(cls, attrs: dict[str, Any]) -> AllReduceAttrs:
        return attrs_from_node(cls, attrs, OP_TYPE, PLUGIN_VERSION)


def _infer(ctx: Any) -> None:
    copy_input_types(ctx, ((0, 0),))


def _tensorrt_fields() -> list[defs.OpSchema.Attribute]:
    """The TensorRT form's attributes (trt_plugin.py): TensorRT-LLM's plugin fields, optional here."""
    A, T = defs.OpSchema.Attribute, defs.OpSchema.AttrType
    ints = ("type_id", "strategy", "config", "fusion_op", "counter", "affine", "bias", "scale")
    return [A("plugin_namespace", T.STRING, "TensorRT plugin namespace", required=False),
            A("group", T.INTS, "TensorRT-LLM: the ranks", required=False),
            A("eps", T.FLOAT, "TensorRT-LLM: unused without fusion", required=False),
            *(A(name, T.INT, f"TensorRT-LLM plugin field {name}", required=False) for name in ints)]


def _build_schema() -> defs.OpSchema:
    P = defs.OpSchema.FormalParameter
    A = defs.OpSchema.Attribute
    schema = defs.OpSchema(
        OP_TYPE, DOMAIN, OPSET_VERSION, doc=__doc__ or "",
        inputs=[P("x", "T", "this rank's partial sum")],
        outputs=[P("y", "T", "the sum over the ranks")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations")],
        attributes=[A("world_size", defs.OpSchema.AttrType.INT, "ranks", required=True),
                    A("reduce", defs.OpSchema.AttrType.STRING, "reduction (sum)", required=False),
                    A("plugin_version", defs.OpSchema.AttrType.STRING, "plugin version", required=False),
                    *_tensorrt_fields()],
    )
    schema.set_type_and_shape_inference_function(_infer)
    return schema


def register_schema() -> None:
    """Make onnx (checker, shape inference) and the exporter aware of the op; idempotent."""
    if not defs.has(OP_TYPE, OPSET_VERSION, DOMAIN):
        defs.register_schema(_build_schema())


def single_op_model(attrs: AllReduceAttrs, elem_type: int = onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    """One op on x [batch, seq, 8]: for tests."""
    register_schema()
    vi = onnx.helper.make_tensor_value_info
    node = onnx.helper.make_node(OP_TYPE, ["x"], ["y"], domain=DOMAIN, name="all_reduce", **attrs.onnx_attributes())
    graph = onnx.helper.make_graph([node], OP_TYPE, [vi("x", elem_type, ["batch", "seq", 8])],
                                   [vi("y", elem_type, ["batch", "seq", 8])])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23),
                                                        onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION)], ir_version=10)
