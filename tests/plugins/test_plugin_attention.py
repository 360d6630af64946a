"""The attention plugin op: schema, shape inference, and the ORT lowering against the reference."""

from __future__ import annotations

import inspect
from dataclasses import fields

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from attention_inputs import random_inputs

from llamaforge.graphs.passes.lower_attention import LowerAttentionForORT
from llamaforge.plugins.attention import reference
from llamaforge.plugins.attention.schema import DOMAIN, INPUTS, AttentionAttrs, register_schema, single_op_model
from llamaforge.plugins.attention.torch_op import TRANSLATION_TABLE, attention

register_schema()
T = onnx.TensorProto


def lowered_session(attrs: AttentionAttrs, elem: int = T.FLOAT) -> ort.InferenceSession:
    """The op lowered with the fallback: the op's whole contract in one graph (rows of different
    lengths continuing together included), which the tests here check case by case. The default
    lowering leaves that one call to the runtime (tests/graphs/passes/test_lower_attention.py)."""
    model = ir.serde.deserialize_model(single_op_model(attrs, elem))
    model.metadata_props["llamaforge.max_positions"] = "64"
    LowerAttentionForORT(fallback=True)(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert all(n.domain != DOMAIN for n in proto.graph.node)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def assert_cache_close(got: np.ndarray, want: torch.Tensor, past: list[int], seq: int, **tol: float) -> None:
    """Compare caches where the contract defines them: below past_lengths[b] + seq (clipped to capacity)."""
    for b, p in enumerate(past):
        n = min(p + seq, got.shape[2])
        np.testing.assert_allclose(got[b, :, :n], want[b, :, :n].numpy(), **tol)


def run_both(attrs: AttentionAttrs, feeds: dict[str, torch.Tensor], elem: int = T.FLOAT) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    session = lowered_session(attrs, elem)
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    want = reference.llama_attention(*feeds.values(), attrs)
    return got, list(want)


CASES = [
    pytest.param(AttentionAttrs(4, 4, 16), id="mha"),
    pytest.param(AttentionAttrs(8, 2, 16), id="gqa4"),
    pytest.param(AttentionAttrs(8, 1, 32, rope_theta=1e6), id="mqa-theta1e6"),
    pytest.param(AttentionAttrs(4, 2, 16, rope_theta=500000.0, rope_scaling_type="llama3", rope_scaling_factor=8.0,
                                rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_positions=16), id="llama3-scaling"),
    pytest.param(AttentionAttrs(4, 2, 16, rope_interleaved=1), id="interleaved"),
]


@pytest.mark.parametrize("attrs", CASES)
def test_lowering_matches_reference_mixed_rows(attrs: AttentionAttrs) -> None:
    # Rows at different cache positions in one call, including one whose new tokens overflow capacity.
    feeds = random_inputs(attrs, batch=3, seq=5, capacity=24, past=[0, 7, 21])
    got, want = run_both(attrs, feeds)
    out_valid = [5, 5, 3]  # row 2 has room for 3 of its 5 tokens
    for b, n in enumerate(out_valid):
        np.testing.assert_allclose(got[0][b, :n], want[0][b, :n].numpy(), atol=1e-5, rtol=1e-5)
    assert_cache_close(got[1], want[1], [0, 7, 21], 5, atol=1e-5, rtol=1e-5)
    assert_cache_close(got[2], want[2], [0, 7, 21], 5, atol=0, rtol=0)  # values are copied, never computed


@pytest.mark.parametrize("attrs", CASES[:2])
def test_lowering_decode_step(attrs: AttentionAttrs) -> None:
    feeds = random_inputs(attrs, batch=4, seq=1, capacity=40, past=[0, 1, 17, 39], seed=3)
    got, want = run_both(attrs, feeds)
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-5, rtol=1e-5)
    for i in (1, 2):
        assert_cache_close(got[i], want[i], [0, 1, 17, 39], 1, atol=1e-5, rtol=1e-5)


def test_cache_prefix_untouched() -> None:
    attrs = AttentionAttrs(4, 2, 8)
    feeds = random_inputs(attrs, batch=2, seq=3, capacity=10, past=[2, 5])
    got, _ = run_both(attrs, feeds)
    past_key = feeds["past_key"].numpy()
    np.testing.assert_array_equal(got[1][0, :, :2], past_key[0, :, :2])
    np.testing.assert_array_equal(got[1][1, :, :5], past_key[1, :, :5])
    assert not np.array_equal(got[1][1, :, 5:8], past_key[1, :, 5:8])


