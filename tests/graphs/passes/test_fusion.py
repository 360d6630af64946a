"""`fuse-rmsnorm` and `fuse-qkv` (graphs/passes/fusion.py): the RMSNorm pattern (with the residual
Add feeding it) becomes one normalisation node, and the three projections feeding an attention op
become one MatMul on a packed weight + Split; outputs stay the same, near misses stay unfused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from small_graphs import copy_model, op_counts, run_ort, small_model

from llamaforge.graphs.passes import fusion
from llamaforge.graphs.passes.fusion import FuseQKV, FuseRMSNorm
from llamaforge.graphs.passes.lower_attention import LowerAttentionForORT
from llamaforge.graphs.verify import verify
from llamaforge.plugins.attention.schema import DOMAIN, INPUTS, OP_TYPE, OUTPUTS, AttentionAttrs

FLOAT, INT32 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32
make_node = onnx.helper.make_node
HIDDEN, EPS = 8, 1e-5
UNFUSED_NORM_OPS = {("", "Pow"), ("", "ReduceMean"), ("", "Sqrt"), ("", "Reciprocal")}


# -- fuse-rmsnorm ---------------------------------------------------------------------------------


def rmsnorm_model(residual: bool = False, axis: int = -1, power: float = 2.0) -> ir.Model:
    """[residual Add ->] x * 1/sqrt(mean(x^pow, axis) + eps) * w -> MatMul, as the exporter traces a
    LLaMA RMSNorm feeding a projection. With `residual`, the Add's sum is also an output (the residual
    stream the next block reads)."""
    rng = np.random.default_rng(0)
    nodes = [make_node("Add", ["a", "b"], ["x"])] if residual else []
    nodes += [
        make_node("Pow", ["x", "power"], ["squared"]),
        make_node("ReduceMean", ["squared", "axes"], ["mean"], keepdims=1, noop_with_empty_axes=0),
        make_node("Add", ["mean", "eps"], ["mean_eps"]),
        make_node("Sqrt", ["mean_eps"], ["rms"]),
        make_node("Reciprocal", ["rms"], ["inv_rms"]),
        make_node("Mul", ["x", "inv_rms"], ["normalized"]),
        make_node("Mul", ["gamma", "normalized"], ["normed"]),
        make_node("MatMul", ["normed", "proj"], ["y"]),
    ]
    inputs = {"a": (FLOAT, ["batch", "seq", HIDDEN]), "b": (FLOAT, ["batch", "seq", HIDDEN])} if residual else \
        {"x": (FLOAT, ["batch", "seq", HIDDEN])}
    outputs = {"y": (FLOAT, ["batch", "seq", HIDDEN])} | ({"x": (FLOAT, ["batch", "seq", HIDDEN])} if residual else {})
    return small_model(nodes, inputs, outputs, {
        "power": np.array(power, np.float32), "axes": np.array([axis], np.int64), "eps": np.array(EPS, np.float32),
        "gamma": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
        "proj": rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32)})


def norm_feeds(model: ir.Model) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {v.name: rng.standard_normal((2, 3, HIDDEN)).astype(np.float32) for v in model.graph.inputs}


def test_rmsnorm_fuses_to_the_standard_op_with_the_same_outputs() -> None:
    model = rmsnorm_model()
    feeds = norm_feeds(model)
    want = run_ort(model, feeds)
    assert FuseRMSNorm()(model).modified
    verify(model, "fuse-rmsnorm")
    (norm,) = [n for n in model.graph if n.op_type == "RMSNormalization"]
    assert norm.domain == "" and norm.inputs[1] is model.graph.initializers["gamma"]
    assert norm.attributes.get_float("epsilon") == pytest.approx(EPS) and norm.attributes.get_int("stash_type") == 1
    assert not UNFUSED_NORM_OPS & set(op_counts(model)) and ("", "SimplifiedLayerNormalization") not in op_counts(model)
    for got, expected in zip(run_ort(model, feeds), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_residual_add_fuses_into_skip_simplified_layer_norm() -> None:
    model = rmsnorm_model(residual=True)
    feeds = norm_feeds(model)
    want = run_ort(model, feeds)
    assert FuseRMSNorm()(model).modified
    verify(model, "fuse-rmsnorm")
    counts = op_counts(model)
    assert counts[("com.microsoft", "SkipSimplifiedLayerNormalization")] == 1
    assert counts[("", "Add")] == 0 and not UNFUSED_NORM_OPS & set(counts)
    for got, expected in zip(run_ort(model, feeds), want):  # the normalised output and the residual sum
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("near_miss", [dict(axis=1), dict(power=3.0)], ids=["mean-over-seq", "cube"])
def test_near_miss_norms_are_not_fused(near_miss: dict) -> None:
    """A mean over another axis, or of x^3, is not an RMSNorm: fusing it would change the outputs."""
    model = rmsnorm_model(**near_miss)
    before = op_counts(model)
    assert not FuseRMSNorm()(model).modified
    assert op_counts(model) == before


# -- fuse-qkv ---------------------------------------------------------------------------------------

ATTRS = AttentionAttrs(num_heads=2, num_kv_heads=1, head_dim=4)
WIDTHS = {"q": ATTRS.num_heads * ATTRS.head_dim, "k": ATTRS.num_kv_heads * ATTRS.head_dim,
          "v": ATTRS.num_kv_heads * ATTRS.head_dim}
PREFIX = "model.layers.0.self_attn"


def attention_model(k_input: str = "x", v_weight_is_input: bool = False) -> ir.Model:
    """x -> q/k/v projections (x @ W.T initializers, as after fold-weight-transposes) -> the attention
    op. `k_input="x2"` makes k read another tensor; `v_weight_is_input` makes v's weight a graph input."""
    rng = np.random.default_rng(2)
    weights = {f"{PREFIX}.{p}_proj.weight.T": rng.standard_normal((HIDDEN, w)).astype(np.float32)
               for p, w in WIDTHS.items()}
    nodes = [make_node("MatMul", [k_input if p == "k" else "x", f"{PREFIX}.{p}_proj.weight.T"], [p]) for p in WIDTHS]
    nodes.append(make_node(OP_TYPE, ["q", "k", "v", *INPUTS[3:]], list(OUTPUTS), domain=DOMAIN, name="attn",
                           **ATTRS.onnx_attributes()))
    cache = ["batch", ATTRS.num_kv_heads, "capacity", ATTRS.head_dim]
    inputs = {"x": (FLOAT, ["batch", "seq", HIDDEN])} | ({"x2": (FLOAT, ["batch", "seq", HIDDEN])} if k_input == "x2" else {})
    if v_weight_is_input:
        inputs[f"{PREFIX}.v_proj.weight.T"] = (FLOAT, [HIDDEN, WIDTHS["v"]])
        del weights[f"{PREFIX}.v_proj.weight.T"]
    inputs |= {"past_key": (FLOAT, cache), "past_value": (FLOAT, cache), "past_lengths": (INT32, ["batch"])}
    outputs = {"output": (FLOAT, ["batch", "seq", WIDTHS["q"]]), "present_key": (FLOAT, cache), "present_value": (FLOAT, cache)}
    return small_model(nodes, inputs, outputs, weights, {DOMAIN: 1})


