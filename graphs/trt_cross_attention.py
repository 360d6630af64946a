"""`check-trt-ops` for `llamaforge::CrossAttention` nodes (Llama 3.2 Vision's text decoder): what the
TensorRT plugin of `plugins/cross_attention/trt_plugin.py` takes, checked on the graph.

* one float type (fp32 / fp16 / bf16) for query, key, value and the cross caches, an INT64 mask
  (the plugin's type combinations, `cross_attention_autotune`);
* the plugin's identity: namespace `llamaforge`, this build's plugin version;
* no attribute the plugin does not implement.
"""

from __future__ import annotations

from dataclasses import fields

import onnx_ir as ir

from llamaforge.plugins.cross_attention.schema import PLUGIN_NAMESPACE, PLUGIN_VERSION, CrossAttentionAttrs

FLOAT_TYPES = {ir.DataType.FLOAT: "FP32", ir.DataType.FLOAT16: "FP16", ir.DataType.BFLOAT16: "BF16"}
IDENTITY = ("plugin_version", "plugin_namespace")


def cross_attention_problems(node: ir.Node, label: str) -> list[str]:
    problems = []
    floats = {v.dtype for i, v in enumerate(node.inputs) if i != 5 and v is not None and v.dtype is not None}
    if not floats <= set(FLOAT_TYPES) or len(floats) > 1:
        names = sorted(FLOAT_TYPES.get(t, t.name) for t in floats)
        problems.append(f"{label}: the TensorRT plugin takes one float type ({'/'.join(FLOAT_TYPES.values())}) for "
                        f"query/key/value and the cross caches; got {names}")
    mask = node.inputs[5] if len(node.inputs) > 5 else None
    if mask is None or mask.dtype not in (None, ir.DataType.INT64):
        problems.append(f"{label}: cross_attention_mask must be INT64 for the TensorRT plugin, got "
                        f"{mask.dtype if mask is not None else 'nothing'}")
    namespace = node.attributes.get_string("plugin_namespace", "")
    version = node.attributes.get_string("plugin_version", PLUGIN_VERSION)
    if namespace != PLUGIN_NAMESPACE or version != PLUGIN_VERSION:
        problems.append(f"{label}: plugin {namespace or '<no namespace>'}::{node.op_type} version {version} is not the "
                        f"one plugins/cross_attention/trt_plugin.py registers ({PLUGIN_NAMESPACE}, version {PLUGIN_VERSION})")
    known = {f.name for f in fields(CrossAttentionAttrs)} | set(IDENTITY)
    for name in node.attributes:
        if name not in known:
            problems.append(f"{label}: attribute {name} is not implemented by the TensorRT plugin")
    return problems
