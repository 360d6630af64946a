"""`llamaforge::MoE`: the routed experts of one Llama 4 MoE layer as a single custom op.

The op routes each token to its top-k experts and returns the sum of their outputs. The shared
expert is not part of it: it is a plain SwiGLU MLP in the graph, added to this op's output.

Inputs
  0 hidden        T  [..., hidden]                 the post-attention-norm activations
  1 router_weight T  [num_experts, hidden]         `feed_forward.router.weight` (nn.Linear layout)
  2 gate_up_proj  T  [num_experts, hidden, 2 * I]  `feed_forward.experts.gate_up_proj`: gate | up
  3 down_proj     T  [num_experts, I, hidden]      `feed_forward.experts.down_proj`
Outputs
  0 output        T  [..., hidden]                 like `hidden`

Semantics (transformers' Llama4TextMoe, for every token x):
  logits = x @ router_weight^T; (v, e) = top_k(logits)         (k = top_k, distinct experts)
  output = sum_j  down(e_j) ( silu(g) * u ),  [g | u] = (sigmoid(v_j) * x) @ gate_up(e_j)
The routing score multiplies the expert's *input*; scores are not renormalised, and experts outside
the top k contribute exactly nothing (transformers computes them with a zero score).

Lowerings keep the expert weights as [E, ...] initializers and read one expert's slice per
active expert (see `ort_lowering.py`); the router becomes an ordinary linear named after its
checkpoint module (`...feed_forward.router`), which quantization passes leave in full precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import onnx
from onnx import defs

from llamaforge.plugins.op_schema import attrs_from_node, copy_input_types

DOMAIN = "llamaforge"
OP_TYPE = "MoE"
OPSET_VERSION = 1
PLUGIN_VERSION = "1"

INPUTS = ("hidden", "router_weight", "gate_up_proj", "down_proj")
OUTPUTS = ("output",)


@dataclass(frozen=True)
class MoEAttrs:
    num_experts: int
    top_k: int

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"{OP_TYPE}: top_k={self.top_k} must be in 1..num_experts={self.num_experts}")

    def onnx_attributes(self) -> dict[str, Any]:
        return {**asdict(self), "plugin_version": PLUGIN_VERSION}

    @classmethod
    def from_onnx_attributes(cls, attrs: dict[str, Any]) -> MoEAttrs:
        return attrs_from_node(cls, attrs, OP_TYPE, PLUGIN_VERSION)


def _infer(ctx: Any) -> None:
    copy_input_types(ctx, ((0, 0),))


def _build_schema() -> defs.OpSchema:
    P = defs.OpSchema.FormalParameter
    A = defs.OpSchema.Attribute
    schema = defs.OpSchema(
        OP_TYPE, DOMAIN, OPSET_VERSION, doc=__doc__ or "",
        inputs=[P(n, "T", n) for n in INPUTS],
        outputs=[P(n, "T", n) for n in OUTPUTS],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations and weights")],
        attributes=[A("num_experts", defs.OpSchema.AttrType.INT, "experts", required=True),
                    A("top_k", defs.OpSchema.AttrType.INT, "experts per token", required=True),
                    A("plugin_version", defs.OpSchema.AttrType.STRING, "plugin version", required=False)],
    )
    schema.set_type_and_shape_inference_function(_infer)
    return schema


def register_schema() -> None:
    """Make onnx (checker, shape inference) and the exporter aware of the op; idempotent."""
    if not defs.has(OP_TYPE, OPSET_VERSION, DOMAIN):
        defs.register_schema(_build_schema())


def single_op_model(attrs: MoEAttrs, hidden: int, intermediate: int,
                    elem_type: int = onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    """One op with symbolic batch/seq and the weights as graph inputs: for tests and benchmarks."""
    register_schema()
    vi = onnx.helper.make_tensor_value_info
    e = attrs.num_experts
    inputs = [vi("hidden", elem_type, ["batch", "seq", hidden]), vi("router_weight", elem_type, [e, hidden]),
              vi("gate_up_proj", elem_type, [e, hidden, 2 * intermediate]), vi("down_proj", elem_type, [e, intermediate, hidden])]
    outputs = [vi("output", elem_type, ["batch", "seq", hidden])]
    node = onnx.helper.make_node(OP_TYPE, list(INPUTS), list(OUTPUTS), domain=DOMAIN, name="moe", **attrs.onnx_attributes())
    graph = onnx.helper.make_graph([node], OP_TYPE, inputs, outputs)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23),
                                                        onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION)], ir_version=10)
