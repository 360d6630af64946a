"""Scale searches for the W8A8 precisions, run during calibration where each layer's inputs exist.

Calibration (`calibrate.py`) streams the model one decoder layer at a time and hands a search every
linear's input as the layer runs (`capture`) and the layer's weights afterwards (`finish`), as it
does for AWQ (`awq.py`). For each group of linears reading one input x (q/k/v; o_proj; gate/up;
down_proj) a search measures the group's output error on the calibration tokens,

    || Q(x') Q(W')^T - x W^T ||^2 / || x W^T ||^2

with Q the recipe's own arithmetic (graphs/quantization/recipes.py, mirrored in torch here), and
records the candidate with the least error in the statistics (calibration.safetensors, and the
engine manifest's `quantization.calibration`). A candidate is fit (amax, smoothing factors, static
scales) on the first half of the calibration sequences and scored on the second half: the engine
meets text its calibration never saw, and a candidate that leaves no headroom (alpha near 1 puts
every channel of x / s at its calibrated maximum, so a static scale clips anything larger) fails
there as it would in use, while scoring on the fitting tokens themselves would reward it.

  int8-sq   SmoothQuant's alpha from ALPHA_GRID (0, 0.05, ..., 1): x' = x / s, W' = W diag(s),
            s = amax_x^alpha / amax_w^(1-alpha) (recipes.smoothing_factors); Q = per-output-channel
            int8 weights and per-token (or static per-tensor) int8 activations, as configured
  fp8       the activation clip: `percentile` takes the PERCENTILE-th percentile of |x| over every
            calibration value; `mse` the fraction of amax from CLIP_GRID with the least output error,
            weights quantized as configured (recipes.fp8_weight_scale)

A search ranks candidates on the calibration data, so too little data makes the choice arbitrary:
`layer_search` refuses fewer than MIN_SEARCH_TOKENS tokens, naming CALIB and both counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llamaforge.graphs.quantization.calibrate import CalibrationText, LayerSearch, require_tokens
from llamaforge.graphs.quantization.recipes import (
    CLIP_GRID,
    FP8_MAX,
    INT8_MAX,
    PACKED_LINEARS,
    PER_TOKEN_SCALE_FLOOR,
    PERCENTILE,
    CalibrationStats,
    QuantConfig,
    QuantizationError,
    ValueHeads,
    fp8_weight_scale,
    is_router,
    reads_attention_output,
    smoothing_factors,
)

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))
# Four calibration sequences of 256 tokens: below this a search ranks its 21 candidates on a few
# sentences. The default calibration batch is 16 sequences (4096 tokens).
MIN_SEARCH_TOKENS = 1024
# Rows the output error is measured on: a seeded random subset of the scoring half (the recorded
# amax and percentiles use every token). 21 candidates x 4 groups x every layer on 2 CPU cores: a
# quarter of the default batch keeps the search under a minute for stdlib-5m.
SEARCH_MAX_TOKENS = 1024


# -- the recipes' arithmetic in torch (weights in HF layout [out, in]) -------------------------------


def fake_int8(x: torch.Tensor, scale: torch.Tensor, low: float = -INT8_MAX) -> torch.Tensor:
    """Weights are stored in -127..127; an activation's QuantizeLinear saturates to -128..127 (low)."""
    return torch.clamp(torch.round(x / scale), low, INT8_MAX) * scale


def fake_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale


