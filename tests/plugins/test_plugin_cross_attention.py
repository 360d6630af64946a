"""`llamaforge::CrossAttention`: the reference against transformers' cross-attention arithmetic
(`_prepare_cross_attention_mask` + `eager_attention_forward`), and the ONNX Runtime lowering against
the reference: prefill (the cache filled), decode (no new keys), a text-only sequence (empty cache)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from llamaforge.graphs.passes.lower_cross_attention import LowerCrossAttentionForORT
from llamaforge.plugins.cross_attention.reference import cross_attention
from llamaforge.plugins.cross_attention.schema import CrossAttentionAttrs, single_op_model

ATTRS = CrossAttentionAttrs(num_heads=4, num_kv_heads=2, head_dim=8, tokens_per_tile=5)
TILES = 6  # e.g. 2 images of 3 tiles (padding tiles included)


def random_case(batch: int, seq: int, new: int, capacity: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, kvh, d = ATTRS.num_heads, ATTRS.num_kv_heads, ATTRS.head_dim
    mask = (torch.rand(batch, seq, capacity // ATTRS.tokens_per_tile, generator=gen) > 0.5).long()
    mask[:, 0] = 0  # a row that sees no tile (a token before the first image)
    return {"query": torch.randn(batch, seq, h * d, generator=gen), "key": torch.randn(batch, new, kvh * d, generator=gen),
            "value": torch.randn(batch, new, kvh * d, generator=gen),
            "past_key": torch.randn(batch, kvh, capacity, d, generator=gen),
            "past_value": torch.randn(batch, kvh, capacity, d, generator=gen), "cross_attention_mask": mask}


def test_reference_is_transformers_cross_attention() -> None:
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask, repeat_kv

    case = random_case(2, 7, TILES * ATTRS.tokens_per_tile, TILES * ATTRS.tokens_per_tile, seed=0)
    out, present_key, present_value = cross_attention(*case.values(), ATTRS)
    b, s = 2, 7
    h, kvh, d = ATTRS.num_heads, ATTRS.num_kv_heads, ATTRS.head_dim
    k = case["key"].view(b, -1, kvh, d).transpose(1, 2)
    v = case["value"].view(b, -1, kvh, d).transpose(1, 2)
    assert torch.equal(present_key, k) and torch.equal(present_value, v)
    hf_mask, _ = _prepare_cross_attention_mask(case["cross_attention_mask"].view(b, s, 2, 3), ATTRS.tokens_per_tile,
                                               torch.float32)
    q = case["query"].view(b, s, h, d).transpose(1, 2)
    scores = q @ repeat_kv(k, ATTRS.group_size).transpose(2, 3) * ATTRS.scale + hf_mask
    want = (scores.softmax(-1) @ repeat_kv(v, ATTRS.group_size)).transpose(1, 2).reshape(b, s, h * d)
    assert (out - want).abs().max() <= 1e-5


@pytest.fixture(scope="module")
def lowered() -> ort.InferenceSession:
    model = ir.from_proto(single_op_model(ATTRS))
    LowerCrossAttentionForORT()(model)
    assert not any(n.domain == "llamaforge" for n in model.graph)
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("batch, seq, new, capacity", [(2, 7, 30, 30), (3, 1, 0, 30), (1, 4, 0, 0), (2, 1, 10, 30)],
                         ids=["prefill", "decode", "text-only", "partial-write"])
def test_ort_lowering_matches_reference(lowered: ort.InferenceSession, batch: int, seq: int, new: int,
                                        capacity: int) -> None:
    case = random_case(batch, seq, new, capacity, seed=batch + seq + new)
    want = cross_attention(*case.values(), ATTRS)
    got = lowered.run(None, {k: v.numpy() for k, v in case.items()})
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        assert np.abs(g - w.numpy()).max(initial=0.0) <= 1e-5
    if capacity == 0:  # no image: the layer's attention adds exactly nothing
        assert not got[0].any()
