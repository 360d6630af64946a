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

Llama 4 attributes (all optional; their defaults reproduce the dense op exactly). In order:
  use_rope=0           NoPE layer: q and k are not rotated.
  qk_norm=1            q and k (after RoPE) are scaled by rsqrt(mean(x^2) + qk_norm_eps) per head;
                       no weight. The cache holds the normalised keys.
  temperature_tuning=1 q (after the above) is multiplied by
                       1 + temperature_scale * log1p(floor((position + 1) / temperature_floor)),
                       position being the token's own (HF's attn_temperature_tuning / attn_scale /
                       floor_scale, applied on NoPE layers).
  attn_chunk_size=N    chunked attention: the token at position p attends to cache position c only
                       if c <= p and c // N == p // N (not a sliding window: the first token of a
                       chunk sees only itself).

FP8 KV cache attributes (optional; the defaults leave the cache untouched):
  kv_cache_quant="fp8", k_scale, v_scale   the new K (after RoPE and everything else applied to
                       it) and V are quantized to float8 e4m3fn with their per-layer scale
                       (x -> saturate(x / scale) -> e4m3fn -> * scale) before they are written to
                       the cache, so attention reads exactly what an fp8 cache holds.

TensorRT maps the node to its plugin by op type, `plugin_version` and `plugin_namespace`.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, TypeVar

import onnx
from onnx import defs

from llamaforge.plugins.op_schema import attrs_from_node, copy_input_types

DOMAIN = "llamaforge"
OP_TYPE = "LlamaAttention"
OPSET_VERSION = 1
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "llamaforge"
KV_LAYOUT = "bhcd-slots"

INPUTS = ("query", "key", "value", "past_key", "past_value", "past_lengths")
OUTPUTS = ("output", "present_key", "present_value")
LLAMA4_FLAGS = ("use_rope", "qk_norm", "attn_chunk_size", "temperature_tuning")


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
    # Llama 4 (iRoPE). The defaults are the dense LLaMA behaviour; see the module docstring.
    use_rope: int = 1  # 0: a NoPE layer (no rotation at all)
    qk_norm: int = 0  # 1: weightless RMS ("L2") norm of q and k after RoPE
    qk_norm_eps: float = 1e-6
    attn_chunk_size: int = 0  # > 0: a token sees only earlier tokens of its own chunk
    temperature_tuning: int = 0  # 1: q *= 1 + temperature_scale * log1p(floor((pos + 1) / temperature_floor))
    temperature_floor: float = 8192.0
    temperature_scale: float = 0.1
    # FP8 KV cache (set by graphs/passes/quantize.py after calibration; defaults: cache as is).
    kv_cache_quant: str = "none"  # "fp8": K (after RoPE) and V rounded to float8 e4m3fn before caching
    k_scale: float = 1.0  # cached K = fp8(K / k_scale) * k_scale
    v_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.scale == 0.0:
            object.__setattr__(self, "scale", 1.0 / math.sqrt(self.head_dim))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling_type not in ("none", "llama3"):
            raise ValueError(f"rope_scaling_type={self.rope_scaling_type!r} is not one of 'none', 'llama3'")
        if self.attn_chunk_size < 0:
            raise ValueError(f"attn_chunk_size={self.attn_chunk_size} must be >= 0 (0: no chunking)")
        if self.temperature_tuning and self.temperature_floor <= 0:
            raise ValueError(f"temperature_floor={self.temperature_floor} must be > 0")
        if self.kv_cache_quant not in ("none", "fp8"):
            raise ValueError(f"kv_cache_quant={self.kv_cache_quant!r} is not one of 'none', 'fp8'")
        if not (self.k_scale > 0 and self.v_scale > 0 and math.isfinite(self.k_scale) and math.isfinite(self.v_scale)):
            raise ValueError(f"k_scale={self.k_scale}, v_scale={self.v_scale} must be finite and > 0")

    def non_default_llama4_flags(self) -> list[str]:
        """The Llama 4 attributes set away from their dense-LLaMA defaults (what a backend without
        them must refuse)."""
        defaults = {f.name: f.default for f in fields(self) if f.name in LLAMA4_FLAGS}
        return [f"{k}={getattr(self, k)}" for k, v in defaults.items() if getattr(self, k) != v]

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def onnx_attributes(self) -> dict[str, Any]:
        """Attributes as written on the ONNX node, plugin identity included."""
        return {**asdict(self), "plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}

    @classmethod
    def from_onnx_attributes(cls, attrs: dict[str, Any]) -> AttentionAttrs:
        return attrs_from_node(cls, attrs, OP_TYPE, PLUGIN_VERSION)

    @classmethod
    def from_flat_values(cls, values: Mapping[str, Any]) -> AttentionAttrs:
        """The attributes from a flat signature's arguments (see `flat_signature`), each converted to
        its field's type: a framework may hand scalars over as its own types (numpy, C++ bindings)."""
        return cls(**{name: kind(values[name]) for name, kind in attribute_types().items()})


def attribute_types() -> dict[str, type]:
    """Every attribute's name and Python type (int, float or str), in field order."""
    hints = typing.get_type_hints(AttentionAttrs)
    return {f.name: hints[f.name] for f in fields(AttentionAttrs)}


def attribute_parameters() -> list[inspect.Parameter]:
    """The attributes as typed positional-or-keyword parameters, in field order; those with a
    default in `AttentionAttrs` have no default here: a flat call passes every attribute."""
    return [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind)
            for name, kind in attribute_types().items()]


