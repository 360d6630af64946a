"""`llamaforge::CrossAttention`: one Llama 3.2 Vision cross-attention layer's attention as a single op.

Text queries attend to keys and values computed from the image states. The op is a sibling of
`llamaforge::LlamaAttention`, not a mode of it: it has no positions (no RoPE, no causal order, no
per-row write offset), its cache is written once per sequence instead of appended to, and it takes
a mask input that `LlamaAttention` has no slot for. Adding these to `LlamaAttention` would change
the input list every backend of that op (the GQA lowering, the Triton kernels, the TensorRT
plugin) is written against; a sibling leaves them untouched.

Inputs
  0 query                T      [batch, seq, num_heads * head_dim]       after q_proj and the q RMSNorm
  1 key                  T      [batch, new, num_kv_heads * head_dim]    after k_proj and the k RMSNorm
  2 value                T      [batch, new, num_kv_heads * head_dim]
  3 past_key             T      [batch, num_kv_heads, capacity, head_dim]  the cross KV cache
  4 past_value           T      [batch, num_kv_heads, capacity, head_dim]
  5 cross_attention_mask int64  [batch, seq, capacity / tokens_per_tile]  1: the token may see that tile
Outputs
  0 output               T      [batch, seq, num_heads * head_dim]
  1 present_key          T      [batch, num_kv_heads, capacity, head_dim]
  2 present_value        T      [batch, num_kv_heads, capacity, head_dim]

The cache: `present[:, :, :new]` holds the new keys/values, `present[:, :, new:]` is copied from
`past`. The prefill of a prompt with images passes the image states' keys and values (new =
capacity, every image token); later calls pass none (new = 0) and attend to the cache. The op is
defined for an empty cache too (capacity 0: the output is 0, an empty weighted sum), but the
runtime gives a text-only sequence one tile of zero keys and values that no token sees instead
(export/mllama_text.py says why): the output is 0 all the same.

The mask (transformers' `_prepare_cross_attention_mask`): cache position c belongs to tile
c // tokens_per_tile; the token at row s may attend to c where `cross_attention_mask[b, s, tile] == 1`.
A row that may attend to no tile at all attends to *every* cache position unmasked (transformers
multiplies its additive mask by the "full text row" mask; the decoder layer then zeroes that row's
MLP output, outside this op).

Attributes: num_heads, num_kv_heads, head_dim, tokens_per_tile, scale, and the plugin's identity
(plugin_version, plugin_namespace: how TensorRT's ONNX parser finds `trt_plugin.py`'s plugin).

Grouped-query: query head j reads KV head j // (num_heads / num_kv_heads). Scores are scaled by
`scale` (0: 1/sqrt(head_dim)). Arithmetic is float32 whatever T.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import onnx
from onnx import defs

from llamaforge.plugins.op_schema import attrs_from_node, copy_input_types

DOMAIN = "llamaforge"
OP_TYPE = "CrossAttention"
OPSET_VERSION = 1
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "llamaforge"  # TensorRT's ONNX parser finds the plugin by op type, namespace and version

INPUTS = ("query", "key", "value", "past_key", "past_value", "cross_attention_mask")
OUTPUTS = ("output", "present_key", "present_value")


@dataclass(frozen=True)
class CrossAttentionAttrs:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tokens_per_tile: int  # image tokens per tile: (image_size / patch_size)^2 + 1
    scale: float = 0.0  # 0 means 1/sqrt(head_dim)

    def __post_init__(self) -> None:
        if self.scale == 0.0:
            object.__setattr__(self, "scale", 1.0 / math.sqrt(self.head_dim))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{OP_TYPE}: num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.tokens_per_tile < 1:
            raise ValueError(f"{OP_TYPE}: tokens_per_tile={self.tokens_per_tile} must be >= 1")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def onnx_attributes(self) -> dict[str, Any]:
        return {**asdict(self), "plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}

    @classmethod
    def from_onnx_attributes(cls, attrs: dict[str, Any]) -> CrossAttentionAttrs:
        return attrs_from_node(cls, attrs, OP_TYPE, PLUGIN_VERSION)


def _infer(ctx: Any) -> None:
    """output has the query's type and shape; presents have the past cross caches' type and shape."""
    copy_input_types(ctx, ((0, 0), (1, 3), (2, 4)))


def _build_schema() -> defs.OpSchema:
    P = defs.OpSchema.FormalParameter
    A = defs.OpSchema.Attribute
    INT, FLOAT, STRING = defs.OpSchema.AttrType.INT, defs.OpSchema.AttrType.FLOAT, defs.OpSchema.AttrType.STRING
    schema = defs.OpSchema(
        OP_TYPE, DOMAIN, OPSET_VERSION, doc=__doc__ or "",
        inputs=[P(n, "tensor(int64)" if n == "cross_attention_mask" else "T", n) for n in INPUTS],
        outputs=[P(n, "T", n) for n in OUTPUTS],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations and KV cache")],
        attributes=[A("num_heads", INT, "query heads", required=True),
                    A("num_kv_heads", INT, "key/value heads", required=True),
                    A("head_dim", INT, "head size", required=True),
                    A("tokens_per_tile", INT, "image tokens per tile", required=True),
                    A("scale", FLOAT, "score scale", required=False),
                    A("plugin_version", STRING, "plugin version", required=False),
                    A("plugin_namespace", STRING, "TensorRT plugin namespace", required=False)],
    )
    schema.set_type_and_shape_inference_function(_infer)
    return schema


def register_schema() -> None:
    """Make onnx (checker, shape inference) and the exporter aware of the op; idempotent."""
    if not defs.has(OP_TYPE, OPSET_VERSION, DOMAIN):
        defs.register_schema(_build_schema())


def single_op_model(attrs: CrossAttentionAttrs, elem_type: int = onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    """One op with symbolic batch/seq/new/capacity/tiles: for tests."""
    register_schema()
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    vi = onnx.helper.make_tensor_value_info
    cache: list[str | int] = ["batch", kvh, "capacity", d]
    inputs = [vi("query", elem_type, ["batch", "seq", h * d]), vi("key", elem_type, ["batch", "new", kvh * d]),
              vi("value", elem_type, ["batch", "new", kvh * d]), vi("past_key", elem_type, cache),
              vi("past_value", elem_type, cache),
              vi("cross_attention_mask", onnx.TensorProto.INT64, ["batch", "seq", "tiles"])]
    outputs = [vi("output", elem_type, ["batch", "seq", h * d]), vi("present_key", elem_type, cache),
               vi("present_value", elem_type, cache)]
    node = onnx.helper.make_node(OP_TYPE, list(INPUTS), list(OUTPUTS), domain=DOMAIN, name="cross_attention",
                                 **attrs.onnx_attributes())
    graph = onnx.helper.make_graph([node], OP_TYPE, inputs, outputs)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23),
                                                        onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION)], ir_version=10)
