"""`lower-moe-ort` (graphs/passes/lower_moe.py): every `llamaforge::MoE` node becomes a Loop over the
experts tokens were routed to (or, `dense=True`, every expert on every token), reading the router
through a lazily transposed `<router>.T`; the output keeps its name and ONNX Runtime computes what
the reference computes. Other ops of the plugin domain, and its import, are left in place."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from small_graphs import op_counts, run_ort, small_model

from llamaforge.graphs.passes import lower_moe
from llamaforge.graphs.passes.lower_moe import LowerMoEForORT
from llamaforge.graphs.verify import verify
from llamaforge.plugins.attention.schema import OP_TYPE as ATTENTION
from llamaforge.plugins.attention.schema import AttentionAttrs
from llamaforge.plugins.moe import reference
from llamaforge.plugins.moe.schema import DOMAIN, OP_TYPE, MoEAttrs

FLOAT, INT32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
HIDDEN, INTER = 8, 6
ATTRS = MoEAttrs(num_experts=4, top_k=2)
PREFIX = "model.layers.0.feed_forward"
ROUTER = f"{PREFIX}.router.weight"


def expert_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    e = ATTRS.num_experts
    return {ROUTER: rng.standard_normal((e, HIDDEN)).astype(np.float32),
            f"{PREFIX}.experts.gate_up_proj": (0.3 * rng.standard_normal((e, HIDDEN, 2 * INTER))).astype(np.float32),
            f"{PREFIX}.experts.down_proj": (0.3 * rng.standard_normal((e, INTER, HIDDEN))).astype(np.float32)}


def moe_model(with_attention: bool = False) -> ir.Model:
    """hidden [batch, seq, HIDDEN] -> MoE (weights are initializers, as in a built engine) -> output;
    `with_attention` adds an attention op of the same plugin domain beside it."""
    weights = expert_weights()
    nodes = [onnx.helper.make_node(OP_TYPE, ["hidden", *weights], ["output"], domain=DOMAIN, name="moe",
                                   **ATTRS.onnx_attributes())]
    inputs = {"hidden": (FLOAT, ["batch", "seq", HIDDEN])}
    outputs = {"output": (FLOAT, ["batch", "seq", HIDDEN])}
    if with_attention:
        attrs = AttentionAttrs(num_heads=2, num_kv_heads=1, head_dim=4)
        cache = ["batch", 1, "capacity", 4]
        nodes.append(onnx.helper.make_node(ATTENTION, ["hidden", "kv", "kv", "past", "past", "lengths"],
                                           ["attn", "present_key", "present_value"], domain=DOMAIN, name="attention",
                                           **attrs.onnx_attributes()))
        inputs |= {"kv": (FLOAT, ["batch", "seq", 4]), "past": (FLOAT, cache), "lengths": (INT32, ["batch"])}
        outputs |= {"attn": (FLOAT, ["batch", "seq", HIDDEN]), "present_key": (FLOAT, cache),
                    "present_value": (FLOAT, cache)}
    return small_model(nodes, inputs, outputs, weights, {DOMAIN: 1})


def lower_and_check(dense: bool) -> ir.Model:
    """Run the pass on `moe_model()` and assert its promise: no MoE node or plugin import left, the
    router read as `<router>.T` [hidden, experts], the output still named `output`, and the
    reference's result under ONNX Runtime for tokens spread over several experts."""
    model = moe_model()
    assert LowerMoEForORT(dense=dense)(model).modified
    verify(model, "lower-moe-ort")
    assert op_counts(model)[(DOMAIN, OP_TYPE)] == 0 and DOMAIN not in model.opset_imports
    router_t = model.graph.initializers[f"{ROUTER}.T"]
    assert isinstance(router_t.const_value, ir.LazyTensor) and router_t.shape.numpy() == (HIDDEN, ATTRS.num_experts)
    assert [v.name for v in model.graph.outputs] == ["output"]
    hidden = np.random.default_rng(1).standard_normal((2, 5, HIDDEN)).astype(np.float32)
    (got,) = run_ort(model, {"hidden": hidden})
    want = reference.moe(torch.from_numpy(hidden), *(torch.from_numpy(w) for w in expert_weights().values()), ATTRS)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    return model


def test_lowers_to_a_loop_over_the_routed_experts() -> None:
    model = lower_and_check(dense=False)
    counts = op_counts(model)
    assert counts[("", "Loop")] == 1
    (loop,) = [n for n in model.graph if n.op_type == "Loop"]
    body = loop.attributes["body"].as_graph()
    gathers = [n for n in body if n.op_type == "Gather" and n.inputs[0].name.startswith(f"{PREFIX}.experts.")]
    assert len(gathers) == 2  # each expert weight read one expert at a time


def test_dense_lowering_runs_every_expert_without_a_loop() -> None:
    model = lower_and_check(dense=True)
    assert op_counts(model)[("", "Loop")] == 0


def test_other_plugin_ops_and_the_domain_import_stay() -> None:
    model = moe_model(with_attention=True)
    assert LowerMoEForORT()(model).modified
    counts = op_counts(model)
    assert counts[(DOMAIN, OP_TYPE)] == 0 and counts[(DOMAIN, ATTENTION)] == 1
    assert DOMAIN in model.opset_imports  # the attention op still needs it
    verify(model, "lower-moe-ort")


def test_a_lowering_with_the_router_untransposed_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """`lower_and_check` rejects a pass whose `<router>.T` holds the router as stored; HIDDEN is
    twice the expert count, so the reshape keeps the shape and only the routing is wrong."""
    original = lower_moe.lazy_weight
    monkeypatch.setattr(lower_moe, "lazy_weight", lambda name, sources, fn, dtype, shape:
                        original(name, sources, lambda w: w.reshape(w.shape[::-1]), dtype, shape))
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        lower_and_check(dense=False)
