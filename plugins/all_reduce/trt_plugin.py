"""`llamaforge::AllReduce` for TensorRT: TensorRT-LLM's NCCL all-reduce plugin.

TensorRT 10.13 (the version this project pins, `pyproject.toml`'s `tensorrt` extra) has no
collective layer of its own: `IDistCollectiveLayer` (`INetworkDefinition.add_dist_collective`,
ALL_REDUCE with SUM over `nb_rank` ranks, NCCL underneath) first appears in TensorRT 11.0 and is
not in tensorrt-stubs 10.13. So the TensorRT form of the op is the plugin TensorRT-LLM uses for its
own tensor-parallel engines: `AllReduce`, version "1", namespace "tensorrt_llm"
(cpp/tensorrt_llm/plugins/ncclPlugin/allreducePlugin.cpp, `AllreducePluginCreator`), with its
NCCL strategy and no fusion, so it takes the one input and gives one output.

The rank graph keeps the node (`lower-all-reduce-trt` rewrites its attributes into the plugin's
fields); TensorRT's ONNX parser finds the plugin through its fallback importer from the op type
(= the plugin name), `plugin_namespace` and `plugin_version`, and converts each node attribute to
the field type the creator declares (`group` int32[], `type_id` int32, `strategy`/`config`/
`fusion_op`/`affine`/`bias`/`scale` int8, `counter` int32, `eps` float32). The plugin library
(`libnvinfer_plugin_tensorrt_llm.so`, from the `tensorrt_llm` wheel) must be loaded and its
creators registered before parsing: `load_plugin_library`. At run time the plugin opens its NCCL
communicator over MPI (TensorRT-LLM's COMM_SESSION), so the ranks run under mpirun, one per GPU.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

PLUGIN_NAME = "AllReduce"
PLUGIN_NAMESPACE = "tensorrt_llm"
PLUGIN_VERSION = "1"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
LIBRARY_NAME = "libnvinfer_plugin_tensorrt_llm.so"
LIBRARY_ENV = "TRTLLM_PLUGIN_LIBRARY"  # overrides where the build looks for it
# nvinfer1::DataType values (NvInferRuntimeBase.h): the plugin's `type_id` field.
TRT_DATA_TYPES = {"FLOAT": 0, "FLOAT16": 1, "BFLOAT16": 7}
STRATEGY_NCCL = 0  # tensorrt_llm::kernels::AllReduceStrategyType::NCCL
FUSION_NONE = 0  # AllReduceFusionOp::NONE: one input, one output
PLUGIN_INT_FIELDS = ("type_id", "strategy", "config", "fusion_op", "counter", "affine", "bias", "scale")
PLUGIN_FIELDS = ("group", *PLUGIN_INT_FIELDS, "eps")


def plugin_fields(world_size: int, dtype_name: str) -> dict[str, int | float | list[int]]:
    """The node attributes the ONNX parser turns into the plugin's fields: every rank in one group,
    the NCCL strategy, no fusion. `dtype_name` is an onnx-ir DataType name (FLOAT, FLOAT16, BFLOAT16)."""
    if dtype_name not in TRT_DATA_TYPES:
        raise ValueError(f"{PLUGIN_ID} takes {'/'.join(TRT_DATA_TYPES)} tensors, not {dtype_name}")
    return {"group": list(range(world_size)), "type_id": TRT_DATA_TYPES[dtype_name], "strategy": STRATEGY_NCCL,
            "config": 0, "fusion_op": FUSION_NONE, "counter": 0, "affine": 0, "bias": 0, "scale": 0, "eps": 0.0}


class PluginLibraryMissing(RuntimeError):
    """TensorRT-LLM's plugin library cannot be found or loaded; the message says where it looked."""


def find_plugin_library() -> Path:
    """`$TRTLLM_PLUGIN_LIBRARY`, else where the `tensorrt_llm` wheel keeps it (`<package>/libs/`, as
    tensorrt_llm/plugin/plugin.py's `plugin_lib_path` finds it). Only looks (find_spec imports
    nothing): a clear error before any build work when it is not there."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        path = Path(override)
        if not path.is_file():
            raise PluginLibraryMissing(f"{LIBRARY_ENV}={override}: no such file (it must name {LIBRARY_NAME})")
        return path
    spec = importlib.util.find_spec("tensorrt_llm")
    if spec is None or spec.origin is None:
        raise PluginLibraryMissing(f"{PLUGIN_ID} needs TensorRT-LLM's {LIBRARY_NAME}: the tensorrt_llm package is not "
                                   f"installed (a release built on the TensorRT this build uses, "
                                   f"see docs/tensor_parallel.md), or set {LIBRARY_ENV} to the library")
    path = Path(spec.origin).parent / "libs" / LIBRARY_NAME
    if not path.is_file():
        raise PluginLibraryMissing(f"{path}: the tensorrt_llm package has no {LIBRARY_NAME}; set {LIBRARY_ENV}")
    return path


_loaded: set[str] = set()  # initTrtLlmPlugins registers the creators once per process


def load_plugin_library(path: str | Path) -> None:
    """Load TensorRT-LLM's plugin library and register its creators (`initTrtLlmPlugins`, as
    tensorrt_llm/plugin/plugin.py does) under the `tensorrt_llm` namespace; once per process."""
    key = str(Path(path).resolve())
    if key in _loaded:
        return
    try:
        handle = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise PluginLibraryMissing(f"{path}: cannot load TensorRT-LLM's plugin library: {e}") from None
    init = handle.initTrtLlmPlugins
    init.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    init.restype = ctypes.c_bool
    if not init(None, PLUGIN_NAMESPACE.encode()):
        raise PluginLibraryMissing(f"{path}: initTrtLlmPlugins failed to register the {PLUGIN_NAMESPACE} plugins")
    _loaded.add(key)