def test_reference_attends_causally_over_cache() -> None:
    # Changing a cached key after a query's position must not change that query's output.
    attrs = AttentionAttrs(2, 1, 8)
    feeds = random_inputs(attrs, batch=1, seq=1, capacity=12, past=[4])
    out1, *_ = reference.llama_attention(*feeds.values(), attrs)
    feeds["past_key"][0, :, 6:] += 100.0
    out2, *_ = reference.llama_attention(*feeds.values(), attrs)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    feeds["past_key"][0, :, 2] += 1.0
    out3, *_ = reference.llama_attention(*feeds.values(), attrs)
    assert not torch.equal(out1, out3)


def test_shape_inference_and_checker() -> None:
    model = onnx.shape_inference.infer_shapes(single_op_model(AttentionAttrs(8, 2, 16)), strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert outs["present_key"] == ["batch", 2, "capacity", 16]


def test_rejects_unknown_plugin_version() -> None:
    with pytest.raises(ValueError, match="plugin_version"):
        AttentionAttrs.from_onnx_attributes({"num_heads": 2, "num_kv_heads": 1, "head_dim": 8, "plugin_version": "9"})


def test_rejects_bad_head_grouping() -> None:
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        AttentionAttrs(6, 4, 8)


@pytest.mark.parametrize("batch,seq,past,branch", [
    (3, 1, [0, 5, 9], "gqa"),  # decode step
    (1, 4, [6], "gqa"),  # single row continuing
    (2, 4, [0, 0], "gqa"),  # fresh prefill
    (2, 4, [0, 6], "decomposed"),  # rows continuing a prefill: GQA cannot
])
def test_both_if_branches_match_reference(batch: int, seq: int, past: list[int], branch: str) -> None:
    attrs = AttentionAttrs(8, 2, 16, rope_theta=500000.0, rope_scaling_type="llama3", rope_scaling_factor=8.0,
                           rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_positions=8)
    feeds = random_inputs(attrs, batch=batch, seq=seq, capacity=16, past=past, seed=7)
    got, want = run_both(attrs, feeds)
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-5, rtol=1e-5)
    for i in (1, 2):
        assert_cache_close(got[i], want[i], past, seq, atol=1e-5, rtol=1e-5)
    # Which branch ran shows in the unspecified cache region: GQA zeroes it, the decomposition keeps past values.
    row = int(np.argmin(past))
    tail = got[1][row, :, past[row] + seq:]
    assert (np.all(tail == 0) if branch == "gqa" else np.array_equal(tail, feeds["past_key"][row, :, past[row] + seq:].numpy()))


# -- Llama 4 flags: NoPE, QK norm, query temperature, chunked attention -------------------------
LLAMA4_CASES = [
    pytest.param(AttentionAttrs(8, 2, 16, rope_interleaved=1, qk_norm=1, attn_chunk_size=4), id="rope-qknorm-chunked"),
    pytest.param(AttentionAttrs(8, 2, 16, rope_interleaved=1, attn_chunk_size=3), id="rope-chunked"),
    # floor 2 makes the temperature change every other position at these tiny lengths.
    pytest.param(AttentionAttrs(8, 2, 16, use_rope=0, temperature_tuning=1, temperature_floor=2.0, temperature_scale=0.5),
                 id="nope-temperature"),
    pytest.param(AttentionAttrs(4, 4, 16, use_rope=0, qk_norm=1, qk_norm_eps=1e-5), id="nope-qknorm"),
]


@pytest.mark.parametrize("attrs", LLAMA4_CASES)
@pytest.mark.parametrize("seq,past", [(5, [0, 7, 13]), (1, [0, 4, 19])])
def test_llama4_flags_lowering_matches_reference(attrs: AttentionAttrs, seq: int, past: list[int]) -> None:
    feeds = random_inputs(attrs, batch=3, seq=seq, capacity=24, past=past, seed=11)
    got, want = run_both(attrs, feeds)
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-5, rtol=1e-5)
    for i in (1, 2):
        assert_cache_close(got[i], want[i], past, seq, atol=1e-5, rtol=1e-5)


def test_llama4_flags_never_take_the_gqa_kernel() -> None:
    for param in LLAMA4_CASES:
        model = ir.serde.deserialize_model(single_op_model(param.values[0]))
        model.metadata_props["llamaforge.max_positions"] = "64"
        LowerAttentionForORT()(model)
        assert not any(n.op_type in ("If", "GroupQueryAttention") for n in model.graph), param.id


