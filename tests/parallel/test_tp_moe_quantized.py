"""Quantized Llama 4 MoE experts at TP=2: tensor parallelism inside every expert, each expert's weight
scales cut with its channels (gate_up_proj column-parallel: the rank's per-output-channel scales;
down_proj row-parallel: its int4 blocks along the input whole per rank, its per-output-channel scales
whole; fp8's per-expert scale the whole expert's) and the activation scales the unsharded
calibration's, shared. So a TP=2 engine computes what the TP=1 engine of the same precision
computes, as the dense quantized engines do (test_tp_quantized.py, same bound)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_models import make_llama4_checkpoint, tiny_llama4_config
from tp_runs import assert_tp2_computes_what_tp1_computes

from llamaforge.build.builder import BuildError, BuildOptions, build_engine
from llamaforge.build.tensor_parallel import check_int4_blocks
from llamaforge.export.tensor_parallel import RankShard
from llamaforge.graphs.quantization.recipes import CalibrationStats, QuantConfig
from llamaforge.graphs.quantization.sharding import shard_stats

# Every layer MoE (4 experts, top-1, a shared expert). intermediate_size 64, not the tiny default 32:
# at TP=2 an expert's down_proj input is 32 channels per rank, one whole INT4 block of 32 (the
# smallest INT4 block size), so INT4 experts can be cut at all.
CONFIG = tiny_llama4_config(intermediate_size=64)

# test_tp_quantized.py's bound for the dense quantized precisions: the ranks compute on TP=1's own
# quantized weights and scales, so what is left is float32 summation order (the all-reduce adds the
# ranks' partial sums where TP=1 has one MatMul), far below 1e-4 at these logit magnitudes (~1).
ATOL = 1e-4

# ort_kernels="exact": the dense linears' weight-only kernels are DequantizeLinear -> MatMul, which a
# rank computes on exactly TP=1's quantized weights (the experts are always in that form). The fast
# kernels round activations per block inside MatMulNBits: test_tp_fast_kernels.py holds those.
CASES = {
    "int8-wo-exact": dict(precision="int8-wo", ort_kernels="exact"),
    "fp8-with-fp8-kv-cache": dict(precision="fp8", kv_cache="fp8"),
    "int4-rtn-exact": dict(precision="int4-rtn", int4_block_size=32, ort_kernels="exact"),
    "int4-awq-exact": dict(precision="int4-awq", int4_block_size=32, ort_kernels="exact"),
}


def test_rank_statistics_cut_each_experts_gate_up_columns_and_keep_down_whole() -> None:
    rng = np.random.default_rng(0)
    experts, width, hidden = CONFIG.num_local_experts, CONFIG.intermediate_size, CONFIG.hidden_size
    gate_up, down = "model.layers.0.feed_forward.experts.gate_up_proj", "model.layers.0.feed_forward.experts.down_proj"
    stats = CalibrationStats(act_amax={gate_up: rng.random(hidden), down: rng.random(width)},
                             weight_out_amax={gate_up: rng.random((experts, 2 * width)), down: rng.random((experts, hidden))})
    rank = shard_stats(stats, RankShard(CONFIG, 2, 1))
    half = width // 2
    want = np.concatenate([stats.weight_out_amax[gate_up][:, half:width], stats.weight_out_amax[gate_up][:, width + half:]], axis=1)
    np.testing.assert_array_equal(rank.weight_out_amax[gate_up], want)  # its gate columns, then the same up columns
    np.testing.assert_array_equal(rank.whole_expert_amax[gate_up], stats.weight_out_amax[gate_up].max(axis=1))
    np.testing.assert_array_equal(rank.weight_out_amax[down], stats.weight_out_amax[down])  # over all its inputs
    assert down not in rank.whole_expert_amax
    for linear in (gate_up, down):  # activation scales: the unsharded calibration's
        np.testing.assert_array_equal(rank.act_amax[linear], stats.act_amax[linear])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama4_checkpoint(tmp_path_factory.mktemp("moe-tpq") / "ckpt", CONFIG, seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_quantized_moe_tp2_computes_what_tp1_computes(case: str, checkpoint: Path, tmp_path: Path) -> None:
    options = CASES[case]
    sharded = build_engine(BuildOptions(checkpoint=checkpoint, out=tmp_path / "tp", tp=2, **options))
    single = build_engine(BuildOptions(checkpoint=checkpoint, out=tmp_path / "tp1", **options))
    assert_tp2_computes_what_tp1_computes(sharded, single, tmp_path, 6, ATOL, case)


def test_int4_experts_whose_rank_input_is_not_whole_blocks_are_refused() -> None:
    """tiny_llama4_config's experts are 32 wide: 16 input channels per rank, under every INT4 block."""
    with pytest.raises(BuildError, match=r"intermediate_size / TP \(the experts' and the shared expert's down_proj "
                                         r"input\) = 16 is not a multiple of the block 32"):
        check_int4_blocks(2, tiny_llama4_config(), QuantConfig("int4-rtn", int4_block_size=32))
    check_int4_blocks(2, CONFIG, QuantConfig("int4-rtn", int4_block_size=32))  # 32 per rank: whole blocks
