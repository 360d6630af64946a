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

Kernel calling convention of a TensorRT AOT plugin: input pointers, then the int32 scalars returned
as extra arguments, then output pointers -- `_attention_kernel`'s parameter order. Triton >= 3.3
appends two hidden pointer parameters (global and profile scratch); TensorRT does not pass them, so
`aot_binary` removes them from the PTX after checking the kernel needs no scratch and never reads
them.

Importing this module needs neither TensorRT nor Triton; `register()` needs both and says so.
"""

import inspect
import re
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

# NB: no `from __future__ import annotations` here: tensorrt.plugin checks the decorated
# functions' annotations against its own classes, so they must be real objects, not strings.

PLUGIN_NAME = OP_TYPE
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
QDP_PLUGIN_VERSION = "1"  # tensorrt.plugin registers every plugin creator with version "1"
AOT_ATTRIBUTE = "aot"
# The plugin's fields are the op's attributes, in `AttentionAttrs` field order (the parser reads them
# from the node's attributes by name).
ATTRIBUTE_NAMES = tuple(attribute_types())

_registered = False


class TensorRTUnavailable(RuntimeError):
    """The plugin cannot be registered in this environment."""


def tensorrt_modules() -> tuple[Any, Any]:
    """(tensorrt, tensorrt.plugin), or TensorRTUnavailable. Detects the real library the way
    `llamaforge.build.tensorrt_available` does: `tensorrt-stubs` makes `import tensorrt` succeed."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(f"cannot register the TensorRT plugin {PLUGIN_ID}: TensorRT is not installed") from exc
    if not hasattr(tensorrt, "Builder"):
        raise TensorRTUnavailable(
            f"cannot register the TensorRT plugin {PLUGIN_ID}: TensorRT is not installed "
            "(install the 'tensorrt' extra on a machine with an NVIDIA GPU; the tensorrt-stubs type stubs are not enough)")
    try:
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"cannot register {PLUGIN_ID}: this TensorRT ({getattr(tensorrt, '__version__', '?')}) has no "
            "tensorrt.plugin module; Python plugins with AOT implementations need TensorRT >= 10.9") from exc
    return tensorrt, trtp


def _triton_kernels() -> Any:
    try:  # Triton is optional (a GPU build's, and the test extra's)
        from llamaforge.plugins.attention import triton_kernels
    except ImportError as exc:
        raise TensorRTUnavailable(f"cannot register {PLUGIN_ID}: OpenAI Triton is not installed ({exc})") from exc
    if triton_kernels.interpreting():
        raise TensorRTUnavailable(f"cannot register {PLUGIN_ID}: TRITON_INTERPRET is set, and the interpreter "
                                  "cannot compile kernels to PTX")
    return triton_kernels


def is_registered() -> bool:
    return _registered


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


def aot_binary(compiled: Any, num_args: int) -> tuple[str, str]:
    """(kernel name, PTX) of a compiled Triton kernel, its hidden trailing scratch parameters removed.

    `num_args` is the number of arguments TensorRT passes (inputs + extra scalars + outputs).
    """
    meta = compiled.metadata
    if getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0):
        raise RuntimeError(f"{meta.name} needs Triton scratch memory, which a TensorRT AOT plugin cannot provide")
    ptx = compiled.asm["ptx"]
    match = re.search(r"\.entry\s+" + re.escape(meta.name) + r"\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise RuntimeError(f"no .entry {meta.name} in the compiled PTX")
    params = [p.strip() for p in match.group(1).split(",") if p.strip()]
    if len(params) < num_args:
        raise RuntimeError(f"{meta.name} has {len(params)} parameters, TensorRT passes {num_args}")
    hidden = params[num_args:]
    if len(hidden) > 2:
        raise RuntimeError(f"{meta.name} has {len(hidden)} parameters beyond TensorRT's {num_args} arguments")
    body = ptx[match.end():]
    for param in hidden:
        name = param.split()[-1]
        if re.search(r"\b" + re.escape(name) + r"\b", body):
            raise RuntimeError(f"{meta.name} reads its hidden parameter {name}; TensorRT would not pass it")
    kept = ",\n\t".join(params[:num_args])
    ptx = ptx[:match.start(1)] + "\n\t" + kept + "\n" + ptx[match.end(1):]
    return meta.name, ptx


def register() -> None:
    """Register the plugin with TensorRT's plugin registry (idempotent). Raises TensorRTUnavailable
    when TensorRT (the real library) or Triton is missing."""
    global _registered
    if _registered:
        return
    trt, trtp = tensorrt_modules()
    tk = _triton_kernels()
    if PLUGIN_VERSION != QDP_PLUGIN_VERSION:
        raise TensorRTUnavailable(f"schema.PLUGIN_VERSION is {PLUGIN_VERSION!r} but tensorrt.plugin registers "
                                  f"version {QDP_PLUGIN_VERSION!r}: the ONNX parser would not find the plugin")
    _define(trt, trtp, tk)
    _registered = True


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
        # Positions: 5 float inputs, past_lengths, 3 float outputs; one dtype across the floats.
        half = trtp.AutoTuneCombination(", ".join(["FP16|BF16"] * 5 + ["INT32"] + ["FP16|BF16"] * 3), "LINEAR")
        half.tactics(list(tk.FP16_TACTICS))
        full = trtp.AutoTuneCombination(", ".join(["FP32"] * 5 + ["INT32"] + ["FP32"] * 3), "LINEAR")
        full.tactics(list(tk.FP32_TACTICS))
        return [half, full]

    def aot_impl(arguments: dict[str, Any], attrs: AttentionAttrs) -> tuple[bytes, bytes, Any, Any]:
        query, past_key, tactic = arguments["query"], arguments["past_key"], arguments["tactic"]
        config = tk.OP_CONFIGS[int(tactic)]  # compile_op_kernel refuses the Llama 4 flags by name
        compiled = tk.compile_op_kernel(attrs, torch_dtype[query.dtype], config)
        name, ptx = aot_binary(compiled, num_args)

        batch, seq = query.shape_expr[0], query.shape_expr[1]
        capacity = past_key.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(seq * attrs.group_size, config.block_m)
        launch.grid_y = batch * attrs.num_kv_heads
        launch.block_x = compiled.metadata.num_warps * 32
        launch.shared_mem = compiled.metadata.shared
        extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in op_scalar_args(seq, capacity, attrs)])
        return name.encode(), ptx.encode(), launch, extra_args

    trtp.aot_impl(PLUGIN_ID)(flat_signature(
        "llama_attention_aot_impl", tensor_descs,
        [P("outputs", P.POSITIONAL_OR_KEYWORD, annotation=tuple[trtp.TensorDesc]),
         P("tactic", P.POSITIONAL_OR_KEYWORD, annotation=int)],
        tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs], aot_impl))

