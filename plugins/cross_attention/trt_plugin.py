"""`llamaforge::CrossAttention` as a TensorRT plugin: TensorRT's Python plugin API (`tensorrt.plugin`)
with an ahead-of-time implementation, as `plugins/attention/trt_plugin.py` does for the attention op.

* `@trtp.register` describes the op: the six inputs (`cross_attention_mask` INT64) and the op's
  attributes (the fields of `CrossAttentionAttrs`) in, three outputs out, `output` shaped like
  `query` and `present_*` like `past_*`.
* `@trtp.autotune` offers the supported type combinations (one float type of fp32 / fp16 / bf16
  for activations and caches, an INT64 mask, linear layouts) and, as tactics, the tile
  configurations of `triton_kernels.CROSS_CONFIGS`.
* `@trtp.aot_impl` compiles `triton_kernels._cross_attention_kernel` for the build GPU and returns
  its PTX (Triton's hidden scratch parameters removed by `plugins/trt_aot.py`'s `aot_binary`) with
  symbolic launch parameters; the engine embeds it, so running it needs neither Python nor Triton.

The ONNX parser finds the plugin from the node's op type (`CrossAttention`), its `plugin_namespace`
and `plugin_version` attributes (`schema.CrossAttentionAttrs.onnx_attributes`), and reads the
plugin's fields from the node's attributes by name.

Importing this module needs neither TensorRT nor Triton; `register()` needs both and says so.
"""

from typing import Any

from llamaforge.plugins.cross_attention.schema import OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION, CrossAttentionAttrs
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
__all__ = ["PLUGIN_ID", "PLUGIN_NAME", "QDP_PLUGIN_VERSION", "TensorRTUnavailable", "is_registered", "register",
           "scalar_args"]


def scalar_args(seq: Any, new: Any, capacity: Any, tiles: Any, attrs: CrossAttentionAttrs) -> list[Any]:
    """The int32 scalars of `_cross_attention_kernel` (in `CROSS_SCALAR_ARGS` order) for contiguous
    tensors, from the dynamic dims: ints or TensorRT shape expressions."""
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    return [
        seq, new, capacity, tiles,
        seq * (h * d), h * d,  # query [B, S, H*D]
        new * (kvh * d), kvh * d,  # key [B, N, KVH*D]
        new * (kvh * d), kvh * d,  # value
        capacity * (kvh * d), capacity * d, d,  # past_* / present_* [B, KVH, C, D]
        seq * tiles, tiles,  # cross_attention_mask [B, S, T]
        seq * (h * d), h * d,  # output
    ]


def _define(trt: Any, trtp: Any, tk: Any) -> None:
    import torch  # not at the top: `llamaforge serve` imports the build options, and must not import torch

    torch_dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16}
    num_args = len(tk.CROSS_INPUT_ARGS) + len(tk.CROSS_SCALAR_ARGS) + len(tk.CROSS_OUTPUT_ARGS)

    @trtp.register(PLUGIN_ID)
    def cross_attention_desc(
        query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, past_key: trtp.TensorDesc,
        past_value: trtp.TensorDesc, cross_attention_mask: trtp.TensorDesc,
        num_heads: int, num_kv_heads: int, head_dim: int, tokens_per_tile: int, scale: float,
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        return query.like(), past_key.like(), past_value.like()

    @trtp.autotune(PLUGIN_ID)
    def cross_attention_autotune(
        query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, past_key: trtp.TensorDesc,
        past_value: trtp.TensorDesc, cross_attention_mask: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc],
    ) -> list[trtp.AutoTuneCombination]:
        return float_type_combinations(trtp, tk, "INT64")  # cross_attention_mask

    @trtp.aot_impl(PLUGIN_ID)
    def cross_attention_aot_impl(
        query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc, past_key: trtp.TensorDesc,
        past_value: trtp.TensorDesc, cross_attention_mask: trtp.TensorDesc,
        num_heads: int, num_kv_heads: int, head_dim: int, tokens_per_tile: int, scale: float,
        outputs: tuple[trtp.TensorDesc], tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        attrs = CrossAttentionAttrs(int(num_heads), int(num_kv_heads), int(head_dim), int(tokens_per_tile),
                                    float(scale))
        config = tk.CROSS_CONFIGS[int(tactic)]
        compiled = tk.compile_cross_kernel(attrs, torch_dtype[query.dtype], config)
        name, ptx = aot_binary(compiled, num_args)

        batch, seq = query.shape_expr[0], query.shape_expr[1]
        new, capacity = key.shape_expr[1], past_key.shape_expr[2]
        tiles = cross_attention_mask.shape_expr[2]
        launch = launch_params(trtp, compiled, trtp.cdiv(seq * attrs.group_size, config.block_m), batch * attrs.num_kv_heads)
        extra_args = trtp.SymIntExprs.from_tuple(
            [trtp.SymInt32(e) for e in scalar_args(seq, new, capacity, tiles, attrs)])
        return name.encode(), ptx.encode(), launch, extra_args


# register(): idempotent; raises TensorRTUnavailable when TensorRT (the real library) or Triton is missing.
_registration = PluginRegistration(PLUGIN_ID, PLUGIN_VERSION, "llamaforge.plugins.cross_attention.triton_kernels", _define)
register = _registration.register
is_registered = _registration.is_registered
