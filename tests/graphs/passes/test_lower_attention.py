"""`lower-attention-ort` (graphs/passes/lower_attention.py): every `llamaforge::LlamaAttention` node is
replaced by standard/ORT ops (GroupQueryAttention alone, or with the fallback an `If` between it and
the decomposition, or the decomposition alone), graph outputs keep their public names, and ONNX
Runtime computes what the reference computes. The decomposition's numerics are covered case by case
in tests/plugins; the runtime's row-by-row batched continuation in tests/build/test_build.py."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from attention_inputs import random_inputs
from small_graphs import op_counts, run_ort

from llamaforge.graphs.passes import lower_attention
from llamaforge.graphs.passes.lower_attention import MAX_POSITIONS_KEY, LowerAttentionForORT, node_attrs
from llamaforge.graphs.verify import verify
from llamaforge.plugins.attention import reference
from llamaforge.plugins.attention.schema import DOMAIN, OUTPUTS, AttentionAttrs, single_op_model

ATTRS = AttentionAttrs(num_heads=4, num_kv_heads=2, head_dim=16)  # a head size ORT's GQA kernel takes
SEQ = 5


def plugin_model(attrs: AttentionAttrs = ATTRS, max_positions: int | None = 64) -> ir.Model:
    model = ir.serde.deserialize_model(single_op_model(attrs))
    if max_positions is not None:
        model.metadata_props[MAX_POSITIONS_KEY] = str(max_positions)
    return model


def lower_and_check(model: ir.Model, use_gqa: bool, past: list[int], attrs: AttentionAttrs = ATTRS,
                    fallback: bool = True) -> None:
    """Run the pass and assert its promise: no plugin node or import left, com.microsoft imported
    exactly when GQA may be used, the outputs still named output/present_key/present_value, and
    the reference's output and (defined part of the) caches under ONNX Runtime."""
    assert LowerAttentionForORT(use_gqa=use_gqa, fallback=fallback)(model).modified
    verify(model, "lower-attention-ort")
    assert not any(domain == DOMAIN for domain, _ in op_counts(model)) and DOMAIN not in model.opset_imports
    assert ("com.microsoft" in model.opset_imports) == use_gqa
    assert [v.name for v in model.graph.outputs] == list(OUTPUTS)
    feeds = random_inputs(attrs, batch=len(past), seq=SEQ, capacity=16, past=past)
    got = run_ort(model, {k: v.numpy() for k, v in feeds.items()})
    want = reference.llama_attention(*feeds.values(), attrs)
    np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-5, atol=1e-5)
    for cache, expected in zip(got[1:], want[1:]):
        for b, length in enumerate(past):
            np.testing.assert_allclose(cache[b, :, : length + SEQ], expected[b, :, : length + SEQ].numpy(),
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("past", [[0, 0], [3], [0, 3]], ids=["fresh-prefill", "one-row-continued", "continued"])
def test_lowers_to_gqa_alone_which_refuses_only_a_batched_continuation(past: list[int]) -> None:
    """By default each layer is the GQA node, as onnxruntime-genai's graphs have it. ORT's kernel
    computes the reference for a fresh prefill and for one row continuing; a batch of rows continuing
    after a past is the call it refuses, which the runtime runs one row at a time."""
    model = plugin_model()
    if past == [0, 3]:
        LowerAttentionForORT()(model)
        feeds = random_inputs(ATTRS, batch=2, seq=SEQ, capacity=16, past=past)
        with pytest.raises(Exception, match="batch_size must be 1 when sequence_length > 1 and past context is given"):
            run_ort(model, {k: v.numpy() for k, v in feeds.items()})
    else:
        lower_and_check(model, use_gqa=True, past=past, fallback=False)
    counts = op_counts(model)
    assert counts[("com.microsoft", "GroupQueryAttention")] == 1 and counts[("", "If")] == 0


@pytest.mark.parametrize("past", [[0, 0], [0, 3]], ids=["fresh-prefill:gqa-branch", "continued:decomposed-branch"])
def test_the_fallback_lowers_to_an_if_between_gqa_and_the_decomposition(past: list[int]) -> None:
    model = plugin_model()
    lower_and_check(model, use_gqa=True, past=past)
    (branch,) = [n for n in model.graph if n.op_type == "If"]
    then_ops = {n.op_type for n in branch.attributes["then_branch"].as_graph()}
    assert "GroupQueryAttention" in then_ops
    tables = sorted(name for name in model.graph.initializers if name.startswith("rope_"))
    assert [t.split("_")[1] for t in tables] == ["cos", "sin"]
    assert model.graph.initializers[tables[0]].shape.numpy() == (64, ATTRS.head_dim // 2)  # max_positions rows


@pytest.mark.parametrize("attrs,max_positions,use_gqa", [
    (ATTRS, 64, False),
    (ATTRS, None, True),  # no max_positions: no size for GQA's RoPE tables
    (AttentionAttrs(num_heads=4, num_kv_heads=2, head_dim=8), 64, True),  # a head size GQA rejects
], ids=["use_gqa=False", "no-max-positions", "head_dim=8"])
def test_decomposes_alone_where_gqa_is_off_or_cannot_run(attrs: AttentionAttrs, max_positions: int | None,
                                                          use_gqa: bool) -> None:
    model = plugin_model(attrs, max_positions)
    lower_and_check(model, use_gqa=use_gqa, past=[0, 3], attrs=attrs)
    counts = op_counts(model)
    assert counts[("com.microsoft", "GroupQueryAttention")] == 0 and counts[("", "If")] == 0
    assert not any(name.startswith("rope_") for name in model.graph.initializers)


def test_a_graph_without_the_op_is_left_alone() -> None:
    model = plugin_model()
    LowerAttentionForORT()(model)
    before = op_counts(model)
    assert not LowerAttentionForORT()(model).modified
    assert op_counts(model) == before


def test_a_lowering_that_misreads_the_attributes_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """`lower_and_check` rejects a pass that lowers with another RoPE theta than the node's."""
    monkeypatch.setattr(lower_attention, "node_attrs", lambda node: AttentionAttrs(
        **{**vars(node_attrs(node)), "rope_theta": 500000.0}))
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        lower_and_check(plugin_model(), use_gqa=False, past=[0, 3])


def packed_model(attrs: AttentionAttrs = ATTRS) -> ir.Model:
    """The op fed by a Split of one packed [q | k | v] tensor, as `fuse-qkv` leaves a decoder layer."""
    import onnx

    proto = single_op_model(attrs)
    graph = proto.graph
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    split = [
        onnx.helper.make_node("Constant", [], ["qkv_sizes"], value=onnx.numpy_helper.from_array(
            np.array([h * d, kvh * d, kvh * d], np.int64), "qkv_sizes")),
        onnx.helper.make_node("Split", ["qkv", "qkv_sizes"], ["query", "key", "value"], axis=-1),
    ]
    nodes = split + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [i for i in graph.input if i.name not in ("query", "key", "value")]
    del graph.input[:]
    graph.input.extend([onnx.helper.make_tensor_value_info("qkv", onnx.TensorProto.FLOAT, ["b", "s", (h + 2 * kvh) * d]),
                        *kept])
    model = ir.serde.deserialize_model(proto)
    model.metadata_props[MAX_POSITIONS_KEY] = "64"
    return model


@pytest.mark.parametrize("seq,past,fallback", [(1, [2, 7], True), (5, [0, 0], True), (5, [3], True), (5, [0, 3], True),
                                                (1, [2, 7], False), (5, [0, 0], False), (5, [3], False)],
                         ids=["decode:gqa", "fresh-prefill:gqa", "one-row-continued:gqa", "continued:decomposed",
                              "decode:gqa-alone", "fresh-prefill:gqa-alone", "one-row-continued:gqa-alone"])
def test_a_packed_qkv_feeds_gqa_whole_and_its_split_runs_only_in_the_decomposition(seq: int, past: list[int],
                                                                                   fallback: bool) -> None:
    """GroupQueryAttention reads the packed tensor itself (key and value left empty), so a decode step
    runs no Split: it goes, or with the fallback moves into the decomposition's branch. Every lowering
    computes the reference's output and caches."""
    model = packed_model()
    assert LowerAttentionForORT(use_gqa=True, fallback=fallback)(model).modified
    verify(model, "lower-attention-ort")
    assert "Split" not in {n.op_type for n in model.graph}, "the Split left the main graph"
    if fallback:
        (branch,) = [n for n in model.graph if n.op_type == "If"]
        (gqa,) = list(branch.attributes["then_branch"].as_graph())
        assert "Split" in {n.op_type for n in branch.attributes["else_branch"].as_graph()}
    else:
        assert "If" not in {n.op_type for n in model.graph}
        (gqa,) = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert gqa.op_type == "GroupQueryAttention" and gqa.inputs[0] is model.graph.inputs[0]  # qkv itself
    assert gqa.inputs[1] is None and gqa.inputs[2] is None
    feeds = random_inputs(ATTRS, batch=len(past), seq=seq, capacity=16, past=past)
    packed = np.concatenate([feeds["query"].numpy(), feeds["key"].numpy(), feeds["value"].numpy()], axis=-1)
    got = run_ort(model, {"qkv": packed, **{k: v.numpy() for k, v in feeds.items() if k not in ("query", "key", "value")}})
    want = reference.llama_attention(*feeds.values(), ATTRS)
    np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-5, atol=1e-5)
    for cache, expected in zip(got[1:], want[1:]):
        for b, length in enumerate(past):
            np.testing.assert_allclose(cache[b, :, : length + seq], expected[b, :, : length + seq].numpy(), rtol=1e-5, atol=1e-5)


def test_a_split_of_other_sizes_stays_where_it_is() -> None:
    """Only the exact [H*D, KVH*D, KVH*D] split is taken over: GQA would read another one wrongly."""
    model = packed_model()
    sizes = next(n for n in model.graph if n.op_type == "Constant")
    sizes.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.array([32, 64, 32], np.int64)))
    LowerAttentionForORT(use_gqa=True)(model)
    assert "Split" in {n.op_type for n in model.graph}
    (gqa,) = [n for n in model.graph if n.op_type == "GroupQueryAttention"]
    assert gqa.inputs[1] is not None