def test_chunked_attention_is_not_a_sliding_window() -> None:
    # The first token of a chunk sees only itself, however many tokens precede it.
    attrs = AttentionAttrs(2, 1, 8, attn_chunk_size=4)
    dense = AttentionAttrs(2, 1, 8)
    feeds = random_inputs(attrs, batch=1, seq=1, capacity=12, past=[8])  # position 8 starts chunk 2
    own, *_ = reference.llama_attention(*feeds.values(), attrs)
    full, *_ = reference.llama_attention(*feeds.values(), dense)
    v = feeds["value"].view(1, 1, 1, 8)  # softmax over one key returns its value
    torch.testing.assert_close(own.view(1, 2, 8), v.expand(1, 1, 2, 8).reshape(1, 2, 8))
    assert not torch.allclose(own, full)
    feeds["past_key"][0, :, :8] += 50.0  # earlier chunks are invisible
    again, *_ = reference.llama_attention(*feeds.values(), attrs)
    torch.testing.assert_close(own, again, rtol=0, atol=0)


def test_temperature_matches_llama4_formula() -> None:
    attrs = AttentionAttrs(2, 1, 8, use_rope=0, temperature_tuning=1, temperature_floor=8192.0, temperature_scale=0.1)
    positions = torch.tensor([[0, 8190, 8191, 3 * 8192 - 1]])
    got = reference.query_temperature(positions, attrs)
    want = torch.tensor([[1.0, 1.0, 1.0 + 0.1 * np.log(2.0), 1.0 + 0.1 * np.log(4.0)]])
    torch.testing.assert_close(got, want.float())


def test_triton_kernels_refuse_llama4_flags_by_name() -> None:
    tk = pytest.importorskip("llamaforge.plugins.attention.triton_kernels")
    for attrs, name in [(AttentionAttrs(2, 1, 16, use_rope=0), "use_rope=0"), (AttentionAttrs(2, 1, 16, qk_norm=1), "qk_norm=1"),
                        (AttentionAttrs(2, 1, 16, attn_chunk_size=8), "attn_chunk_size=8")]:
        feeds = random_inputs(attrs, batch=1, seq=2, capacity=4, past=[0])
        with pytest.raises(NotImplementedError, match=name):
            tk.prefill_attention(*feeds.values(), attrs)


def test_tensorrt_graph_check_names_llama4_flags() -> None:
    from llamaforge.graphs.trt_ops import tensorrt_problems

    model = ir.serde.deserialize_model(single_op_model(AttentionAttrs(8, 2, 16, attn_chunk_size=8, qk_norm=1)))
    problems = [p for p in tensorrt_problems(model) if "Llama 4" in p]
    assert len(problems) == 2 and "qk_norm=1" in problems[0] and "attn_chunk_size=8" in problems[1]
    dense = ir.serde.deserialize_model(single_op_model(AttentionAttrs(8, 2, 16)))
    assert not [p for p in tensorrt_problems(dense) if "Llama 4" in p]



def test_every_boundary_takes_the_attributes_in_field_order() -> None:
    """The custom op's schema and the ONNX translation's signature take every `AttentionAttrs` field,
    by name and type, in field order (they are generated from it); the ONNX node carries each one."""
    names = [f.name for f in fields(AttentionAttrs)]
    op = torch.ops.llamaforge.llama_attention.default
    arguments = op._schema.arguments
    assert [a.name for a in arguments] == [*INPUTS, *names]
    attrs = AttentionAttrs(8, 2, 16, rope_scaling_type="llama3", use_rope=0, kv_cache_quant="fp8", k_scale=0.5)
    torch_types = {"int": int, "float": float, "str": str}
    assert [torch_types[str(a.type)] for a in arguments[len(INPUTS):]] == [type(getattr(attrs, n)) for n in names]
    assert list(inspect.signature(TRANSLATION_TABLE[op]).parameters) == [*INPUTS, *names]
    node = single_op_model(attrs).graph.node[0]
    assert sorted(a.name for a in node.attribute) == sorted([*names, "plugin_version", "plugin_namespace"])


def test_eager_op_passes_every_attribute_to_the_reference() -> None:
    """`attention` (the custom op, as the exporter's model runs it eagerly) equals the reference for
    attributes away from their defaults: none is lost or reordered crossing the flat signature."""
    attrs = AttentionAttrs(4, 2, 16, rope_theta=500000.0, rope_interleaved=1, qk_norm=1, qk_norm_eps=1e-5,
                           attn_chunk_size=4, kv_cache_quant="fp8", k_scale=0.5, v_scale=0.25)
    inputs = list(random_inputs(attrs, batch=2, seq=5, capacity=12, past=[3, 0]).values())
    expected = reference.llama_attention(*inputs, attrs)
    for got, want in zip(attention(*inputs, attrs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
