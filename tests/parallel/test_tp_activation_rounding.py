"""int8-sq's per-token activations at TP=2: why TP=2 is not TP=1, and the bound it is held to.

A row-parallel linear (o_proj, down_proj) takes its input's per-token int8 scale over the channels
the rank holds (as TensorRT-LLM's SmoothQuant does with TP): two finer groups instead of one, so the
activations round differently from TP=1's and the logits differ by more than float summation order
(docs/tensor_parallel.md#quantization-per-rank). Everything else is TP=1's: the weights, their
smoothed per-channel scales (row_parallel_smoothed_amax) and the smoothing factors.

So the principled oracle of a TP=2 engine is the TP=1 fake-quant oracle (tests/helpers/quant_oracle.py)
with exactly that one change, the row-parallel inputs rounded per token and per rank's half. The
TP=2 engine is held to it by the bound the single-device test (tests/graphs/test_quantization.py
`test_quantized_logits_match_fake_quant_oracle`) holds TP=1 to: error below 5% of what the
quantization itself moves the logits. A wrong rank scale (one over the whole input, or over the
wrong channels) moves them by a sizeable part of that, and fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from quant_oracle import first_ambiguous_token, oracle_logits
from tiny_models import TinyBuilds, tiny_config
from tp_runs import prompts, run_ranks

from llamaforge.build.builder import BuildOptions, build_engine
from llamaforge.graphs.quantization.recipes import CalibrationStats

pytestmark = pytest.mark.slow  # two tiny engine builds and two MPI runs


# Hidden 64 only (at hidden 256, intermediate 512, head_dim 64, seed 11, the prompts meet the bound
# too). The engines sum in other float orders than the oracle (ORT's kernels; at TP=2 the all-reduce),
# so an activation sitting on a rounding boundary may get the other code in the engine: once seen
# at token 11 of the 23-token prompt (errors 0.04-0.12 from there on, 4e-6 before), once at token
# 15. Attention carries such a flip to every later token, so each prompt is compared on the tokens
# before the first rounding the oracle found within quant_oracle.AMBIGUOUS_CODE of a boundary.
MIN_CHECKED = 4


@pytest.mark.parametrize("hidden", [64])
def test_int8_sq_tp2_equals_the_oracle_that_rounds_per_rank(hidden: int, tiny_builds: TinyBuilds, tmp_path: Path) -> None:
    config = tiny_config()
    ckpt = tiny_builds.hf_checkpoint(config, seed=11)
    # The integer GEMM computes the per-token Q/DQ graph's numbers (the fast kernels round per block instead)
    sharded = build_engine(BuildOptions(checkpoint=ckpt, out=tmp_path / "tp", tp=2, precision="int8-sq",
                                        ort_kernels="integer"))
    single = build_engine(BuildOptions(checkpoint=ckpt, out=tmp_path / "tp1", precision="int8-sq", ort_kernels="integer"))
    stats = CalibrationStats.load(sharded / "calibration.safetensors")  # measured once, on the unsharded model
    batch = prompts(seed=12)
    tp_logits, tp_tokens = run_ranks(sharded, batch, tmp_path, 2)
    one_logits, one_tokens = run_ranks(single, batch, tmp_path, 1)
    for b, p in enumerate(batch):
        prompt = np.array([p], dtype=np.int64)
        fp32 = oracle_logits(ckpt, stats, None, prompt)
        margins: dict[int, list[torch.Tensor]] = {1: [], 2: []}
        want = {tp: oracle_logits(ckpt, stats, "int8-sq", prompt, tp=tp, margins=margins[tp]) for tp in (1, 2)}
        checked = {tp: first_ambiguous_token(margins[tp], len(p)) for tp in (1, 2)}
        assert min(checked.values()) >= MIN_CHECKED, (b, checked)
        got = {1: one_logits[b, :len(p)], 2: tp_logits[b, :len(p)]}
        quant_error = {tp: np.abs(want[tp] - fp32)[:checked[tp]].max() for tp in (1, 2)}
        engine_error = {tp: np.abs(got[tp] - want[tp])[:checked[tp]].max() for tp in (1, 2)}
        print(f"hidden {hidden} prompt {b}: tokens compared {checked}; |TP2 - TP1| engines {np.abs(got[2] - got[1]).max():.3e}, oracles "
              f"{np.abs(want[2] - want[1]).max():.3e}; quantization error TP1 {quant_error[1]:.3e} TP2 {quant_error[2]:.3e}; "
              f"engine vs its oracle TP1 {engine_error[1]:.3e} TP2 {engine_error[2]:.3e}")
        assert quant_error[2] > 1e-3, "the quantization changed nothing: the test would prove nothing"
        assert engine_error[2] < 0.05 * quant_error[2], (b, engine_error[2], quant_error[2])
        assert engine_error[1] < 0.05 * quant_error[1], (b, engine_error[1], quant_error[1])  # the oracle is TP=1's
    # Greedy tokens: recorded, not asserted; a near-tie in the logits may break either way.
    print(f"hidden {hidden}: greedy tokens equal: {np.array_equal(tp_tokens, one_tokens)}")
