"""Lowerings of `llamaforge::AllReduce` for ONNX Runtime.

* CPU (`lower_for_cpu`, the build's): `ai.onnx.contrib::LlamaforgeAllReduce`, float32 only, run by
  onnxruntime-extensions' Python custom op whose kernel hands the tensor to MPI's Allreduce on the
  rank's communicator (runtime/parallel/collective.py; ONNX Runtime's CPU build has no collective).
  A float16 / bfloat16 input is cast to float32 around it.
* CUDA (`lower_for_cuda`): `com.microsoft::AllReduce`, ONNX Runtime's NCCL kernel (its CUDA build
  with ORT_USE_NCCL; float16 / float32; no attributes: the group is the whole NCCL world).

The contrib op is unknown to onnx, so `register_cpu_schema` registers its schema (output typed like
its input) in this process, where the build's checker and shape inference need it.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx import defs

from llamaforge.plugins.op_schema import copy_input_types
from llamaforge.runtime.parallel.collective import ALL_REDUCE_DOMAIN, ALL_REDUCE_OP_TYPE

CUDA_DOMAIN, CUDA_OP_TYPE = "com.microsoft", "AllReduce"
CUDA_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def register_cpu_schema() -> None:
    """The ONNX schema of the CPU form, so onnx's checker types its output; idempotent."""
    if defs.has(ALL_REDUCE_OP_TYPE, 1, ALL_REDUCE_DOMAIN):
        return
    P = defs.OpSchema.FormalParameter
    schema = defs.OpSchema(ALL_REDUCE_OP_TYPE, ALL_REDUCE_DOMAIN, 1,
                           doc="Sum over the MPI ranks (onnxruntime-extensions Python op; runtime/parallel/collective.py)",
                           inputs=[P("x", "T", "partial sum")], outputs=[P("y", "T", "sum over the ranks")],
                           type_constraints=[("T", ["tensor(float)"], "float32")])
    schema.set_type_and_shape_inference_function(lambda ctx: copy_input_types(ctx, ((0, 0),)))
    defs.register_schema(schema)


def _dtype(node: ir.Node) -> ir.DataType:
    x = node.inputs[0]
    if x is None or x.dtype is None:
        raise ValueError(f"{node.name}: AllReduce input must declare its element type")
    return x.dtype


def lower_for_cpu(node: ir.Node) -> tuple[list[ir.Node], list[ir.Value]]:
    """(nodes, [output]): the contrib op, with casts to and from float32 where needed."""
    register_cpu_schema()
    dtype = _dtype(node)
    tape = ir.tape.Tape()
    x = node.inputs[0]
    assert x is not None
    if dtype != ir.DataType.FLOAT:
        x = tape.op("Cast", [x], {"to": ir.DataType.FLOAT})
    y = tape.op(ALL_REDUCE_OP_TYPE, [x], domain=ALL_REDUCE_DOMAIN)
    if dtype != ir.DataType.FLOAT:
        y = tape.op("Cast", [y], {"to": dtype})
    return list(tape.nodes), [y]


def lower_for_cuda(node: ir.Node) -> tuple[list[ir.Node], list[ir.Value]]:
    """(nodes, [output]): ONNX Runtime's NCCL op (float16 / float32; bfloat16 is refused, naming the node)."""
    dtype = _dtype(node)
    if dtype not in CUDA_TYPES:
        raise ValueError(f"{node.name}: {CUDA_DOMAIN}::{CUDA_OP_TYPE} takes float16 or float32, not {dtype.name}")
    tape = ir.tape.Tape()
    y = tape.op(CUDA_OP_TYPE, [node.inputs[0]], domain=CUDA_DOMAIN)
    return list(tape.nodes), [y]
