"""AWQ's scale search (graphs/quantization/awq.py): the search itself on synthetic activations, the
grouping of linears that read one input, and the refusal of a calibration set too small for it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llamaforge.graphs.quantization.awq import MIN_AWQ_TOKENS, AWQSearch, awq_search, fake_int4, search_scale
from llamaforge.graphs.quantization.calibrate import CalibrationError, CalibrationText
from llamaforge.graphs.quantization.int4 import int4_scales, quantize_int4
from llamaforge.graphs.quantization.recipes import CalibrationStats, ValueHeads


def outlier_activations(tokens: int = 1024, width: int = 128, seed: int = 0) -> torch.Tensor:
    """Activations with a few channels 30x larger than the rest (what AWQ protects)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g)
    x[:, :4] *= 30
    return x


def test_fake_int4_is_the_recipe_arithmetic() -> None:
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))  # HF [out, in]
    block = 32
    engine = w.numpy().T  # the graph's [in, out]
    want = quantize_int4(engine, int4_scales(engine, block), block).astype(np.float32) * np.repeat(
        int4_scales(engine, block), block, axis=0)
    np.testing.assert_array_equal(fake_int4(w, block).numpy().T, want)


def test_search_beats_round_to_nearest_where_activations_have_outliers() -> None:
    x = outlier_activations()
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    s, alpha, error, rtn_error = search_scale(x, w, 32, x.abs().mean(0))
    assert alpha > 0 and error < 0.9 * rtn_error, (alpha, error, rtn_error)
    # s protects the outlier channels: their weight columns are scaled up before rounding.
    assert s[:4].min() > s[4:].max()
    np.testing.assert_allclose(float((s.max() * s.min()).sqrt()), 1.0, rtol=1e-5)  # AWQ's normalisation


def test_search_never_does_worse_than_rtn() -> None:
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(3))  # no outliers: little to gain
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    _, _, error, rtn_error = search_scale(x, w, 32, x.abs().mean(0))
    assert error <= rtn_error  # alpha = 0 (s = 1, RTN) is a candidate


def test_linears_reading_one_input_share_one_scale() -> None:
    search, stats = AWQSearch(32), CalibrationStats()
    g = torch.Generator().manual_seed(5)
    weights = {f"{n}.weight": torch.randn(32, 64, generator=g) for n in ("q", "k", "v")} | {
        "o.weight": torch.randn(64, 32, generator=g), "mlp.gate.weight": torch.randn(16, 64, generator=g)}
    for _ in range(2):  # two forward chunks
        x, h = outlier_activations(64, 64), torch.randn(64, 32, generator=g)
        for name in ("q", "k", "v"):
            search.capture(name, x)
        search.capture("o", h)
        search.capture("mlp.gate", x)  # a router (`.gate`): never searched
    search.finish("model.layers.0.", weights, stats)
    assert sorted(stats.awq_scale) == ["model.layers.0.k", "model.layers.0.o", "model.layers.0.q", "model.layers.0.v"]
    q, k, v = (stats.awq_scale[f"model.layers.0.{n}"] for n in "qkv")
    assert np.array_equal(q, k) and np.array_equal(q, v) and q.shape == (64,)
    assert stats.awq_scale["model.layers.0.o"].shape == (32,)


def test_too_little_calibration_text_is_refused_naming_it() -> None:
    calib = CalibrationText("...", {"path": "/data/short.txt"})
    tokens = torch.zeros(2, 256, dtype=torch.int64)
    with pytest.raises(CalibrationError, match=rf"CALIB=/data/short.txt: 512 calibration tokens .*AWQ's scale search "
                                               rf"\(int4-awq\) needs at least {MIN_AWQ_TOKENS}.*int4-rtn"):
        awq_search(128, calib, tokens)
    assert isinstance(awq_search(128, calib, torch.zeros(4, 256, dtype=torch.int64)), AWQSearch)


def test_o_proj_scales_are_tied_over_the_query_heads_of_a_value_head() -> None:
    """With the model's heads known, o_proj's scale is one value per value-head channel (so the pass
    folds 1/s into the value columns); other groups, and o_proj without heads, keep per-channel s."""
    heads = ValueHeads(head_dim=8, group=2)  # 4 query heads, 2 value heads: o_proj reads 32 channels
    g = torch.Generator().manual_seed(6)
    weights = {"self_attn.q_proj.weight": torch.randn(32, 64, generator=g),
               "self_attn.o_proj.weight": torch.randn(64, 32, generator=g)}
    scales = {}
    for value_heads in (heads, None):
        search, stats = AWQSearch(32, value_heads=value_heads), CalibrationStats()
        x, h = outlier_activations(256, 64), outlier_activations(256, 32, seed=1)
        h[:, 9] *= 20  # one channel of query head 1 only: its group partner (head 0, channel 1) is quiet
        search.capture("self_attn.q_proj", x)
        search.capture("self_attn.o_proj", h)
        search.finish("model.layers.0.", weights, stats)
        scales[value_heads] = stats.awq_scale["model.layers.0.self_attn.o_proj"]
    tied, untied = scales[heads], scales[None]
    assert heads.per_value_channel(untied) is None  # the loud channel and its partner differ...
    per_value = heads.per_value_channel(tied)  # ...until tied: one factor per value channel
    assert per_value is not None and per_value.shape == (16,)
    np.testing.assert_array_equal(tied.reshape(2, 2, 8)[:, 0], tied.reshape(2, 2, 8)[:, 1])
    assert tied[1] == tied[9] and tied[9] > np.median(tied)  # the partner shares the loud channel's factor


def test_value_heads_tie_groups_query_heads_as_repeat_kv_does() -> None:
    """Query head h reads value head h // group (transformers' repeat_kv): channels (h, d) with the
    same h // group and d are tied; per_value_channel reads them back, or None if not tied."""
    heads = ValueHeads(head_dim=2, group=3)
    x = np.arange(12, dtype=np.float32)  # 6 query heads x 2 channels, 2 value heads
    np.testing.assert_array_equal(heads.tie(x), [4, 5, 4, 5, 4, 5, 10, 11, 10, 11, 10, 11])
    np.testing.assert_array_equal(heads.tie(x, np.mean), [2, 3, 2, 3, 2, 3, 8, 9, 8, 9, 8, 9])
    np.testing.assert_array_equal(heads.per_value_channel(heads.tie(x)), [4, 5, 10, 11])
    assert heads.per_value_channel(x) is None
    assert heads.per_value_channel(np.ones(10, np.float32)) is None  # not a whole number of groups