R = TypeVar("R")


def flat_signature(name: str, leading: Sequence[inspect.Parameter], trailing: Sequence[inspect.Parameter],
                   returns: Any, body: Callable[[dict[str, Any], AttentionAttrs], R]) -> Callable[..., R]:
    """A function whose signature is `leading`, then one typed parameter per attribute, then `trailing`.

    For the boundaries that read an op's attributes from a Python signature (onnxscript's
    translation functions, `tensorrt.plugin`): the signature is generated from `AttentionAttrs`, so it
    never lists the attributes by hand. A call binds its arguments to that signature and runs
    `body(other arguments by name, the attributes)`.
    """
    parameters = [*leading, *attribute_parameters(), *trailing]
    signature = inspect.Signature(parameters, return_annotation=returns)
    attribute_names = set(attribute_types())

    def flat(*args: Any, **kwargs: Any) -> R:
        arguments = signature.bind(*args, **kwargs).arguments
        attrs = AttentionAttrs.from_flat_values(arguments)
        return body({k: v for k, v in arguments.items() if k not in attribute_names}, attrs)

    flat.__name__ = flat.__qualname__ = name
    flat.__signature__ = signature  # type: ignore[attr-defined]  # read by inspect.signature
    # Read by typing.get_type_hints (onnxscript tells attributes from inputs by annotation).
    flat.__annotations__ = {p.name: p.annotation for p in parameters if p.annotation is not inspect.Parameter.empty}
    flat.__annotations__["return"] = returns
    return flat


_ATTR_TYPES = {
    int: defs.OpSchema.AttrType.INT,
    float: defs.OpSchema.AttrType.FLOAT,
    str: defs.OpSchema.AttrType.STRING,
}


def _infer(ctx: Any) -> None:
    """output has the query's type and shape; presents have the past caches' type and shape."""
    copy_input_types(ctx, ((0, 0), (1, 3), (2, 4)))


def _build_schema() -> defs.OpSchema:
    P = defs.OpSchema.FormalParameter
    types = attribute_types()
    attributes = [defs.OpSchema.Attribute(f.name, _ATTR_TYPES[types[f.name]], f.name, required=f.default is MISSING)
                  for f in fields(AttentionAttrs)]
    attributes.append(defs.OpSchema.Attribute("plugin_version", defs.OpSchema.AttrType.STRING, "plugin version", required=False))
    attributes.append(defs.OpSchema.Attribute("plugin_namespace", defs.OpSchema.AttrType.STRING, "plugin namespace", required=False))
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
    cache: list[str | int] = ["batch", kvh, "capacity", d]
    inputs = [vi("query", elem_type, ["batch", "seq", h * d]), vi("key", elem_type, ["batch", "seq", kvh * d]),
              vi("value", elem_type, ["batch", "seq", kvh * d]), vi("past_key", elem_type, cache),
              vi("past_value", elem_type, cache), vi("past_lengths", onnx.TensorProto.INT32, ["batch"])]
    outputs = [vi("output", elem_type, ["batch", "seq", h * d]), vi("present_key", elem_type, cache),
               vi("present_value", elem_type, cache)]
    node = onnx.helper.make_node(OP_TYPE, list(INPUTS), list(OUTPUTS), domain=DOMAIN, **attrs.onnx_attributes())
    graph = onnx.helper.make_graph([node], OP_TYPE, inputs, outputs)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23), opset_import()], ir_version=10)
