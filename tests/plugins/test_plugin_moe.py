"""The MoE plugin op: reference against transformers' Llama4TextMoe, ORT lowerings against the reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from llamaforge.graphs.passes.lower_moe import LowerMoEForORT
from llamaforge.plugins.moe import reference
from llamaforge.plugins.moe.schema import DOMAIN, MoEAttrs, single_op_model

HIDDEN, INTER = 32, 24


def hf_moe(experts: int, top_k: int, seed: int = 0) -> torch.nn.Module:
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    config = Llama4TextConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_local_experts=experts,
                              num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=2, head_dim=16)
    moe = Llama4TextMoe(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return moe


def weights(moe: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return moe.router.weight.detach(), moe.experts.gate_up_proj.detach(), moe.experts.down_proj.detach()


@pytest.mark.parametrize("experts,top_k", [(4, 1), (8, 2), (16, 1)])
def test_reference_matches_transformers(experts: int, top_k: int) -> None:
    moe = hf_moe(experts, top_k)
    x = torch.randn(3, 7, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, _ = moe(x)
        routed = reference.moe(x, *weights(moe), MoEAttrs(experts, top_k))
        got = routed + moe.shared_expert(x).view_as(routed)
    torch.testing.assert_close(got.reshape(want.shape), want, atol=1e-6, rtol=1e-5)


def test_score_scales_the_expert_input_not_its_output() -> None:
    # SwiGLU is not linear: scaling the input by s differs from scaling the output by s.
    moe = hf_moe(4, 1)
    router, gate_up, down = weights(moe)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(2))
    attrs = MoEAttrs(4, 1)
    ids, scores = reference.route(x, router, attrs)
    out_scaled = torch.stack([
        s * (lambda gu: (gu[INTER:] * torch.nn.functional.silu(gu[:INTER])) @ down[e])(x[n] @ gate_up[e])
        for n, (e, s) in enumerate(zip(ids[:, 0].tolist(), scores[:, 0]))])
    assert not torch.allclose(reference.moe(x, router, gate_up, down, attrs), out_scaled, atol=1e-4)


def session(attrs: MoEAttrs, dense: bool = False, elem: int = onnx.TensorProto.FLOAT) -> ort.InferenceSession:
    model = ir.serde.deserialize_model(single_op_model(attrs, HIDDEN, INTER, elem))
    # The weights are initializers in a built model (static shapes); here graph inputs with static dims.
    LowerMoEForORT(dense=dense)(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert all(n.domain != DOMAIN for n in proto.graph.node)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("dense", [False, True], ids=["active-loop", "dense"])
@pytest.mark.parametrize("experts,top_k,batch,seq", [(4, 1, 1, 1), (8, 2, 3, 5), (16, 1, 4, 1), (8, 3, 2, 9)])
def test_lowering_matches_reference(dense: bool, experts: int, top_k: int, batch: int, seq: int) -> None:
    moe = hf_moe(experts, top_k, seed=3)
    attrs = MoEAttrs(experts, top_k)
    x = torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(4))
    feeds = dict(zip(["hidden", "router_weight", "gate_up_proj", "down_proj"], (x, *weights(moe))))
    (got,) = session(attrs, dense).run(None, {k: v.numpy() for k, v in feeds.items()})
    want = reference.moe(*feeds.values(), attrs)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)


def test_float16_lowering_runs_on_cpu_and_matches_reference() -> None:
    # ORT's CPU ScatterND has no float16 `add`: the Loop accumulates in float32.
    moe = hf_moe(8, 2, seed=5)
    attrs = MoEAttrs(8, 2)
    x = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(6))
    feeds = {k: v.half() for k, v in zip(["hidden", "router_weight", "gate_up_proj", "down_proj"], (x, *weights(moe)))}
    (got,) = session(attrs, elem=onnx.TensorProto.FLOAT16).run(None, {k: v.numpy() for k, v in feeds.items()})
    want = reference.moe(*(v.float() for v in feeds.values()), attrs)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.numpy(), atol=2e-3, rtol=1e-2)


def test_rejects_bad_top_k() -> None:
    with pytest.raises(ValueError, match="top_k"):
        MoEAttrs(4, 5)


def test_expert_weights_are_initializers_read_per_expert_by_gather_matmul(tmp_path) -> None:
    """The shape weight-quantization passes rely on: in a built engine every expert tensor is a
    main-graph initializer, read inside the MoE Loop by Gather(axis 0, one expert id) whose result is
    the B input of a MatMul."""
    from tiny_models import tiny_llama4_config

    from llamaforge.export.exporter import bind_placeholder_weights, trace
    from llamaforge.graphs.pipeline import PIPELINES, run_pipeline

    config = tiny_llama4_config(num_layers=2, interleave_moe_layer_step=2)
    model = trace(config)
    bind_placeholder_weights(model, tmp_path / "weights.data")  # as WEIGHTS=none does: no data, right sizes
    run_pipeline(model, PIPELINES["ort"], log=lambda _: None)
    loops = [n for n in model.graph if n.op_type == "Loop"]
    assert len(loops) == 1  # layer 1 only
    body = loops[0].attributes["body"].value
    inits = model.graph.initializers
    for suffix, shape in [("gate_up_proj", (4, 64, 64)), ("down_proj", (4, 32, 64))]:
        weight = inits[f"model.layers.1.feed_forward.experts.{suffix}"]
        assert tuple(weight.shape.numpy()) == shape
        (gather, _), = [(u.node, u.idx) for u in weight.uses()]
        assert gather.op_type == "Gather" and gather.graph is body and gather.attributes.get_int("axis") == 0
        consumers = [(u.node.op_type, u.idx) for u in gather.outputs[0].uses()]
        assert consumers == [("MatMul", 1)]
    # The router is a plain linear named like the checkpoint's module, so quantization can skip it.
    assert "model.layers.1.feed_forward.router.weight" not in inits  # only its transpose remains
    router = inits["model.layers.1.feed_forward.router.weight.T"]
    assert tuple(router.shape.numpy()) == (64, 4)
    assert [(u.node.op_type, u.idx, u.node.graph) for u in router.uses()] == [("MatMul", 1, model.graph)]
