"""`llamaforge::LlamaAttention`: one decoder layer's attention as a single custom op.

The op is the seam between the exporter and every backend. It takes the projected Q/K/V of the
new tokens, applies RoPE at each sequence's own positions, writes the rotated K and V into the
KV cache, and attends causally over the cache with grouped-query attention.

Inputs
  0 query         T      [batch, seq, num_heads * head_dim]
  1 key           T      [batch, seq, num_kv_heads * head_dim]
  2 value         T      [batch, seq, num_kv_heads * head_dim]
  3 past_key      T      [batch, num_kv_heads, capacity, head_dim]
  4 past_value    T      [batch, num_kv_heads, capacity, head_dim]
  5 past_lengths  int32  [batch]   tokens already cached for each row = position of its first new token
Outputs
  0 output        T      [batch, seq, num_heads * head_dim]
  1 present_key   T      [batch, num_kv_heads, capacity, head_dim]   past_key with the new keys written
  2 present_value T      [batch, num_kv_heads, capacity, head_dim]

KV layout ("bhcd-slots"): each batch row owns one cache slot of `capacity` positions. Row `b`'s new
token `s` sits at position `past_lengths[b] + s`, so rows at different points of their generation
can share one call; rows shorter than `seq` are right-padded. Padding writes harmless values past
the row's true length (they are overwritten by the next real token and never attended to, since
attention is causal) and writes beyond `capacity` are dropped. In `present_*`, positions below
`past_lengths[b]` are copied from `past_*`, positions `past_lengths[b] .. past_lengths[b] + seq - 1`
hold the new tokens, and later positions are unspecified: backends may zero them (ORT's GQA kernel
does) since nothing reads them.

TensorRT maps the node to its plugin by op type, `plugin_version` and `plugin_namespace`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import onnx
from onnx import defs

DOMAIN = "llamaforge"
OP_TYPE = "LlamaAttention"
OPSET_VERSION = 1
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "llamaforge"
KV_LAYOUT = "bhcd-slots"

INPUTS = ("query", "key", "value", "past_key", "past_value", "past_lengths")
OUTPUTS = ("output", "present_key", "present_value")


@dataclass(frozen=True)
class AttentionAttrs:
    """The op's attributes; everything a backend needs besides the tensors."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float = 0.0  # 0 means 1/sqrt(head_dim)
    rope_theta: float = 10000.0
    rope_interleaved: int = 0  # 0: rotate-half (HF layout); 1: adjacent pairs (Meta layout)
    rope_scaling_type: str = "none"  # "none" | "llama3"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 1.0
    rope_original_max_positions: int = 0

    def __post_init__(self) -> None:
        if self.scale == 0.0:
            object.__setattr__(self, "scale", 1.0 / math.sqrt(self.head_dim))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling_type not in ("none", "llama3"):
            raise ValueError(f"rope_scaling_type={self.rope_scaling_type!r} is not one of 'none', 'llama3'")

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def onnx_attributes(self) -> dict[str, Any]:
        """Attributes as written on the ONNX node, plugin identity included."""
        return {**asdict(self), "plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}

    @classmethod
    def from_onnx_attributes(cls, attrs: dict[str, Any]) -> "AttentionAttrs":
        version = attrs.get("plugin_version", PLUGIN_VERSION)
        if version != PLUGIN_VERSION:
            raise ValueError(f"{OP_TYPE}: plugin_version {version!r} is not supported (this build has {PLUGIN_VERSION!r})")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in attrs.items() if k in names})


_ATTR_TYPES = {
    int: defs.OpSchema.AttrType.INT,
    float: defs.OpSchema.AttrType.FLOAT,
    str: defs.OpSchema.AttrType.STRING,
}


def _infer(ctx: Any) -> None:
    """output has the query's type and shape; presents have the past caches' type and shape."""
    for out_index, in_index in ((0, 0), (1, 3), (2, 4)):
        if ctx.has_output(out_index) and ctx.has_input(in_index):
            ctx.set_output_type(out_index, ctx.get_input_type(in_index))


def _build_schema() -> defs.OpSchema:
    P = defs.OpSchema.FormalParameter
    attributes = []
    for f in fields(AttentionAttrs):
        py_type = {"int": int, "float": float, "str": str}[f.type] if isinstance(f.type, str) else f.type
        required = f.default is f.default_factory  # dataclasses.MISSING for both when no default
        if f.name in ("num_heads", "num_kv_heads", "head_dim"):
            attributes.append(defs.OpSchema.Attribute(f.name, _ATTR_TYPES[py_type], f.name, required=True))
        else:
            attributes.append(defs.OpSchema.Attribute(f.name, _ATTR_TYPES[py_type], f.name, required=False))
    attributes.append(defs.OpSchema.Attribute("plugin_version", defs.OpSchema.AttrType.STRING, "plugin version", required=False))
    attributes.append(defs.OpSchema.Attribute("plugin_namespace", defs.OpSchema.AttrType.STRING, "plugin namespace", required=False))
    del required
    schema = defs.OpSchema(
        OP_TYPE,
        DOMAIN,
        OPSET_VERSION,
        doc=__doc__ or "",
        inputs=[P(n, "T" if n != "past_lengths" else "tensor(int32)", n) for n in INPUTS],
        outputs=[P(n, "T", n) for n in OUTPUTS],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations and KV cache")],
        attributes=attributes,
    )
    schema.set_type_and_shape_inference_function(_infer)
    return schema


def register_schema() -> None:
    """Make onnx (checker, shape inference) and the exporter aware of the op; idempotent."""
    if not defs.has(OP_TYPE, OPSET_VERSION, DOMAIN):
        defs.register_schema(_build_schema())


def opset_import() -> onnx.OperatorSetIdProto:
    return onnx.helper.make_opsetid(DOMAIN, OPSET_VERSION)


def single_op_model(attrs: AttentionAttrs, elem_type: int = onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    """A model holding one op with symbolic batch/seq/capacity: for tests, benchmarks and lowerings."""
    register_schema()
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    vi = onnx.helper.make_tensor_value_info
    cache = ["batch", kvh, "capacity", d]
    inputs = [vi("query", elem_type, ["batch", "seq", h * d]), vi("key", elem_type, ["batch", "seq", kvh * d]),
              vi("value", elem_type, ["batch", "seq", kvh * d]), vi("past_key", elem_type, cache),
              vi("past_value", elem_type, cache), vi("past_lengths", onnx.TensorProto.INT32, ["batch"])]
    outputs = [vi("output", elem_type, ["batch", "seq", h * d]), vi("present_key", elem_type, cache),
               vi("present_value", elem_type, cache)]
    node = onnx.helper.make_node(OP_TYPE, list(INPUTS), list(OUTPUTS), domain=DOMAIN, **attrs.onnx_attributes())
    graph = onnx.helper.make_graph([node], OP_TYPE, inputs, outputs)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23), opset_import()], ir_version=10)
