"""Passes that rewrite weights. New weights are lazy: they are computed from their sources only
when the engine is written, one at a time, so these passes cost no memory on a 405B graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir


def lazy_weight(name: str, sources: Sequence[ir.TensorProtocol], fn: Callable[..., np.ndarray],
                dtype: ir.DataType, shape: Sequence[int]) -> ir.Value:
    def compute() -> ir.Tensor:
        return ir.Tensor(np.ascontiguousarray(fn(*(s.numpy() for s in sources))), name=name)

    tensor = ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(shape), name=name)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape), const_value=tensor)


def constant_input(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None or not value.is_initializer():
        return None
    return value.const_value


# Value.meta key on a `<name>.T` initializer: the name of the weight it is the transpose of.
TRANSPOSE_OF = "llamaforge.transpose_of"


class FoldWeightTransposes(ir.passes.InPlacePass):
    """`Transpose(W)` of a 2-D weight -> a pre-transposed weight `W.T` (what `nn.Linear` traces to)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.op_type != "Transpose" or node.domain != "":
                continue
            source = constant_input(node.inputs[0])
            perm = node.attributes.get_ints("perm", None)
            if source is None or source.shape.rank() != 2 or perm not in (None, [1, 0], (1, 0)):
                continue
            name = f"{source.name}.T"
            if name not in graph.initializers:
                rows, cols = source.shape.numpy()
                graph.register_initializer(lazy_weight(name, [source], np.transpose, source.dtype, [cols, rows]))
                # share-tied-embedding reads it back: a copy it may replace by a transposed read.
                graph.initializers[name].meta[TRANSPOSE_OF] = source.name
            ir.convenience.replace_all_uses_with(node.outputs[0], graph.initializers[name])
            graph.remove(node, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
