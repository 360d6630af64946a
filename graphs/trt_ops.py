"""Will TensorRT's ONNX parser take this graph? A static check that runs without TensorRT.

Every node of a TensorRT-targeted graph must be either one of our plugin ops (`plugins/attention/
schema.py`: `llamaforge::LlamaAttention`, which `plugins/attention/trt_plugin.py` registers with
TensorRT; `llamaforge::CrossAttention`, `plugins/cross_attention/trt_plugin.py`, checked by
`trt_cross_attention.py`; `llamaforge::AllReduce` of tensor-parallel ranks in its TensorRT form,
TensorRT-LLM's NCCL plugin, `plugins/all_reduce/trt_plugin.py`) or an operator on the ONNX parser's
supported list recorded in `trt_supported_ops.json`
(with the TensorRT version it comes from). Beyond the op name, the check applies what the list says
that a graph can show statically:

* the op's main tensor type is one the list gives for it (e.g. MatMul: FP32/FP16/BF16, so an int8
  MatMul is rejected, while an int8 weight feeding DequantizeLinear -> MatMul is accepted);
* QuantizeLinear / DequantizeLinear: symmetric only (zero point absent or a constant of zeros),
  Q outputs a quantized type (INT8, FP8 E4M3, INT4, FP4) -- FP8 E5M2 is not a TensorRT type;
  INT4 is weight-only (its Q/DQ data a build-time constant); block quantization (`block_size`, the
  INT4 weight-only form) needs a constant scale of the data's rank, at most 2 (IDequantizeLayer's
  limit), blocked on the last or second-to-last axis;
* Reduce*: `axes` a build-time constant;
* the plugin node: the plugin's type combinations (one float type of fp32/fp16/bf16 for
  activations and cache, int32 `past_lengths`), its namespace/version attributes, and no attribute
  the TensorRT plugin does not implement set to a non-default value.

Restrictions the graph cannot show (e.g. runtime values) are left to the parser.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from llamaforge.graphs.trt_cross_attention import cross_attention_problems
from llamaforge.plugins.all_reduce import trt_plugin as all_reduce_trt
from llamaforge.plugins.all_reduce.schema import OP_TYPE as ALL_REDUCE_OP_TYPE
from llamaforge.plugins.attention.schema import DOMAIN, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION, AttentionAttrs
from llamaforge.plugins.attention.trt_plugin import ATTRIBUTE_NAMES
from llamaforge.plugins.cross_attention.schema import DOMAIN as CROSS_DOMAIN
from llamaforge.plugins.cross_attention.schema import OP_TYPE as CROSS_OP_TYPE

SUPPORTED_OPS_FILE = Path(__file__).with_name("trt_supported_ops.json")

# The list's type names, by onnx-ir data type. Anything else (DOUBLE, FLOAT8E5M2, UINT16, ...)
# matches no entry of any op's `types`, so it is reported.
TYPE_NAMES: dict[ir.DataType, str] = {
    ir.DataType.FLOAT: "FP32", ir.DataType.FLOAT16: "FP16", ir.DataType.BFLOAT16: "BF16",
    ir.DataType.FLOAT8E4M3FN: "FP8", ir.DataType.FLOAT4E2M1: "FP4", ir.DataType.INT4: "INT4",
    ir.DataType.INT8: "INT8", ir.DataType.INT32: "INT32", ir.DataType.INT64: "INT64",
    ir.DataType.UINT8: "UINT8", ir.DataType.BOOL: "BOOL",
}
QUANTIZED_TYPES = ("INT8", "FP8", "INT4", "FP4")
# The TensorRT plugin's type combinations (`trt_plugin.llama_attention_autotune`).
PLUGIN_FLOAT_TYPES = ("FP32", "FP16", "BF16")
PLUGIN_IDENTITY_ATTRIBUTES = ("plugin_version", "plugin_namespace")

# Ops whose main type is their output (they have no data input).
_OUTPUT_TYPED = {"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "EyeLike"}
# Ops whose main type is an input other than the first.
_MAIN_INPUT = {"Where": 1}


class UnsupportedForTensorRT(ValueError):
    """The graph holds nodes TensorRT's ONNX parser would reject; the message names each one."""


@dataclass(frozen=True)
class SupportedOps:
    tensorrt_version: str
    operators: dict[str, dict[str, Any]]
    source: dict[str, Any]

    def types(self, op_type: str) -> list[str]:
        return list(self.operators[op_type]["types"])


@functools.cache
def supported_ops(path: Path = SUPPORTED_OPS_FILE) -> SupportedOps:
    data = json.loads(path.read_text())
    return SupportedOps(data["tensorrt_version"], data["operators"], data["source"])


def _type_name(value: ir.Value | None) -> str | None:
    if value is None or value.dtype is None:
        return None
    return TYPE_NAMES.get(value.dtype, value.dtype.name)