def int8_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel int8 (recipes.scale_from_amax: an all-zero row keeps scale 1)."""
    amax = w.abs().amax(dim=1, keepdim=True)
    return fake_int8(w, torch.where(amax > 0, amax, torch.full_like(amax, INT8_MAX)) / INT8_MAX)


def int8_activation(x: torch.Tensor, mode: str, static_amax: float) -> torch.Tensor:
    """Per token: max(max|x_row| / 127, floor), as the graph computes it; static: one scale."""
    if mode == "per-token":
        return fake_int8(x, torch.clamp(x.abs().amax(dim=-1, keepdim=True) / INT8_MAX, min=PER_TOKEN_SCALE_FLOOR))
    return fake_int8(x, torch.tensor(static_amax if static_amax > 0 else INT8_MAX) / INT8_MAX, low=-INT8_MAX - 1)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).pow(2).sum() / want.pow(2).sum().clamp(min=1e-30))


class GroupedInputs:
    """One layer's linear inputs, stored once per group of linears reading the same tensor (found
    on the first chunk by equality, so no name pattern is assumed). `value_heads`: the model's
    attention heads, so o_proj's per-channel statistics are tied over the query heads that share a
    value head, as the passes tie them (recipes.ValueHeads); None leaves them as measured."""

    def __init__(self, max_tokens: int = SEARCH_MAX_TOKENS, seed: int = 0, value_heads: ValueHeads | None = None) -> None:
        self.max_tokens = max_tokens
        self.seed = seed
        self.value_heads = value_heads
        self.groups: list[list[str]] = []
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.report: dict[str, Any] = {}

    def capture(self, name: str, x: torch.Tensor) -> None:
        if is_router(name):
            return
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        group = next((g for g in self.groups if name in g), None)
        if group is None:
            group = next((g for g in self.groups if len(self.inputs[g[0]]) == 1
                          and self.inputs[g[0]][0].shape == flat.shape and torch.equal(self.inputs[g[0]][0], flat)), None)
            if group is not None:
                group.append(name)
                return
            self.groups.append([name])
            self.inputs[name] = [flat.clone()]
        elif group[0] == name:
            self.inputs[name].append(flat.clone())

    def group_inputs(self) -> list[tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(names, every captured row, the rows candidates are fit on, the rows their error is
        measured on) per group: the first and second half of the calibration sequences (rows come in
        sequence order), the scoring half subsampled to max_tokens."""
        generator = torch.Generator().manual_seed(self.seed)
        out = []
        for group in self.groups:
            x = torch.cat(self.inputs[group[0]])
            fit, held = x[: x.shape[0] // 2], x[x.shape[0] // 2:]
            rows = held if held.shape[0] <= self.max_tokens else \
                held[torch.randperm(held.shape[0], generator=generator)[: self.max_tokens]]
            out.append((group, x, fit, rows))
        return out

    def forget(self) -> None:
        self.groups, self.inputs = [], {}

    def tied(self, linear: str, per_channel: torch.Tensor, reduce: Any = np.max) -> torch.Tensor:
        """`per_channel` statistics of `linear`'s input, tied over query heads if it reads the attention output."""
        if self.value_heads is None or not reads_attention_output(linear):
            return per_channel
        return torch.from_numpy(self.value_heads.tie(per_channel.numpy(), reduce))


class SmoothQuantSearch(GroupedInputs):
    """int8-sq: SmoothQuant's alpha per input group, by the group's int8 output error."""

    def __init__(self, activation: str, grid: tuple[float, ...] = ALPHA_GRID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.activation = activation
        self.grid = grid

    def finish(self, prefix: str, weights: dict[str, torch.Tensor], stats: CalibrationStats) -> None:
        for group, _, fit, rows in self.group_inputs():
            w = [weights[f"{name}.weight"].float() for name in group]  # [out, in] each
            a = self.tied(prefix + group[0], fit.abs().amax(dim=0))
            w_in = self.tied(prefix + group[0], torch.stack([m.abs().amax(dim=0) for m in w]).amax(dim=0))
            want = [rows @ m.T for m in w]
            errors = []
            for alpha in self.grid:
                s = torch.from_numpy(smoothing_factors(a.numpy(), w_in.numpy(), alpha))
                xq = int8_activation(rows / s, self.activation, float((a / s).max()))
                errors.append(sum(relative_error(xq @ int8_weight(m * s).T, y) for m, y in zip(w, want)) / len(w))
            best = int(np.argmin(errors))
            for name in group:
                stats.smoothquant_alpha[prefix + name] = self.grid[best]
            default = self.grid.index(0.5) if 0.5 in self.grid else best
            self.report[prefix + group[0]] = {"alpha": self.grid[best], "error": errors[best], "error_alpha_0.5": errors[default]}
        stats.search["smoothquant"] = {"activations": self.activation, "grid": list(self.grid),
                                       "error": "relative squared output error", "groups": self.report}
        self.forget()


class FP8ScaleSearch(GroupedInputs):
    """fp8: the per-tensor activation clip per input group (percentile, or mse by output error)."""

    def __init__(self, method: str, weight_scale: str, per_channel: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.method = method
        self.weight_scale = weight_scale
        self.per_channel = per_channel

    def _weights(self, group: list[str], weights: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The group's weights fake-quantized as the pass stores them: q/k/v as one packed tensor."""
        w = [weights[f"{name}.weight"].float() for name in group]
        # The exporter packs q/k/v into one MatMul with one per-tensor weight scale (PACKED_LINEARS).
        suffixes = sorted("." + n.rsplit(".", 1)[-1] for n in group)
        packed = len({n.rsplit(".", 1)[0] for n in group}) == 1 and any(suffixes == sorted(parts)
                                                                        for parts in PACKED_LINEARS.values())
        units = [w] if packed else [[m] for m in w]
        out = []
        for unit in units:
            cat = torch.cat(unit)  # [out, in] -> the pass's [in, out]
            scale = torch.from_numpy(fp8_weight_scale(cat.T.numpy(), self.weight_scale, self.per_channel))
            q = fake_fp8(cat, scale[:, None] if scale.ndim else scale)
            out += list(torch.split(q, [m.shape[0] for m in unit]))
        return out

    def finish(self, prefix: str, weights: dict[str, torch.Tensor], stats: CalibrationStats) -> None:
        for group, x, fit, rows in self.group_inputs():
            amax = float(x.abs().max())
            if self.method == "percentile":
                flat = x.abs().flatten()
                k = min(flat.numel(), max(1, int(np.ceil(PERCENTILE / 100 * flat.numel()))))
                clip = float(torch.kthvalue(flat, k).values)
                self.report[prefix + group[0]] = {"amax": amax, "clip": clip}
            else:
                w = [weights[f"{name}.weight"].float() for name in group]
                wq = self._weights(group, weights)
                want = [rows @ m.T for m in w]
                errors = []
                fit_amax = float(fit.abs().max())
                for r in CLIP_GRID:
                    xq = fake_fp8(rows, torch.tensor(max(fit_amax * r, 1e-30) / FP8_MAX))
                    errors.append(sum(relative_error(xq @ q.T, y) for q, y in zip(wq, want)) / len(w))
                best = int(np.argmin(errors))
                clip = amax * CLIP_GRID[best]
                self.report[prefix + group[0]] = {"amax": amax, "clip": clip, "error": errors[best], "error_amax": errors[0]}
            for name in group:
                stats.act_clip[prefix + name] = clip
        stats.search["fp8_activation_clip"] = {"method": self.method, "groups": self.report}
        self.forget()


def layer_search(quant: QuantConfig, calib: CalibrationText, tokens: torch.Tensor,
                 value_heads: ValueHeads | None = None) -> LayerSearch | None:
    """The search calibration runs for `quant` (None: amax statistics are all it needs), after
    checking that the calibration batch is large enough for it. `value_heads`: the model's, so the
    SmoothQuant search ties o_proj's statistics as the pass does (GroupedInputs)."""
    if quant.precision == "int8-sq" and quant.smoothquant_alpha is None:
        require_tokens(calib, tokens, MIN_SEARCH_TOKENS, "the SmoothQuant alpha search (int8-sq)",
                       "Give CALIB= more text, or force one alpha with --smoothquant-alpha.")
        return SmoothQuantSearch(quant.int8_activation, value_heads=value_heads)
    if quant.smooths_int8_wo and quant.smoothquant_alpha is None:  # the kernel rounds activations per token
        require_tokens(calib, tokens, MIN_SEARCH_TOKENS, "the SmoothQuant alpha search (int8-wo, --ort-kernels fast)",
                       "Give CALIB= more text, force one alpha with --smoothquant-alpha, or use --ort-kernels exact.")
        return SmoothQuantSearch("per-token", value_heads=value_heads)
    if quant.precision == "fp8" and quant.fp8_activation_scale != "amax":
        require_tokens(calib, tokens, MIN_SEARCH_TOKENS, f"the fp8 {quant.fp8_activation_scale} activation scale search",
                       "Give CALIB= more text, or use --fp8-activation-scale amax.")
        return FP8ScaleSearch(quant.fp8_activation_scale, quant.fp8_weight_scale, quant.fp8_weights == "per-channel")
    return None


def backend_int8_activation(backend: str, requested: str | None) -> str:
    """int8-sq's activation form for a backend: per token where the backend runs it (ONNX Runtime),
    static per tensor for TensorRT, whose ONNX parser has no per-token INT8 form (its only
    runtime-computed scales come from the DynamicQuantize layer, FP4 / MXFP8 blocks; TensorRT-LLM runs
    per-token INT8 through its own plugins, quantize_per_token and SmoothQuantGemm)."""
    if requested is None:
        return "static" if backend == "trt" else "per-token"
    if backend == "trt" and requested == "per-token":
        raise QuantizationError("--int8-activation per-token: TensorRT has no ONNX form for per-token dynamic INT8 "
                                "(docs/quantization.md); BACKEND=trt builds int8-sq with --int8-activation static")
    return requested
