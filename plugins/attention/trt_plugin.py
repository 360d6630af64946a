"""`llamaforge::LlamaAttention` as a TensorRT plugin: TensorRT's Python plugin API
(`tensorrt.plugin`, "quickly deployable plugins") with an ahead-of-time implementation.

* `@trtp.register` describes the op: the six inputs and the op's attributes (the fields of
  `AttentionAttrs`) in, three outputs out, `output` shaped like `query` and `present_*` like
  `past_*`.
* `@trtp.autotune` offers the supported type combinations (fp32 / fp16 / bf16 activations and
  cache, int32 `past_lengths`, linear layouts) and, as tactics, the tile configurations of
  `triton_kernels.OP_CONFIGS`; TensorRT times them while building and keeps the fastest.
* `@trtp.aot_impl` compiles the single-launch Triton kernel (`triton_kernels._attention_kernel`,
  FUSED) for the build GPU and returns its PTX with symbolic launch parameters. The engine embeds
  the PTX, so running it needs neither Python nor Triton.

The ONNX parser finds the plugin from the node's op type (`LlamaAttention` = the plugin name),
its `plugin_namespace` and `plugin_version` attributes (see `schema.py`), and reads the plugin's
fields from the node's attributes by name. For the parser to pick the AOT implementation the node
may also carry `aot=1` (`AOT_ATTRIBUTE`); this module registers no other implementation.

The registration, the type combinations, the PTX and the launch parameters are shared with the
cross-attention plugin (`plugins/trt_aot.py`).

Importing this module needs neither TensorRT nor Triton; `register()` needs both and says so.
"""

import inspect
from typing import Any

from llamaforge.plugins.attention.schema import (
    INPUTS,
    OP_TYPE,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    AttentionAttrs,
    attribute_types,
    flat_signature,
)
from llamaforge.plugins.trt_aot import (
    QDP_PLUGIN_VERSION,
    PluginRegistration,
    TensorRTUnavailable,
    aot_binary,
    float_type_combinations,
    launch_params,
)

# NB: no `from __future__ import annotations` here: tensorrt.plugin checks the decorated
# functions' annotations against its own classes, so they must be real objects, not strings.

PLUGIN_NAME = OP_TYPE
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
AOT_ATTRIBUTE = "aot"
# The plugin's fields are the op's attributes, in `AttentionAttrs` field order (the parser reads them
# from the node's attributes by name).
ATTRIBUTE_NAMES = tuple(attribute_types())
__all__ = ["AOT_ATTRIBUTE", "ATTRIBUTE_NAMES", "PLUGIN_ID", "PLUGIN_NAME", "QDP_PLUGIN_VERSION", "TensorRTUnavailable",
           "is_registered", "op_scalar_args", "register"]


def op_scalar_args(seq: Any, capacity: Any, attrs: AttentionAttrs) -> list[Any]:
    """The int32 scalars of `_attention_kernel` (in `OP_SCALAR_ARGS` order) for contiguous tensors,
    from the dynamic dims: `seq` and `capacity` are ints or TensorRT shape expressions."""
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    return [
        seq, capacity,
        seq * (h * d), h * d,  # query [B, S, H*D]
        seq * (kvh * d), kvh * d,  # key
        seq * (kvh * d), kvh * d,  # value
        capacity * (kvh * d), capacity * d, d,  # past_* / present_* [B, KVH, C, D]
        seq * (h * d), h * d,  # output
    ]


def _define(trt: Any, trtp: Any, tk: Any) -> None:
    # Not at the top: the CLI imports this module (through the TensorRT build options), and
    # `llamaforge serve` must not import torch.
    import torch

    torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
    num_args = len(tk.OP_INPUT_ARGS) + len(tk.OP_SCALAR_ARGS) + len(tk.OP_OUTPUT_ARGS)

    # tensorrt.plugin reads the plugin's inputs and fields from the decorated functions' signatures,
    # which `flat_signature` generates: the six tensor descriptors, then one typed parameter per
    # attribute (`AttentionAttrs` field order), then the implementation's own trailing parameters.
    P = inspect.Parameter
    tensor_descs = [P(name, P.POSITIONAL_OR_KEYWORD, annotation=trtp.TensorDesc) for name in INPUTS]

    def describe(tensors: dict[str, Any], attrs: AttentionAttrs) -> tuple[Any, Any, Any]:
        return tensors["query"].like(), tensors["past_key"].like(), tensors["past_value"].like()

    trtp.register(PLUGIN_ID)(flat_signature(
        "llama_attention_desc", tensor_descs, [], tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc], describe))

    @trtp.autotune(PLUGIN_ID)
    def llama_attention_autotune(
        query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
        past_key: trtp.TensorDesc, past_value: trtp.TensorDesc, past_lengths: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc],
    ) -> list[trtp.AutoTuneCombination]:
        return float_type_combinations(trtp, tk, "INT32")  # past_lengths

    def aot_impl(arguments: dict[str, Any], attrs: AttentionAttrs) -> tuple[bytes, bytes, Any, Any]:
        query, past_key, tactic = arguments["query"], arguments["past_key"], arguments["tactic"]
        config = tk.OP_CONFIGS[int(tactic)]  # compile_op_kernel refuses the Llama 4 flags by name
        compiled = tk.compile_op_kernel(attrs, torch_dtype[query.dtype], config)
        name, ptx = aot_binary(compiled, num_args)

        batch, seq = query.shape_expr[0], query.shape_expr[1]
        capacity = past_key.shape_expr[2]
        launch = launch_params(trtp, compiled, trtp.cdiv(seq * attrs.group_size, config.block_m), batch * attrs.num_kv_heads)
        extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in op_scalar_args(seq, capacity, attrs)])
        return name.encode(), ptx.encode(), launch, extra_args

    trtp.aot_impl(PLUGIN_ID)(flat_signature(
        "llama_attention_aot_impl", tensor_descs,
        [P("outputs", P.POSITIONAL_OR_KEYWORD, annotation=tuple[trtp.TensorDesc]),
         P("tactic", P.POSITIONAL_OR_KEYWORD, annotation=int)],
        tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs], aot_impl))


# register(): idempotent; raises TensorRTUnavailable when TensorRT (the real library) or Triton is missing.
_registration = PluginRegistration(PLUGIN_ID, PLUGIN_VERSION, "llamaforge.plugins.attention.triton_kernels", _define)
register = _registration.register
is_registered = _registration.is_registered