def _constant(value: ir.Value | None) -> np.ndarray | None:
    """The value's data if it is a build-time constant (initializer or Constant node), else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain == "" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain == ""


def _nodes(graph: ir.Graph) -> Iterator[ir.Node]:
    """Every node, those in If/Loop/Scan bodies included."""
    return iter(ir.traversal.RecursiveGraphIterator(graph))


def _label(node: ir.Node) -> str:
    domain = node.domain or "ai.onnx"
    return f"node {node.name or '<unnamed>'!r} ({domain}::{node.op_type})"


def _check_standard(node: ir.Node, ops: SupportedOps) -> list[str]:
    label, op = _label(node), node.op_type
    if op not in ops.operators:
        return [f"{label}: {op} is not on TensorRT {ops.tensorrt_version}'s ONNX-parser supported list "
                f"(graphs/{SUPPORTED_OPS_FILE.name})"]
    allowed = ops.types(op)
    problems = []

    def check_type(value: ir.Value | None, what: str, accepted: list[str] | tuple[str, ...]) -> None:
        name = _type_name(value)
        if name is not None and name not in accepted:
            problems.append(f"{label}: {what} {value.name if value else ''!r} is {name}; TensorRT "
                            f"{ops.tensorrt_version} supports {op} for {', '.join(accepted)}")

    if op in ("Cast", "CastLike"):
        check_type(node.inputs[0], "input", allowed)
        check_type(node.outputs[0], "output", allowed)
    elif op in _OUTPUT_TYPED:
        check_type(node.outputs[0], "output", allowed)
    elif node.inputs:
        index = _MAIN_INPUT.get(op, 0)
        check_type(node.inputs[index] if index < len(node.inputs) else None, "input", allowed)

    if op in ("QuantizeLinear", "DequantizeLinear"):
        zero_point = node.inputs[2] if len(node.inputs) > 2 else None
        if zero_point is not None:
            data = _constant(zero_point)
            if data is None or np.any(data.astype(np.float64) != 0):
                problems.append(f"{label}: zero point {zero_point.name!r} must be a constant 0 "
                                "(TensorRT quantization is symmetric)")
        if op == "QuantizeLinear":
            check_type(node.outputs[0], "output", QUANTIZED_TYPES)
        problems += _check_int4_and_blocks(node, label)
    if op.startswith("Reduce") and len(node.inputs) > 1 and node.inputs[1] is not None:
        if not _is_constant(node.inputs[1]):
            problems.append(f"{label}: `axes` ({node.inputs[1].name!r}) must be a build-time constant for TensorRT")
    return problems


def _check_int4_and_blocks(node: ir.Node, label: str) -> list[str]:
    """INT4 only on weights, and the block-quantization form TensorRT's IDequantizeLayer takes."""
    problems = []
    data, scale = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    int4 = _type_name(node.outputs[0] if node.op_type == "QuantizeLinear" else data) == "INT4"
    if int4 and not _is_constant(data):
        problems.append(f"{label}: INT4 is weight-only in TensorRT; {data.name if data else ''!r} is not a "
                        "build-time constant")
    block = node.attributes.get_int("block_size", 0)
    if block:
        values = _constant(scale)
        rank = len(data.shape) if data is not None and data.shape is not None else None
        axis = node.attributes.get_int("axis", 1)
        if values is None:
            problems.append(f"{label}: block-quantization scale {scale.name if scale else ''!r} must be a build-time constant")
        elif rank is None or values.ndim != rank or rank > 2:
            problems.append(f"{label}: block quantization needs a scale of the data's rank, at most 2 (TensorRT's "
                            f"IDequantizeLayer); scale has rank {values.ndim}, data rank {rank}")
        elif axis % rank not in (rank - 1, rank - 2):
            problems.append(f"{label}: block quantization along axis {axis}; TensorRT blocks only the last or "
                            "second-to-last dimension")
    return problems