def lowered_outputs(model: ir.Model) -> list[np.ndarray]:
    """ONNX Runtime's outputs of the model with its attention op lowered to standard ops (on a copy)."""
    lowered = copy_model(model)
    LowerAttentionForORT(use_gqa=False)(lowered)
    rng = np.random.default_rng(3)
    batch, seq, capacity = 2, 3, 8
    cache = (batch, ATTRS.num_kv_heads, capacity, ATTRS.head_dim)
    return run_ort(lowered, {"x": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32),
                             "past_key": rng.standard_normal(cache).astype(np.float32),
                             "past_value": rng.standard_normal(cache).astype(np.float32),
                             "past_lengths": np.array([0, 2], np.int32)})


def fuse_qkv_and_check() -> None:
    """Run `fuse-qkv` on `attention_model()` and assert its promise: one MatMul on the packed lazy
    [hidden, q + k + v] weight `...qkv_proj.weight.T`, a Split into the three widths feeding the
    attention op's first three inputs, and the same outputs."""
    model = attention_model()
    want = lowered_outputs(model)
    assert FuseQKV()(model).modified
    verify(model, "fuse-qkv")
    (matmul,) = [n for n in model.graph if n.op_type == "MatMul"]
    packed = matmul.inputs[1]
    assert packed is model.graph.initializers[f"{PREFIX}.qkv_proj.weight.T"]
    assert isinstance(packed.const_value, ir.LazyTensor) and packed.shape.numpy() == (HIDDEN, sum(WIDTHS.values()))
    (split,) = [n for n in model.graph if n.op_type == "Split"]
    assert split.inputs[0] is matmul.outputs[0]
    assert list(split.inputs[1].producer().attributes["value"].as_tensor().numpy()) == list(WIDTHS.values())
    (attention,) = [n for n in model.graph if n.op_type == OP_TYPE]
    assert list(attention.inputs[:3]) == list(split.outputs)
    for got, expected in zip(lowered_outputs(model), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_qkv_projections_pack_into_one_matmul_with_the_same_outputs() -> None:
    fuse_qkv_and_check()


@pytest.mark.parametrize("near_miss", [dict(k_input="x2"), dict(v_weight_is_input=True)],
                         ids=["k-reads-another-input", "v-weight-not-constant"])
def test_projections_of_different_inputs_or_non_constant_weights_are_not_packed(near_miss: dict) -> None:
    model = attention_model(**near_miss)
    before = op_counts(model)
    assert not FuseQKV()(model).modified
    assert op_counts(model) == before


def test_a_packing_in_the_wrong_order_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fuse_qkv_and_check` rejects a pass that packs [k, q, v] but splits as [q, k, v]: the packed
    weight keeps its shape, so only the numbers are wrong."""
    original = fusion.lazy_weight
    monkeypatch.setattr(fusion, "lazy_weight", lambda name, sources, fn, dtype, shape:
                        original(name, sources, lambda q, k, v: fn(k, q, v), dtype, shape))
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        fuse_qkv_and_check()


def test_the_traced_tiny_model_fuses_every_norm_and_projection(tmp_path: Path) -> None:
    """The patterns the exporter really emits (tiny LLaMA, 2 layers): 2 * layers + 1 norms fused
    (the ones after a residual Add into SkipSimplifiedLayerNormalization), one packed QKV per layer."""
    from tiny_models import tiny_config

    from llamaforge.export.exporter import bind_placeholder_weights, trace
    from llamaforge.graphs.passes.cleanup import Clean
    from llamaforge.graphs.passes.weights import FoldWeightTransposes

    config = tiny_config()
    model = trace(config)
    bind_placeholder_weights(model, tmp_path / "weights.data")
    for fold in (FoldWeightTransposes(), Clean(), FuseQKV(), FuseRMSNorm()):
        fold(model)
    verify(model, "fusions")
    counts = op_counts(model)
    assert not UNFUSED_NORM_OPS & set(counts)
    norms = counts[("", "RMSNormalization")] + counts[("com.microsoft", "SkipSimplifiedLayerNormalization")]
    assert norms == 2 * config.num_layers + 1 and counts[("com.microsoft", "SkipSimplifiedLayerNormalization")] > 0
    assert counts[("", "Split")] == config.num_layers
    packed = [name for name in model.graph.initializers if ".qkv_proj." in name]
    assert len(packed) == config.num_layers
    assert not any(n.op_type == "MatMul" and ".q_proj." in (n.inputs[1].name or "") for n in model.graph)
