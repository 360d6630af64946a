"""Lowering of `llamaforge::MoE` for ONNX Runtime, as standard ONNX ops.

`decompose` (what the build uses) computes only the experts that tokens were routed to:

    x [N, H] -> router logits [N, E] -> TopK -> expert ids [N, k], sigmoid scores [N, k]
    active = Unique(expert ids)                                   at most min(N * k, E) experts
    Loop over active experts e (accumulator acc [N, H], starts at 0):
        (token, slot) pairs routed to e = NonZero(ids == e)
        y = (silu(g) * u) @ Gather(down_proj, e)   with [g | u] = (x[token] * score) @ Gather(gate_up_proj, e)
        acc = ScatterND(acc, token, y, reduction=add)

so a decode step of one sequence reads k experts' weights whatever the number of experts, and a
prefill reads each used expert once and multiplies it with its own tokens only (memory: one expert
plus its tokens' activations per iteration). The expert weights stay plain [E, ...] initializers
of the main graph; inside the Loop body each is read by `Gather(axis=0, scalar expert id)` feeding
the B input of a `MatMul`. The router is an ordinary linear: a MatMul on the initializer
`...feed_forward.router.weight.T` [H, E], a name quantization passes recognise and skip.

`decompose_dense` is transformers' formulation (every expert runs every token, unrouted ones with a
zero score): the peer `bench/moe.py` measures against; compute and weight traffic grow with E.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from llamaforge.plugins.moe.schema import MoEAttrs

FLOAT = ir.DataType.FLOAT


def _const(tape: ir.tape.Tape, array: np.ndarray, name: str) -> ir.Value:
    return tape.op("Constant", [], {"value": ir.tensor(array, name=name)})


def _ints(tape: ir.tape.Tape, *values: int) -> ir.Value:
    return _const(tape, np.array(values, dtype=np.int64), "ints")


def _weight_dims(node: ir.Node) -> tuple[int, int]:
    """(hidden, intermediate) from the static shape of down_proj [E, I, H]."""
    down = node.inputs[3]
    dims = [d for d in down.shape.dims if isinstance(d, int)] if down is not None and down.shape is not None else []
    if len(dims) != 3:
        raise ValueError(f"{node.name}: MoE down_proj needs a static shape [experts, intermediate, hidden]")
    _, inter, hidden = dims
    return hidden, inter


def _route(tape: ir.tape.Tape, node: ir.Node, attrs: MoEAttrs, act: ir.DataType,
           router_t: ir.Value | None) -> tuple[ir.Value, ir.Value, ir.Value]:
    """x [N, H], expert ids [N, k] int64, scores [N, k] (activation dtype). `router_t` is the
    router weight transposed to [H, E] (an initializer the pass made), else it is transposed here."""
    hidden_in, router = node.inputs[0], node.inputs[1]
    assert hidden_in is not None and router is not None
    hidden, _ = _weight_dims(node)
    x = tape.op("Reshape", [hidden_in, _ints(tape, -1, hidden)])
    if router_t is None:
        router_t = tape.op("Transpose", [router], {"perm": [1, 0]})
    logits = tape.op("MatMul", [x, router_t])  # F.linear
    top, ids = tape.op_multi_out("TopK", [logits, _ints(tape, attrs.top_k)], {"axis": -1, "largest": 1, "sorted": 1},
                                 num_outputs=2)
    scores = tape.op("Sigmoid", [top if act == FLOAT else tape.op("Cast", [top], {"to": FLOAT})])
    if act != FLOAT:
        scores = tape.op("Cast", [scores], {"to": act})
    return x, ids, scores


def _swiglu(tape: ir.tape.Tape, gate_up: ir.Value) -> ir.Value:
    gate, up = tape.op_multi_out("Split", [gate_up], {"axis": -1, "num_outputs": 2}, num_outputs=2)
    return tape.op("Mul", [up, tape.op("Mul", [gate, tape.op("Sigmoid", [gate])])])


def _act_type(node: ir.Node) -> ir.DataType:
    dtype = node.outputs[0].dtype
    if dtype is None:
        raise ValueError(f"{node.name}: MoE output must declare its element type")
    return dtype


def decompose(node: ir.Node, attrs: MoEAttrs, router_t: ir.Value | None = None) -> tuple[list[ir.Node], list[ir.Value]]:
    """The active-experts Loop (see the module docstring); returns (nodes, [output])."""
    act = _act_type(node)
    gate_up_proj, down_proj = node.inputs[2], node.inputs[3]
    assert gate_up_proj is not None and down_proj is not None
    hidden, _ = _weight_dims(node)
    tape = ir.tape.Tape()
    x, ids, scores = _route(tape, node, attrs, act, router_t)
    active = tape.op_multi_out("Unique", [tape.op("Reshape", [ids, _ints(tape, -1)])], {"sorted": 1}, num_outputs=4)[0]
    trips = tape.op("Squeeze", [tape.op("Shape", [active]), _ints(tape, 0)])
    # The sum over experts accumulates in float32: ORT's CPU ScatterND has no float16 `add`.
    acc0 = tape.op("ConstantOfShape", [tape.op("Shape", [x])], {"value": ir.tensor(np.zeros(1, dtype=np.float32), name="zero")})

    body = ir.tape.Tape()
    step = ir.Value(name="step", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond = ir.Value(name="cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    acc = ir.Value(name="acc", type=ir.TensorType(FLOAT), shape=ir.Shape([None, hidden]))
    expert = body.op("Gather", [active, step], {"axis": 0})  # scalar id
    pairs = body.op("Transpose", [body.op("NonZero", [body.op("Equal", [ids, expert])])], {"perm": [1, 0]})  # [M, 2]
    tokens = body.op("Gather", [pairs, _ints(body, 0)], {"axis": 1})  # [M, 1]
    score = body.op("GatherND", [scores, pairs])  # [M]
    routed = body.op("Mul", [body.op("GatherND", [x, tokens]), body.op("Unsqueeze", [score, _ints(body, 1)])])  # [M, H]
    gate_up = body.op("MatMul", [routed, body.op("Gather", [gate_up_proj, expert], {"axis": 0})])  # [M, 2I]
    y = body.op("MatMul", [_swiglu(body, gate_up), body.op("Gather", [down_proj, expert], {"axis": 0})])  # [M, H]
    if act != FLOAT:
        y = body.op("Cast", [y], {"to": FLOAT})
    acc_out = body.op("ScatterND", [acc, tokens, y], {"reduction": "add"})
    cond_out = body.op("Identity", [cond])
    acc_out.type, cond_out.type = acc.type, cond.type
    graph = ir.Graph([step, cond, acc], [cond_out, acc_out], nodes=body.nodes, name=f"{node.name}_experts")

    (routed_sum,) = tape.op_multi_out("Loop", [trips, None, acc0], {"body": graph}, num_outputs=1)
    if act != FLOAT:
        routed_sum = tape.op("Cast", [routed_sum], {"to": act})
    out = tape.op("Reshape", [routed_sum, tape.op("Shape", [node.inputs[0]])])
    return list(tape.nodes), [out]


def decompose_dense(node: ir.Node, attrs: MoEAttrs, router_t: ir.Value | None = None) -> tuple[list[ir.Node], list[ir.Value]]:
    """transformers' formulation: all E experts on all N tokens, unrouted scores 0."""
    act = _act_type(node)
    gate_up_proj, down_proj = node.inputs[2], node.inputs[3]
    assert gate_up_proj is not None and down_proj is not None
    tape = ir.tape.Tape()
    x, ids, scores = _route(tape, node, attrs, act, router_t)
    tokens = tape.op("Shape", [x], {"start": 0, "end": 1})
    zeros = tape.op("ConstantOfShape", [tape.op("Concat", [tokens, _ints(tape, attrs.num_experts)], {"axis": 0})],
                    {"value": ir.tensor(np.zeros(1, act.numpy()), name="zero")})
    dense = tape.op("ScatterElements", [zeros, ids, scores], {"axis": 1})  # [N, E], 0 where not routed
    routed = tape.op("Mul", [tape.op("Unsqueeze", [x, _ints(tape, 0)]),
                             tape.op("Unsqueeze", [tape.op("Transpose", [dense], {"perm": [1, 0]}), _ints(tape, 2)])])  # [E, N, H]
    y = tape.op("MatMul", [_swiglu(tape, tape.op("MatMul", [routed, gate_up_proj])), down_proj])  # [E, N, H]
    out = tape.op("Reshape", [tape.op("ReduceSum", [y, _ints(tape, 0)], {"keepdims": 0}), tape.op("Shape", [node.inputs[0]])])
    return list(tape.nodes), [out]