def _check_plugin(node: ir.Node) -> list[str]:
    label, problems = _label(node), []
    types = [_type_name(v) for v in node.inputs]
    floats = {t for i, t in enumerate(types) if i != 5 and t is not None}
    if not floats <= set(PLUGIN_FLOAT_TYPES) or len(floats) > 1:
        problems.append(f"{label}: the TensorRT plugin takes one float type ({'/'.join(PLUGIN_FLOAT_TYPES)}) for "
                        f"query/key/value and the caches; got {sorted(floats)}")
    if len(types) > 5 and types[5] not in (None, "INT32"):
        problems.append(f"{label}: past_lengths must be INT32 for the TensorRT plugin, got {types[5]}")
    namespace = node.attributes.get_string("plugin_namespace", node.domain)
    version = node.attributes.get_string("plugin_version", PLUGIN_VERSION)
    if namespace != PLUGIN_NAMESPACE or version != PLUGIN_VERSION:
        problems.append(f"{label}: plugin {namespace}::{node.op_type} version {version} is not the one "
                        f"plugins/attention/trt_plugin.py registers ({PLUGIN_NAMESPACE}, version {PLUGIN_VERSION})")
    defaults = {f.name: f.default for f in fields(AttentionAttrs)}
    llama4 = {name: attr.value for name, attr in node.attributes.items() if name in ("use_rope", "qk_norm", "attn_chunk_size",
                                                                                   "temperature_tuning")}
    for flag in AttentionAttrs(1, 1, 2, **llama4).non_default_llama4_flags():  # not in the plugin's kernels yet
        problems.append(f"{label}: attribute {flag} (Llama 4) is not implemented by the TensorRT plugin")
    kv_quant = node.attributes.get_string("kv_cache_quant", "none")
    if kv_quant != "none":  # declared by the plugin (ATTRIBUTE_NAMES) but not in its kernels yet
        problems.append(f"{label}: attribute kv_cache_quant={kv_quant!r} (KV_CACHE=fp8) is not implemented by the "
                        "TensorRT plugin's kernels yet")
    for name, attr in node.attributes.items():
        if name in ATTRIBUTE_NAMES or name in PLUGIN_IDENTITY_ATTRIBUTES:
            continue
        if name not in defaults or attr.value != defaults[name]:
            problems.append(f"{label}: attribute {name}={attr.value!r} is not implemented by the TensorRT plugin")
    return problems


def _check_all_reduce(node: ir.Node) -> list[str]:
    """`llamaforge::AllReduce` in its TensorRT form (`lower-all-reduce-trt`): TensorRT-LLM's NCCL
    `AllReduce` plugin (plugins/all_reduce/trt_plugin.py; TensorRT 10.13 has no collective layer)."""
    label = _label(node)
    namespace = node.attributes.get_string("plugin_namespace", "")
    version = node.attributes.get_string("plugin_version", "")
    if (namespace, version) != (all_reduce_trt.PLUGIN_NAMESPACE, all_reduce_trt.PLUGIN_VERSION):
        return [f"{label}: not in TensorRT form (plugin {namespace or '<none>'}::{node.op_type} version {version!r}); "
                f"`lower-all-reduce-trt` maps it to {all_reduce_trt.PLUGIN_ID} version {all_reduce_trt.PLUGIN_VERSION}"]
    x = node.inputs[0] if node.inputs else None
    dtype = x.dtype.name if x is not None and x.dtype is not None else None
    world_size = node.attributes.get_int("world_size", 0)
    try:
        want = all_reduce_trt.plugin_fields(world_size, dtype or "")
    except ValueError as e:
        return [f"{label}: {e}"]
    got = {name: node.attributes[name].value for name in all_reduce_trt.PLUGIN_FIELDS if name in node.attributes}
    got = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in got.items()}
    wrong = sorted(name for name in want if got.get(name) != want[name])
    if wrong:
        return [f"{label}: {all_reduce_trt.PLUGIN_ID} fields {wrong} are not the NCCL, unfused all-reduce over "
                f"world_size={world_size} ranks of {dtype}"]
    return []


def tensorrt_problems(model: ir.Model) -> list[str]:
    """Every reason TensorRT's ONNX parser would reject a node of `model`; empty if none."""
    ops = supported_ops()
    problems: list[str] = []
    for node in _nodes(model.graph):
        if node.domain == DOMAIN and node.op_type == OP_TYPE:
            problems += _check_plugin(node)
        elif node.domain == DOMAIN and node.op_type == ALL_REDUCE_OP_TYPE:
            problems += _check_all_reduce(node)
        elif node.domain == CROSS_DOMAIN and node.op_type == CROSS_OP_TYPE:  # Llama 3.2 Vision
            problems += cross_attention_problems(node, _label(node))
        elif node.domain in ("", "ai.onnx"):
            problems += _check_standard(node, ops)
        else:
            problems.append(f"{_label(node)}: domain {node.domain!r} is neither the ONNX standard nor a "
                            f"llama-forge plugin ({DOMAIN}::{OP_TYPE}, {DOMAIN}::{ALL_REDUCE_OP_TYPE}, "
                            f"{CROSS_DOMAIN}::{CROSS_OP_TYPE}); TensorRT has no importer for it")
    return problems


def check_tensorrt_graph(model: ir.Model) -> None:
    problems = tensorrt_problems(model)
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise UnsupportedForTensorRT(f"{len(problems)} node(s) TensorRT {supported_ops().tensorrt_version} "
                                     f"cannot import:\n  {shown}")


class CheckTensorRTOps(ir.passes.InPlacePass):
    """Fails the pipeline when a node is neither our plugin nor on TensorRT's ONNX-parser list."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        check_tensorrt_graph(model)
        return ir.passes.PassResult(model, False)
