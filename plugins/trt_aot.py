"""What our TensorRT plugins share: TensorRT's Python plugin API (`tensorrt.plugin`, "quickly
deployable plugins") with an ahead-of-time implementation, an OpenAI Triton kernel compiled to PTX.
`plugins/attention/trt_plugin.py` and `plugins/cross_attention/trt_plugin.py` each describe their
op; this module holds the rest once: finding the real TensorRT and the Triton kernels, registering
once, the type combinations TensorRT's autotuner tries, the kernel's PTX without Triton's hidden
parameters, and its launch parameters.

Kernel calling convention of a TensorRT AOT plugin: input pointers, then the int32 scalars returned
as extra arguments, then output pointers. Triton >= 3.3 appends two hidden pointer parameters
(global and profile scratch); TensorRT does not pass them, so `aot_binary` removes them from the
PTX after checking the kernel needs no scratch and never reads them.

Importing this module needs neither TensorRT nor Triton; `PluginRegistration.register()` needs both
and says so.
"""

import importlib
import re
from collections.abc import Callable
from typing import Any

# NB: no `from __future__ import annotations` in the plugin modules: tensorrt.plugin checks the
# decorated functions' annotations against its own classes, so they must be real objects.

QDP_PLUGIN_VERSION = "1"  # tensorrt.plugin registers every plugin creator with version "1"


class TensorRTUnavailable(RuntimeError):
    """The plugin cannot be registered in this environment."""


def tensorrt_modules(plugin_id: str) -> tuple[Any, Any]:
    """(tensorrt, tensorrt.plugin), or TensorRTUnavailable. Detects the real library the way
    `llamaforge.build.tensorrt_available` does: `tensorrt-stubs` makes `import tensorrt` succeed."""
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(f"cannot register the TensorRT plugin {plugin_id}: TensorRT is not installed") from exc
    if not hasattr(tensorrt, "Builder"):
        raise TensorRTUnavailable(
            f"cannot register the TensorRT plugin {plugin_id}: TensorRT is not installed "
            "(install the 'tensorrt' extra on a machine with an NVIDIA GPU; the tensorrt-stubs type stubs are not enough)")
    try:
        import tensorrt.plugin as trtp
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"cannot register {plugin_id}: this TensorRT ({getattr(tensorrt, '__version__', '?')}) has no "
            "tensorrt.plugin module; Python plugins with AOT implementations need TensorRT >= 10.9") from exc
    return tensorrt, trtp


def triton_kernels(module: str, plugin_id: str) -> Any:
    """The plugin's kernel module (it imports OpenAI Triton), or TensorRTUnavailable."""
    try:  # Triton is optional (a GPU build's, and the test extra's)
        kernels = importlib.import_module(module)
    except ImportError as exc:
        raise TensorRTUnavailable(f"cannot register {plugin_id}: OpenAI Triton is not installed ({exc})") from exc
    if kernels.interpreting():
        raise TensorRTUnavailable(f"cannot register {plugin_id}: TRITON_INTERPRET is set, and the interpreter "
                                  "cannot compile kernels to PTX")
    return kernels


class PluginRegistration:
    """Registers one plugin with TensorRT's plugin registry, once per process. `define(trt, trtp,
    kernels)` makes the `@trtp.register`, `@trtp.autotune` and `@trtp.aot_impl` calls."""

    def __init__(self, plugin_id: str, plugin_version: str, kernels_module: str,
                 define: Callable[[Any, Any, Any], None]) -> None:
        self.plugin_id, self.plugin_version = plugin_id, plugin_version
        self.kernels_module, self.define = kernels_module, define
        self.registered = False

    def register(self) -> None:
        """Idempotent. Raises TensorRTUnavailable when TensorRT (the real library) or Triton is missing."""
        if self.registered:
            return
        trt, trtp = tensorrt_modules(self.plugin_id)
        kernels = triton_kernels(self.kernels_module, self.plugin_id)
        if self.plugin_version != QDP_PLUGIN_VERSION:
            raise TensorRTUnavailable(f"the schema's plugin version is {self.plugin_version!r} but tensorrt.plugin "
                                      f"registers version {QDP_PLUGIN_VERSION!r}: the ONNX parser would not find {self.plugin_id}")
        self.define(trt, trtp, kernels)
        self.registered = True

    def is_registered(self) -> bool:
        return self.registered


def float_type_combinations(trtp: Any, kernels: Any, index_type: str) -> list[Any]:
    """The autotuner's type combinations of an op with five float inputs, one integer input
    (`index_type`, TensorRT's name) and three float outputs, one float type across them all: the
    half types with the kernel module's FP16 tactics, fp32 with its FP32 ones; linear layouts."""
    half = trtp.AutoTuneCombination(", ".join(["FP16|BF16"] * 5 + [index_type] + ["FP16|BF16"] * 3), "LINEAR")
    half.tactics(list(kernels.FP16_TACTICS))
    full = trtp.AutoTuneCombination(", ".join(["FP32"] * 5 + [index_type] + ["FP32"] * 3), "LINEAR")
    full.tactics(list(kernels.FP32_TACTICS))
    return [half, full]


def launch_params(trtp: Any, compiled: Any, grid_x: Any, grid_y: Any) -> Any:
    """TensorRT's launch parameters for a compiled Triton kernel: its warps and shared memory, on a
    grid given as ints or TensorRT shape expressions."""
    launch = trtp.KernelLaunchParams()
    launch.grid_x, launch.grid_y = grid_x, grid_y
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    return launch


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
