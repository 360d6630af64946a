"""Lowering of `llamaforge::LlamaAttention` for ONNX Runtime, as standard ONNX ops.

Every intermediate is float32 whatever the activation dtype (as in the reference), and the op's
contract is kept exactly: per-row positions from `past_lengths`, rows of different lengths in one
call, a fixed-capacity cache per row.

The KV-cache update is a one-hot matmul rather than a scatter: `onehot[b, c, s] = (c == past_b + s)`
picks the new token that lands at cache position `c` (exact: every product is x*1 or x*0), so
padding rows and positions past `capacity` need no special casing and no index tensor the size
of the cache is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from llamaforge.plugins.attention.reference import rope_cos_sin, rope_inv_freq
from llamaforge.plugins.attention.schema import AttentionAttrs

FLOAT = ir.DataType.FLOAT


def _const(tape: ir.tape.Tape, array: np.ndarray, name: str) -> ir.Value:
    return tape.op("Constant", [], {"value": ir.tensor(array, name=name)})


def _ints(tape: ir.tape.Tape, *values: int) -> ir.Value:
    return _const(tape, np.array(values, dtype=np.int64), "ints")


def _rope(tape: ir.tape.Tape, x: ir.Value, cos: ir.Value, sin: ir.Value, attrs: AttentionAttrs) -> ir.Value:
    """x [B, H, S, D] float32; cos/sin [B, 1, S, D/2]."""
    d = attrs.head_dim
    if attrs.rope_interleaved:
        pairs = tape.op("Reshape", [x, _ints(tape, 0, 0, 0, d // 2, 2)])
        x1, x2 = tape.op_multi_out("Split", [pairs], {"axis": -1, "num_outputs": 2}, num_outputs=2)
        x1 = tape.op("Squeeze", [x1, _ints(tape, -1)])
        x2 = tape.op("Squeeze", [x2, _ints(tape, -1)])
    else:
        x1, x2 = tape.op_multi_out("Split", [x], {"axis": -1, "num_outputs": 2}, num_outputs=2)
    r1 = tape.op("Sub", [tape.op("Mul", [x1, cos]), tape.op("Mul", [x2, sin])])
    r2 = tape.op("Add", [tape.op("Mul", [x2, cos]), tape.op("Mul", [x1, sin])])
    if attrs.rope_interleaved:
        r1 = tape.op("Unsqueeze", [r1, _ints(tape, -1)])
        r2 = tape.op("Unsqueeze", [r2, _ints(tape, -1)])
        return tape.op("Reshape", [tape.op("Concat", [r1, r2], {"axis": -1}), _ints(tape, 0, 0, 0, d)])
    return tape.op("Concat", [r1, r2], {"axis": -1})


def name_values(prefix: str, nodes: list[ir.Node]) -> None:
    """Name every value (and node) the lowering made, If branches included: ONNX requires names
    unique across a graph and all its subgraphs, and `<layer node>/<n>` reads well in a dump."""
    count = 0
    stack = list(nodes)
    while stack:
        node = stack.pop()
        # Always renamed: a branch graph names its values val_0, val_1... on its own.
        node.name = f"{prefix}/{node.op_type}_{count}"
        for value in node.outputs:
            value.name = f"{prefix}/v{count}"
            count += 1
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                stack.extend(attr.value)
        count += 1


def activation_and_cache_types(node: ir.Node) -> tuple[ir.DataType, ir.DataType]:
    """Read from the op's declared outputs: its inputs may come from rewritten nodes (e.g. the
    Split of a packed QKV projection) whose values carry no type."""
    act, cache = node.outputs[0].dtype, node.outputs[1].dtype
    if act is None or cache is None:
        raise ValueError(f"{node.name}: LlamaAttention outputs must declare their element types")
    return act, cache


def _llama4_query_key(tape: ir.tape.Tape, q: ir.Value, k: ir.Value, positions: ir.Value, attrs: AttentionAttrs,
                      act_type: ir.DataType) -> tuple[ir.Value, ir.Value]:
    """QK norm and query temperature (float32 [B, H, S, D] in and out), rounding to the activation
    dtype where the reference does."""

    def rounded(x: ir.Value) -> ir.Value:
        return x if act_type == FLOAT else tape.op("Cast", [tape.op("Cast", [x], {"to": act_type})], {"to": FLOAT})

    if attrs.qk_norm:
        ones = _const(tape, np.ones(attrs.head_dim, dtype=np.float32), "qk_norm_scale")
        norm = {"axis": -1, "epsilon": attrs.qk_norm_eps, "stash_type": 1}
        q = tape.op("RMSNormalization", [rounded(q), ones], norm)
        k = tape.op("RMSNormalization", [rounded(k), ones], norm)
    if attrs.temperature_tuning:
        def scalar(x: float) -> ir.Value:
            return _const(tape, np.array(x, dtype=np.float32), "temperature")

        pos1 = tape.op("Add", [tape.op("Cast", [positions], {"to": FLOAT}), scalar(1.0)])
        steps = tape.op("Floor", [tape.op("Div", [pos1, scalar(attrs.temperature_floor)])])
        # log1p(n) as log(1 + n): n is a whole number, so 1 + n is exact.
        temperature = tape.op("Add", [tape.op("Mul", [tape.op("Log", [tape.op("Add", [steps, scalar(1.0)])]),
                                                      scalar(attrs.temperature_scale)]), scalar(1.0)])  # [B, S]
        q = tape.op("Mul", [rounded(q), tape.op("Unsqueeze", [temperature, _ints(tape, 1, 3)])])
    return q, k


def _fp8_qdq(tape: ir.tape.Tape, x: ir.Value, scale: float, dtype: ir.DataType) -> ir.Value:
    """QuantizeLinear(float8e4m3fn, saturate) -> DequantizeLinear in float32 (the reference's
    `fake_quant_fp8`); x and the result have type `dtype`."""
    x = x if dtype == FLOAT else tape.op("Cast", [x], {"to": FLOAT})
    s = _const(tape, np.array(scale, dtype=np.float32), "kv_scale")
    zero = _const(tape, np.array(0, dtype=ir.DataType.FLOAT8E4M3FN.numpy()), "kv_zero_point")
    x = tape.op("DequantizeLinear", [tape.op("QuantizeLinear", [x, s, zero]), s, zero])
    return x if dtype == FLOAT else tape.op("Cast", [x], {"to": dtype})


def decompose(node: ir.Node, attrs: AttentionAttrs) -> tuple[list[ir.Node], list[ir.Value]]:
    """Standard-op subgraph equivalent to `node`; returns (nodes, [output, present_key, present_value])."""
    tape = ir.tape.Tape()
    query, key, value, past_key, past_value, past_lengths = node.inputs
    assert query is not None and key is not None and value is not None
    assert past_key is not None and past_value is not None and past_lengths is not None
    act_type, cache_type = activation_and_cache_types(node)
    h, kvh, d, g = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim, attrs.group_size

    def to_float(v: ir.Value, from_type: ir.DataType) -> ir.Value:
        return v if from_type == FLOAT else tape.op("Cast", [v], {"to": FLOAT})

    zero, one = _ints(tape, 0), _ints(tape, 1)
    seq = tape.op("Shape", [query], {"start": 1, "end": 2})  # [1]
    capacity = tape.op("Shape", [past_key], {"start": 2, "end": 3})  # [1]
    seq_scalar = tape.op("Squeeze", [seq, zero])
    cap_scalar = tape.op("Squeeze", [capacity, zero])
    scalar0 = _const(tape, np.array(0, dtype=np.int64), "zero")
    scalar1 = _const(tape, np.array(1, dtype=np.int64), "one")
    new_index = tape.op("Range", [scalar0, seq_scalar, scalar1])  # [S]
    cache_index = tape.op("Range", [scalar0, cap_scalar, scalar1])  # [C]
    past = tape.op("Unsqueeze", [tape.op("Cast", [past_lengths], {"to": ir.DataType.INT64}), one])  # [B, 1]
    positions = tape.op("Add", [past, tape.op("Unsqueeze", [new_index, zero])])  # [B, S]

    # RoPE angles exactly as the reference: float32 position times float32 inv_freq.
    inv_freq = _const(tape, rope_inv_freq(attrs).numpy(), "inv_freq")
    angles = tape.op("Mul", [tape.op("Unsqueeze", [tape.op("Cast", [positions], {"to": FLOAT}), _ints(tape, 2)]), inv_freq])
    cos, sin = tape.op("Cos", [angles]), tape.op("Sin", [angles])
    if act_type != FLOAT:  # the reference rounds cos/sin to the activation dtype, as HF does
        cos = tape.op("Cast", [tape.op("Cast", [cos], {"to": act_type})], {"to": FLOAT})
        sin = tape.op("Cast", [tape.op("Cast", [sin], {"to": act_type})], {"to": FLOAT})
    cos = tape.op("Unsqueeze", [cos, one])  # [B, 1, S, D/2]
    sin = tape.op("Unsqueeze", [sin, one])

    def heads(x: ir.Value, n: int) -> ir.Value:  # [B, S, n*D] -> [B, n, S, D]
        return tape.op("Transpose", [tape.op("Reshape", [x, _ints(tape, 0, 0, n, d)])], {"perm": [0, 2, 1, 3]})

    q = to_float(heads(query, h), act_type)
    k = to_float(heads(key, kvh), act_type)
    if attrs.use_rope:
        q = _rope(tape, q, cos, sin, attrs)
        k = _rope(tape, k, cos, sin, attrs)
    q, k = _llama4_query_key(tape, q, k, positions, attrs, act_type)
    v = heads(value, kvh)
    if act_type != FLOAT:  # the reference rounds rotated q/k back to the activation dtype
        q = tape.op("Cast", [tape.op("Cast", [q], {"to": act_type})], {"to": FLOAT})
        k = tape.op("Cast", [k], {"to": act_type})
    if attrs.kv_cache_quant == "fp8":  # Q/DQ of what enters the cache: K after RoPE, and V
        k = _fp8_qdq(tape, k, attrs.k_scale, act_type)
        v = _fp8_qdq(tape, v, attrs.v_scale, act_type)
    if act_type != cache_type:
        k = tape.op("Cast", [k], {"to": cache_type})
        v = tape.op("Cast", [v], {"to": cache_type})

    # Cache update: present[b, :, c] = new[b, :, c - past_b] where 0 <= c - past_b < S, else past.
    target = tape.op("Sub", [tape.op("Unsqueeze", [cache_index, zero]), past])  # [B, C]
    onehot = tape.op("Equal", [tape.op("Unsqueeze", [target, _ints(tape, 2)]), tape.op("Unsqueeze", [new_index, _ints(tape, 0, 1)])])
    written = tape.op("Unsqueeze", [tape.op("ReduceMax", [tape.op("Cast", [onehot], {"to": ir.DataType.INT32}), _ints(tape, 2)], {"keepdims": 1}), one])
    written = tape.op("Cast", [written], {"to": ir.DataType.BOOL})  # [B, 1, C, 1]
    select = tape.op("Unsqueeze", [tape.op("Cast", [onehot], {"to": cache_type}), one])  # [B, 1, C, S]
    present_key = tape.op("Where", [written, tape.op("MatMul", [select, k]), past_key])
    present_value = tape.op("Where", [written, tape.op("MatMul", [select, v]), past_value])

    # Grouped-query attention over the whole cache, causal by absolute position.
    qg = tape.op("Reshape", [q, _ints(tape, 0, kvh, g, -1, d)])  # [B, KVH, G, S, D]
    keys_t = tape.op("Unsqueeze", [tape.op("Transpose", [to_float(present_key, cache_type)], {"perm": [0, 1, 3, 2]}), _ints(tape, 2)])
    scores = tape.op("MatMul", [qg, keys_t])  # [B, KVH, G, S, C]
    scores = tape.op("Mul", [scores, _const(tape, np.array(attrs.scale, dtype=np.float32), "scale")])
    visible = tape.op("LessOrEqual", [tape.op("Unsqueeze", [cache_index, _ints(tape, 0, 1)]), tape.op("Unsqueeze", [positions, _ints(tape, 2)])])  # [B, S, C]
    if attrs.attn_chunk_size:  # and in the query's own chunk
        chunk = _const(tape, np.array(attrs.attn_chunk_size, dtype=np.int64), "chunk")
        same_chunk = tape.op("Equal", [tape.op("Unsqueeze", [tape.op("Div", [cache_index, chunk]), _ints(tape, 0, 1)]),
                                       tape.op("Unsqueeze", [tape.op("Div", [positions, chunk]), _ints(tape, 2)])])
        visible = tape.op("And", [visible, same_chunk])
    visible = tape.op("Unsqueeze", [visible, _ints(tape, 1, 2)])
    scores = tape.op("Where", [visible, scores, _const(tape, np.array(-np.inf, dtype=np.float32), "neg_inf")])
    probs = tape.op("Softmax", [scores], {"axis": -1})
    values = tape.op("Unsqueeze", [to_float(present_value, cache_type), _ints(tape, 2)])
    out = tape.op("MatMul", [probs, values])  # [B, KVH, G, S, D]
    out = tape.op("Transpose", [tape.op("Reshape", [out, _ints(tape, 0, h, -1, d)])], {"perm": [0, 2, 1, 3]})
    out = tape.op("Reshape", [out, _ints(tape, 0, 0, h * d)])
    if act_type != FLOAT:
        out = tape.op("Cast", [out], {"to": act_type})
    return list(tape.nodes), [out, present_key, present_value]


# -- GroupQueryAttention fast path ---------------------------------------------------------------
# Measured by bench/attention_lowering.py: ORT's GQA kernel is 2.5-5x faster than the
# decomposition on CPU, but it rejects rows that continue a prefill in a batch (batch > 1,
# seq > 1, past > 0). By default the layer is the GQA node alone, as onnxruntime-genai's graphs
# have it, and the engine's manifest says so (`kv_cache.batched_continuation` false): the runtime
# runs such a call one row at a time (runtime/core/engine.py `Engine.step_with`). An `If` per
# layer that falls back to the decomposition keeps every call in one graph, at the cost of running
# each layer's attention as a subgraph: about 5-10% of an int8 decode step of the 125M bench model
# on 2 cores (docs/benchmarks.md#make-bench-quant). `lower_with_gqa(fallback=True)` builds that.

GQA_DTYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def gqa_supports(attrs: AttentionAttrs, dtype: ir.DataType) -> bool:
    """What ORT 1.31's CPU GroupQueryAttention kernel accepts (it rejects other head sizes at run time).
    It has no chunked mask, QK norm or query temperature, so Llama 4 layers use the decomposition.
    Nor an FP8 KV cache: the kernel rotates K and writes the cache in one call, so rotated K never
    exists as a tensor to quantize; with kv_cache_quant the decomposition (which has it) runs."""
    return (dtype in GQA_DTYPES and attrs.head_dim % 16 == 0 and not attrs.non_default_llama4_flags()
            and attrs.kv_cache_quant == "none")


def rope_cache(attrs: AttentionAttrs, max_positions: int, dtype: ir.DataType, which: str) -> ir.Value:
    """cos or sin of every position's angles [max_positions, head_dim / 2], computed at save time."""
    name = f"rope_{which}_cache_{attrs.head_dim}_{attrs.rope_theta:g}_{attrs.rope_scaling_type}_{dtype.name.lower()}"

    def compute() -> ir.Tensor:
        cos, sin = rope_cos_sin(torch.arange(max_positions), attrs)
        table = (cos if which == "cos" else sin).numpy()
        return ir.Tensor(table.astype(np.float16 if dtype == ir.DataType.FLOAT16 else np.float32), name=name)

    shape = ir.Shape([max_positions, attrs.head_dim // 2])
    tensor = ir.LazyTensor(compute, dtype=dtype, shape=shape, name=name)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=shape, const_value=tensor)


@dataclass(frozen=True)
class GqaCall:
    """What every layer's GQA node (and `If`, with the fallback) reads that is the same in all
    layers of a call: GQA's `seqlens_k` / `total_sequence_length`, and whether the kernel takes the
    call. They depend only on the call's shapes and `past_lengths`, so they are computed once per
    graph: per layer they were 11 small ops, about 130 op launches in a 12-layer decode step that
    genai's graph does not have."""

    use_gqa: ir.Value | None  # BOOL scalar: decode, or a single row, or a fresh prefill (the fallback's If)
    seqlens_k: ir.Value  # INT32 [B]: past + new - 1 (GQA's convention)
    total: ir.Value  # INT32 scalar: the longest row's past + new


def gqa_call(tape: ir.tape.Tape, query: ir.Value, past_lengths: ir.Value, fallback: bool) -> GqaCall:
    use_gqa = None
    if fallback:
        shape = tape.op("Shape", [query], {"start": 0, "end": 2})
        batch_seq_one = tape.op("Equal", [shape, _ints(tape, 1, 1)])  # [batch == 1, seq == 1]
        any_one = tape.op("ReduceMax", [tape.op("Cast", [batch_seq_one], {"to": ir.DataType.INT32})], {"keepdims": 0})
        fresh = tape.op("Equal", [tape.op("ReduceMax", [past_lengths], {"keepdims": 0}),
                                  _const(tape, np.array(0, np.int32), "zero32")])
        use_gqa = tape.op("Or", [tape.op("Cast", [any_one], {"to": ir.DataType.BOOL}), fresh])
    seq = tape.op("Cast", [tape.op("Shape", [query], {"start": 1, "end": 2})], {"to": ir.DataType.INT32})
    lengths = tape.op("Add", [past_lengths, seq])
    seqlens_k = tape.op("Sub", [lengths, _const(tape, np.array([1], np.int32), "one")])
    total = tape.op("ReduceMax", [lengths], {"keepdims": 0})
    return GqaCall(use_gqa, seqlens_k, total)


def packed_qkv_split(node: ir.Node, attrs: AttentionAttrs) -> ir.Node | None:
    """The Split that makes the op's query, key and value (in that order, last axis, [H*D, KVH*D,
    KVH*D]) out of one packed tensor (`fuse-qkv`'s MatMul) and feeds nothing else, or None."""
    split = node.inputs[0].producer() if node.inputs[0] is not None else None
    if split is None or (split.op_type, split.domain) != ("Split", "") or list(split.outputs) != list(node.inputs[:3]):
        return None
    if any({user for user, _ in v.uses()} != {node} for v in split.outputs) or len(split.inputs) != 2:
        return None
    packed, sizes = split.inputs
    rank = packed.shape.rank() if packed is not None and packed.shape is not None else None
    axis = split.attributes.get_int("axis", 0)
    sizes_tensor = ir.convenience.get_const_tensor(sizes) if sizes is not None else None
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    if axis != -1 and (rank is None or axis != rank - 1):  # the last axis (query is [B, S, H*D])
        return None
    if sizes_tensor is None or sizes_tensor.numpy().tolist() != [h * d, kvh * d, kvh * d]:
        return None
    return split


def _gqa(tape: ir.tape.Tape, node: ir.Node, attrs: AttentionAttrs, cos: ir.Value, sin: ir.Value, call: GqaCall,
         packed: ir.Value | None) -> list[ir.Value]:
    """GQA on the op's query, key and value, or on `packed` ([q | k | v] on the last axis, key and value
    left empty: the kernel splits it itself, as onnxruntime-genai's graphs feed it)."""
    query, key, value, past_key, past_value, _ = node.inputs
    if packed is not None:
        query, key, value = packed, None, None
    return list(tape.op_multi_out(
        "GroupQueryAttention", [query, key, value, past_key, past_value, call.seqlens_k, call.total, cos, sin],
        {"num_heads": attrs.num_heads, "kv_num_heads": attrs.num_kv_heads, "do_rotary": 1,
         "rotary_interleaved": attrs.rope_interleaved, "scale": attrs.scale},
        domain="com.microsoft", num_outputs=3,
    ))


def lower_with_gqa(node: ir.Node, attrs: AttentionAttrs, cos: ir.Value, sin: ir.Value,
                   call: GqaCall | None = None, fallback: bool = False) -> tuple[list[ir.Node], list[ir.Value], GqaCall]:
    """The GQA node, or with `fallback` `If(decode or single row or fresh prefill) then GQA else
    decomposition`. `call`: the values an earlier layer's lowering computed (returned, so the pass
    hands them on); None computes them here, in the main graph, where every later layer can read them.

    Where query, key and value are the three parts of one packed QKV projection, GQA reads the
    packed tensor: the Split goes (with the fallback, into the decomposition's branch), so a decode
    step runs no Split at all (one kernel launch per layer and step fewer)."""
    query, past_lengths = node.inputs[0], node.inputs[5]
    assert query is not None and past_lengths is not None
    split = packed_qkv_split(node, attrs)  # before `decompose`, whose nodes read query, key and value too
    packed = split.inputs[0] if split is not None else None
    tape = ir.tape.Tape()
    if call is None:  # from a value of the main graph: the packed tensor, when the Split leaves it
        call = gqa_call(tape, packed if packed is not None else query, past_lengths, fallback)
    elif fallback and call.use_gqa is None:
        raise ValueError(f"{node.name}: an earlier layer was lowered without the fallback, this one with it")
    if not fallback:
        if split is not None:
            graph = split.graph
            assert graph is not None
            graph.remove(split, safe=False)  # its outputs' only user, this op, is replaced by GQA next
        outputs = _gqa(tape, node, attrs, cos, sin, call, packed)
        for value, like in zip(outputs, node.outputs):
            value.type = like.type
        return list(tape.nodes), outputs, call
    dec_nodes, dec_outputs = decompose(node, attrs)
    if split is not None:
        graph = split.graph
        assert graph is not None
        graph.remove(split, safe=False)  # its outputs' only user, this op, is replaced by the If next
        dec_nodes = [split, *dec_nodes]
    else_branch = ir.Graph([], dec_outputs, nodes=dec_nodes, name=f"{node.name}_decomposed")
    branch_tape = ir.tape.Tape()
    then_branch = ir.Graph([], _gqa(branch_tape, node, attrs, cos, sin, call, packed), nodes=branch_tape.nodes,
                           name=f"{node.name}_gqa")
    assert call.use_gqa is not None
    outputs = list(tape.op_multi_out("If", [call.use_gqa], {"then_branch": then_branch, "else_branch": else_branch},
                                     num_outputs=3))
    # Branch outputs must declare their types for the checker; they mirror the op's own outputs.
    for branch in (then_branch, else_branch):
        for value, like in zip(branch.outputs, node.outputs):
            value.type = like.type
    return list(tape.nodes), list(outputs), call
