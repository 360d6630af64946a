"""Verification run after every pass: the graph must be a valid ONNX model.

Weights are not read: each initializer is serialised as an external-data reference (its name,
type and shape are what the checker needs), so verifying a 405B graph costs the same as a tiny one.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from llamaforge.plugins.attention.schema import register_schema
from llamaforge.plugins.moe.schema import register_schema as register_moe_schema


class VerificationError(RuntimeError):
    pass


def skeleton_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a ModelProto whose initializers carry no data."""
    saved: dict[str, ir.TensorProtocol | None] = {}
    try:
        for name, value in model.graph.initializers.items():
            const = value.const_value
            saved[name] = const
            if const is not None and not isinstance(const, ir.ExternalTensor) and const.size > 16:
                value.const_value = ir.ExternalTensor(
                    "verify-skeleton.data", 0, const.nbytes, const.dtype, shape=ir.Shape(const.shape.numpy()), name=name
                )
        proto = ir.serde.serialize_model(model)
    finally:
        for name, const in saved.items():
            model.graph.initializers[name].const_value = const
    # The checker insists external data exists; a data-less weight is the same to it as an input.
    kept = []
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            proto.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            kept.append(tensor)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto


def verify(model: ir.Model, where: str) -> None:
    register_schema()
    register_moe_schema()
    proto = skeleton_proto(model)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise VerificationError(f"graph invalid after {where}: {e}") from e
    produced = {v.name for v in model.graph.inputs} | set(model.graph.initializers)
    for node in model.graph:  # topological order and no dangling inputs
        for v in node.inputs:
            if v is not None and v.name not in produced:
                raise VerificationError(f"graph invalid after {where}: node {node.name!r} reads {v.name!r} before it is produced")
        produced.update(o.name for o in node.outputs)
