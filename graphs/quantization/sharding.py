"""Calibration statistics for one tensor-parallel rank: measured once on the unsharded model, then
cut along the channels the rank holds (docs/tensor_parallel.md#quantization-per-rank).

  per output channel (weight_out_amax)      column-parallel linears: the rank's output channels
  per input channel (act_amax, weight_in_amax, awq_scale)   row-parallel linears: its input channels
  per tensor (K/V amax, searched alphas and clips)          shared: the same on every rank
  MoE experts (weight_out_amax [E, out])   gate_up_proj: the rank's gate and up columns of every
                                           expert; down_proj (row-parallel): whole, as are the
                                           experts' input maxima (only their per-tensor max is used)

A per-tensor scale (fp8 weights, static activation scales) must not shrink to the rank's part, so
the whole linear's maxima are kept beside the cut vectors (`whole_weight_amax`, `whole_act_amax`).
fp8's per-expert scale likewise keeps each expert's whole max (`whole_expert_amax`).
So every weight scale of a rank is the unsharded model's scale of those channels, and every
activation scale is the unsharded model's.
"""

from __future__ import annotations

import numpy as np

from llamaforge.export.tensor_parallel import RankShard
from llamaforge.graphs.quantization.recipes import CalibrationStats


def _cut(vector: np.ndarray, bounds: tuple[int, int]) -> np.ndarray:
    return vector[bounds[0]:bounds[1]].copy()


def shard_stats(stats: CalibrationStats, shard: RankShard) -> CalibrationStats:
    """A copy of `stats` as rank `shard.rank` sees its linears (the input is left unchanged)."""
    out = stats.copy()
    if shard.size == 1:
        return out
    for linear, amax in stats.weight_out_amax.items():
        out.whole_weight_amax[linear] = float(amax.max())
    for linear, amax in stats.act_amax.items():
        out.whole_act_amax[linear] = float(amax.max())
    for linear, amax in stats.weight_out_amax.items():  # MoE experts [E, out]: gate_up's columns are cut
        columns = shard.expert_out_columns(linear)
        if columns is not None:
            out.weight_out_amax[linear] = amax[:, columns].copy()
            out.whole_expert_amax[linear] = amax.max(axis=1)
    for linear in set(stats.act_amax) | set(stats.weight_out_amax) | set(stats.weight_in_amax) | set(stats.awq_scale):
        channels = shard.linear_channels(linear)
        if channels is None:
            continue
        axis, bounds = channels
        if axis == "out" and linear in stats.weight_out_amax:
            out.weight_out_amax[linear] = _cut(stats.weight_out_amax[linear], bounds)
        if axis == "in":
            for table_in, table_out in ((stats.act_amax, out.act_amax), (stats.weight_in_amax, out.weight_in_amax),
                                        (stats.awq_scale, out.awq_scale)):
                if linear in table_in:
                    table_out[linear] = _cut(table_in[linear], bounds)
    return out
