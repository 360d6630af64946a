"""Quantized tensor-parallel engines: calibration once on the unsharded model, each rank's weight
scales cut with its channels and activation scales shared (graphs/quantization/sharding.py), so for
int8-wo and int4-rtn (exact kernels) and fp8 (+ fp8 KV cache) a TP=2 engine computes what the TP=1
engine of the same precision computes: prefill logits within 1e-4 and the same greedy tokens. And the
TP builds refused, each naming why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from tiny_models import TinyBuilds, tiny_config
from tp_runs import assert_tp2_computes_what_tp1_computes

from llamaforge.build.builder import BuildError, BuildOptions, build_engine
from llamaforge.export.tensor_parallel import RankShard
from llamaforge.graphs.quantization.recipes import CalibrationStats
from llamaforge.graphs.quantization.sharding import shard_stats

ATOL = 1e-4


def test_rank_statistics_cut_channels_and_keep_whole_maxima() -> None:
    config = tiny_config()  # hidden 64, 4 heads x 16, 2 kv heads, ffn 128
    rng = np.random.default_rng(0)
    q, o, down = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"
    stats = CalibrationStats(
        act_amax={q: rng.random(64), o: rng.random(64), down: rng.random(128)},
        weight_in_amax={q: rng.random(64), o: rng.random(64), down: rng.random(128)},
        weight_out_amax={q: rng.random(64), o: rng.random(64), down: rng.random(64)},
        k_amax=[1.0, 2.0], v_amax=[3.0, 4.0])
    rank = shard_stats(stats, RankShard(config, 2, 1))
    np.testing.assert_array_equal(rank.weight_out_amax[q], stats.weight_out_amax[q][32:])  # column-parallel: outputs
    np.testing.assert_array_equal(rank.act_amax[q], stats.act_amax[q])  # its input is the whole hidden state
    np.testing.assert_array_equal(rank.act_amax[o], stats.act_amax[o][32:])  # row-parallel: inputs
    np.testing.assert_array_equal(rank.weight_in_amax[down], stats.weight_in_amax[down][64:])
    np.testing.assert_array_equal(rank.weight_out_amax[down], stats.weight_out_amax[down])  # over all its inputs
    # Per-tensor scales stay the whole linear's, not the rank's part's.
    assert rank.weight_amax_per_tensor(q, rank.weight_out_amax[q]) == stats.weight_out_amax[q].max()
    assert rank.activation_amax_per_tensor(o) == stats.act_amax[o].max()
    assert rank.k_amax == stats.k_amax and rank.v_amax == stats.v_amax
    assert stats.act_amax[o].shape == (64,)  # the input statistics are left whole


@pytest.fixture(scope="module")
def checkpoint(tiny_builds: TinyBuilds) -> Path:
    return tiny_builds.hf_checkpoint(tiny_config(), seed=11)


CASES = {
    "int8-wo-exact": dict(precision="int8-wo", ort_kernels="exact"),
    "fp8-with-fp8-kv-cache": dict(precision="fp8", kv_cache="fp8"),
    "int4-rtn-exact": dict(precision="int4-rtn", int4_block_size=32, ort_kernels="exact"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_quantized_tp2_computes_what_tp1_computes(case: str, checkpoint: Path, tmp_path: Path) -> None:
    options = CASES[case]
    sharded = build_engine(BuildOptions(checkpoint=checkpoint, out=tmp_path / "tp", tp=2, **options))
    single = build_engine(BuildOptions(checkpoint=checkpoint, out=tmp_path / "tp1", **options))
    assert (sharded / "calibration.safetensors").is_file() and not (sharded / "rank0" / "calibration.safetensors").exists()
    assert_tp2_computes_what_tp1_computes(sharded, single, tmp_path, 12, ATOL, case)


@pytest.mark.parametrize("options,message", [
    (dict(tp=3), "TP: ckpt: TP=3 does not divide num_heads=4"),  # BACKEND=trt: test_tp_trt.py
    (dict(tp=2, precision="int8-sq", int8_activation="static"), "--int8-activation static"),
])
def test_tp_builds_it_cannot_do_are_refused_naming_why(options: dict, message: str, checkpoint: Path,
                                                        tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=message):
        build_engine(BuildOptions(checkpoint=checkpoint, out=tmp_path / "engine", **options))
    assert not (tmp_path / "engine").exists()


@pytest.mark.slow
def test_smoothed_int8_ranks_hold_the_unsharded_weight_scales_of_their_channels(checkpoint: Path, tmp_path: Path) -> None:
    """int8-wo on the fast kernels smooths first: every rank's per-output-channel weight scales are the
    TP=1 engine's scales of its channels; the row-parallel ones (o_proj, down_proj, whose outputs every
    rank has) measured over the whole input, not over the rank's rows."""
    sharded = build_engine(BuildOptions(checkpoint=checkpoint, out=tmp_path / "tp", tp=2, precision="int8-wo"))
    single = build_engine(BuildOptions(checkpoint=checkpoint, out=tmp_path / "tp1", precision="int8-wo"))

    def scales(path: Path) -> dict[str, np.ndarray]:
        graph = onnx.load(str(path), load_external_data=False).graph
        return {t.name: numpy_helper.to_array(t, base_dir=str(path.parent)) for t in graph.initializer
                if t.name.endswith("nbits_scales")}

    whole = scales(single / "model.onnx")
    ranks = [scales(sharded / f"rank{r}" / "model.onnx") for r in range(2)]
    config = tiny_config()
    q, kv = config.q_size, config.kv_size
    assert whole and set(whole) == set(ranks[0])
    for name, want in whole.items():
        parts = [r[name] for r in ranks]
        if "o_proj" in name or "down_proj" in name:  # row-parallel: every output channel on every rank
            for part in parts:
                np.testing.assert_array_equal(part, want, err_msg=name)
        elif "qkv_proj" in name:  # each rank: its q heads | its k heads | its v heads
            splits = [np.split(p, [q // 2, q // 2 + kv // 2]) for p in parts]
            got = np.concatenate([np.concatenate([s[i] for s in splits]) for i in range(3)])
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:  # gate / up / lm_head: column-parallel
            np.testing.assert_array_equal(np.concatenate(parts), want, err_msg=name)
