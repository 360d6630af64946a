"""AWQ's activation-aware scale search (Lin et al., "AWQ: Activation-aware Weight Quantization for
LLM Compression and Acceleration", 2024), run during calibration, one decoder layer at a time.

For each group of linears that read one input x (q/k/v; gate/up; o_proj; down_proj) the search
picks a per-input-channel scale

    s = mean_tokens|x|^alpha, normalised by sqrt(max(s) * min(s)),   alpha in {0, 1/20, ..., 19/20}

minimising the group's output error on the calibration tokens,

    || x W^T - (x / s) Q(W diag(s))^T ||^2    (Q: INT4 block quantization along the input channels,
                                              graphs/quantization/int4.py's arithmetic)

Channels that carry large activations get their weight columns scaled up before rounding, so they
lose less to it; alpha = 0 (s = 1) is round-to-nearest, so the search never does worse than RTN on
its own data. The chosen s goes into the calibration statistics (`CalibrationStats.awq_scale`,
saved in the engine's calibration.safetensors); `graphs/passes/quantize_int4.py` folds 1/s into the
weight before (the RMSNorm's, up_proj's columns, or the value columns for o_proj, whose mean|x| is
first averaged over the query heads sharing a value head: recipes.ValueHeads) and s into the
weight after, before quantizing it.

Calibration (`calibrate.py`) hands this class every linear's input as the layer runs (`capture`) and
the layer's weights afterwards (`finish`); inputs are kept for one layer only.
"""

from __future__ import annotations

import numpy as np
import torch

from llamaforge.graphs.quantization.calibrate import CalibrationText, require_tokens
from llamaforge.graphs.quantization.int4 import INT4_MAX, INT4_MIN, block_for
from llamaforge.graphs.quantization.recipes import CalibrationStats, QuantizationError, ValueHeads
from llamaforge.graphs.quantization.search import GroupedInputs

AWQ_GRID = 20  # llm-awq's n_grid: alpha = i / 20 for i in 0..19
# Tokens the output error is measured on (a seeded random subset; mean|x| uses every token): 20 candidate
# scales x every linear of the layer is the build's costliest step on a CPU (a 125M model: ~1 GFLOP
# per token per layer); 512 tokens x all output channels still rank the candidates clearly.
AWQ_MAX_TOKENS = 512
# Below four calibration sequences of 256 tokens the 20 candidates are ranked on a few sentences (the
# same floor as the W8A8 searches, search.py); the default calibration batch is 4096 tokens.
MIN_AWQ_TOKENS = 1024


def fake_int4(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """Quantize-dequantize w [out, in] in INT4 blocks along `in` (int4.quantize_int4's arithmetic, in torch)."""
    out, inputs = w.shape
    blocks = w.reshape(out, inputs // block_size, block_size)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax, torch.full_like(amax, INT4_MAX)) / INT4_MAX
    return (torch.clamp(torch.round(blocks / scale), INT4_MIN, INT4_MAX) * scale).reshape(out, inputs)


def search_scale(x: torch.Tensor, weight: torch.Tensor, block_size: int, x_mean: torch.Tensor,
                 grid: int = AWQ_GRID) -> tuple[torch.Tensor, float, float, float]:
    """(s [in], alpha, error with s, error of RTN) for x [tokens, in] and the group's weight [out, in]."""
    ref = x @ weight.T
    best: tuple[float, float, torch.Tensor] | None = None
    rtn_error = 0.0
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        error = float((x @ (fake_int4(weight * s, block_size) / s).T - ref).pow(2).mean())
        if i == 0:
            rtn_error = error
        if best is None or error < best[0]:
            best = (error, alpha, s)
    assert best is not None
    return best[2], best[1], best[0], rtn_error


def awq_search(block_size: int, calib: CalibrationText, tokens: torch.Tensor,
               value_heads: ValueHeads | None = None) -> AWQSearch:
    """The int4-awq search for a build, after checking the calibration batch is large enough for it.
    `value_heads`: the model's, so o_proj's scale is tied over query heads (recipes.ValueHeads)."""
    require_tokens(calib, tokens, MIN_AWQ_TOKENS, "AWQ's scale search (int4-awq)",
                   "Give CALIB= more text, or use PRECISION=int4-rtn (no search).")
    return AWQSearch(block_size, value_heads=value_heads)


class AWQSearch(GroupedInputs):
    """Collects one layer's linear inputs during calibration (`GroupedInputs.capture`) and searches
    each group's scale. Unlike the W8A8 searches it fits and scores on the same rows: AWQ's scale
    comes from mean|x| over every token, and alpha = 0 (RTN) is always a candidate."""

    def __init__(self, block_size: int, grid: int = AWQ_GRID, max_tokens: int = AWQ_MAX_TOKENS, seed: int = 0,
                 value_heads: ValueHeads | None = None) -> None:
        super().__init__(max_tokens=max_tokens, seed=seed, value_heads=value_heads)
        self.block_size = block_size
        self.grid = grid
        self.errors: dict[str, tuple[float, float]] = {}  # group's first linear -> (AWQ error, RTN error)

    def finish(self, prefix: str, weights: dict[str, torch.Tensor], stats: CalibrationStats) -> None:
        """Search every group of the layer (weights by module name, `...q_proj.weight` [out, in]),
        record s and alpha under `prefix + name` for each linear, and forget the layer's inputs."""
        generator = torch.Generator().manual_seed(self.seed)
        for group in self.groups:
            x = torch.cat(self.inputs[group[0]])
            weight = torch.cat([weights[f"{name}.weight"].float() for name in group])
            block = block_for(weight.shape[1], self.block_size)
            if block is None:
                raise QuantizationError(f"{prefix}{group[0]}.weight: {weight.shape[1]} input channels, no INT4 block size "
                                        "divides them")
            x_mean = self.tied(prefix + group[0], x.abs().mean(dim=0), np.mean)
            rows = x if x.shape[0] <= self.max_tokens else x[torch.randperm(x.shape[0], generator=generator)[: self.max_tokens]]
            s, alpha, error, rtn_error = search_scale(rows, weight, block, x_mean, self.grid)
            for name in group:
                stats.awq_scale[prefix + name] = s.numpy().astype(np.float32)
                stats.awq_alpha[prefix + name] = alpha
            self.errors[prefix + group[0]] = (error, rtn_error)
        self.forget()
