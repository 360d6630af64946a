"""Lowering of `llamaforge::CrossAttention` for ONNX Runtime, as standard ONNX ops (float32 inside).

No branch is needed for the two kinds of call: the cache update is `Concat(new, past[:, :, new:])`,
which is `past` itself when there are no new keys (a decode step) and the new keys when they fill
the cache (the prefill). Zero-sized tensors (no new keys; a text-only sequence's empty cache) are
ordinary ONNX values: `ReduceSum` over an empty axis is 0 and a MatMul over an empty axis is 0.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llamaforge.plugins.cross_attention.schema import CrossAttentionAttrs

FLOAT = ir.DataType.FLOAT


def _const(tape: ir.tape.Tape, array: np.ndarray, name: str) -> ir.Value:
    return tape.op("Constant", [], {"value": ir.tensor(array, name=name)})


def _ints(tape: ir.tape.Tape, *values: int) -> ir.Value:
    return _const(tape, np.array(values, dtype=np.int64), "ints")


def decompose(node: ir.Node, attrs: CrossAttentionAttrs) -> tuple[list[ir.Node], list[ir.Value]]:
    """Standard-op subgraph equivalent to `node`; returns (nodes, [output, present_key, present_value])."""
    tape = ir.tape.Tape()
    query, key, value, past_key, past_value, mask = node.inputs
    assert query is not None and key is not None and value is not None and mask is not None
    assert past_key is not None and past_value is not None
    act_type, cache_type = node.outputs[0].dtype, node.outputs[1].dtype
    if act_type is None or cache_type is None:
        raise ValueError(f"{node.name}: CrossAttention outputs must declare their element types")
    h, kvh, d, g = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim, attrs.group_size

    def to_float(v: ir.Value, from_type: ir.DataType) -> ir.Value:
        return v if from_type == FLOAT else tape.op("Cast", [v], {"to": FLOAT})

    def cache_heads(x: ir.Value) -> ir.Value:  # [B, N, KVH*D] -> [B, KVH, N, D] in the cache's type
        x = tape.op("Transpose", [tape.op("Reshape", [x, _ints(tape, 0, 0, kvh, d)])], {"perm": [0, 2, 1, 3]})
        return x if act_type == cache_type else tape.op("Cast", [x], {"to": cache_type})

    new = tape.op("Shape", [key], {"start": 1, "end": 2})  # [1]
    big = _ints(tape, np.iinfo(np.int64).max)
    axis2 = _ints(tape, 2)
    present_key = tape.op("Concat", [cache_heads(key), tape.op("Slice", [past_key, new, big, axis2])], {"axis": 2})
    present_value = tape.op("Concat", [cache_heads(value), tape.op("Slice", [past_value, new, big, axis2])], {"axis": 2})

    # q [B, S, H*D] -> [B, KVH, G, S, D]
    q = tape.op("Transpose", [tape.op("Reshape", [to_float(query, act_type), _ints(tape, 0, 0, kvh, g, d)])],
                {"perm": [0, 2, 3, 1, 4]})
    keys_t = tape.op("Unsqueeze", [tape.op("Transpose", [to_float(present_key, cache_type)], {"perm": [0, 1, 3, 2]}),
                                   axis2])  # [B, KVH, 1, D, C]
    scores = tape.op("Mul", [tape.op("MatMul", [q, keys_t]), _const(tape, np.array(attrs.scale, np.float32), "scale")])

    # visible[b, s, c] = mask[b, s, c // tokens_per_tile] == 1, or every c where no tile is allowed.
    capacity = tape.op("Squeeze", [tape.op("Shape", [past_key], {"start": 2, "end": 3}), _ints(tape, 0)])
    positions = tape.op("Range", [_const(tape, np.array(0, np.int64), "zero"), capacity,
                                  _const(tape, np.array(1, np.int64), "one")])
    tile = tape.op("Div", [positions, _const(tape, np.array(attrs.tokens_per_tile, np.int64), "tokens_per_tile")])
    allowed = tape.op("Equal", [tape.op("Gather", [mask, tile], {"axis": 2}), _const(tape, np.array(1, np.int64), "one")])
    count = tape.op("ReduceSum", [tape.op("Cast", [allowed], {"to": ir.DataType.INT64}), _ints(tape, -1)], {"keepdims": 1})
    none = tape.op("Equal", [count, _const(tape, np.array(0, np.int64), "zero")])  # [B, S, 1]
    visible = tape.op("Unsqueeze", [tape.op("Or", [allowed, none]), _ints(tape, 1, 2)])  # [B, 1, 1, S, C]
    scores = tape.op("Where", [visible, scores, _const(tape, np.array(-np.inf, np.float32), "neg_inf")])
    probs = tape.op("Softmax", [scores], {"axis": -1})
    values = tape.op("Unsqueeze", [to_float(present_value, cache_type), axis2])  # [B, KVH, 1, C, D]
    out = tape.op("MatMul", [probs, values])  # [B, KVH, G, S, D]
    out = tape.op("Reshape", [tape.op("Transpose", [out], {"perm": [0, 3, 1, 2, 4]}), _ints(tape, 0, 0, h * d)])
    if act_type != FLOAT:
        out = tape.op("Cast", [out], {"to": act_type})
    return list(tape.nodes), [out, present_key, present_value]
