"""Explicit (Q/DQ) quantization: the precisions, the calibration statistics the passes consume, and
the quantization arithmetic shared by the passes, the tests' oracle and the benchmark.

Everything follows TensorRT's explicit-quantization rules: symmetric scales with zero point 0, a
QuantizeLinear -> DequantizeLinear pair right before each MatMul activation input, and weights
stored quantized with a DequantizeLinear in front of the MatMul.

  fp8       FP8 E4M3 W8A8: per-tensor weight and activation scales, scale = clip / 448, the clip
            chosen by `--fp8-activation-scale` (amax | percentile | mse) and `--fp8-weight-scale`
            (amax | mse); per-output-channel weights with `--fp8-weights per-channel` (ORT only)
  int8-sq   INT8 SmoothQuant W8A8 (TensorRT-LLM's W8A8_SQ_PER_CHANNEL_PER_TOKEN): per-output-channel
            weight scales; activations per token, scale = max |x_token| / 127 computed in the graph
            (`--int8-activation per-token`, the default on ORT) or one calibrated per-tensor scale
            (`static`, the only form TensorRT builds); smoothing factors
            s = amax_x^alpha / amax_w^(1 - alpha) folded into the weight before (the RMSNorm's,
            up_proj's columns, the value columns for o_proj; else an explicit Mul), alpha searched per layer on the calibration data by the layer's output
            error (graphs/quantization/search.py) unless `--smoothquant-alpha` forces one
  int8-wo   INT8 weight-only: per-output-channel weight scales, activations untouched
  int4-awq  INT4 weight-only (W4A16): symmetric block-wise weight scales along the input channels
            (block 128, or --int4-block-size 32/64), after AWQ's activation-aware per-input-channel
            scaling (graphs/quantization/awq.py, folded like SmoothQuant's); arithmetic in int4.py
  int4-rtn  the same without AWQ (round to nearest)
  KV fp8    (KV_CACHE=fp8, with any precision) per-layer K and V scales, K measured after RoPE

The statistics come from `graphs/quantization/calibrate.py` (PyTorch, one decoder layer at a time); this
module holds only numbers, so `graphs/` never needs torch.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llamaforge.export.config import ModelConfig
from llamaforge.graphs.quantization.int4 import DEFAULT_INT4_BLOCK_SIZE, INT4_BLOCK_SIZES, INT4_PRECISIONS

QUANT_PRECISIONS = ("fp8", "int8-sq", "int8-wo", *INT4_PRECISIONS)
WEIGHT_ONLY_PRECISIONS = ("int8-wo", *INT4_PRECISIONS)
# How ONNX Runtime runs the int8 and int4 engines (graphs/passes/lower_quant_ort.py, docs/quantization.md):
# fast = MatMulNBits with int8 activations inside the kernel (int8-sq's per-token form too);
# integer = int8-sq only: MatMulIntegerToFloat on the per-token codes; exact = the Q/DQ graph as written.
ORT_KERNELS = ("fast", "integer", "exact")
KV_CACHE_QUANT = ("fp8",)
FP8_MAX = 448.0  # largest finite float8 e4m3fn
INT8_MAX = 127.0  # symmetric: -127..127, so the range is the same both ways (TensorRT's convention)
DEFAULT_SMOOTHQUANT_ALPHA = 0.5  # the fixed alpha of SmoothQuant's paper; now only a forced value's example
INT8_ACTIVATIONS = ("per-token", "static")
# The smallest normal float32: a per-token scale never drops below it, so an all-zero token
# quantizes to zeros instead of dividing by 0 (max(amax / 127, floor) in the graph and the oracle).
PER_TOKEN_SCALE_FLOOR = float(np.finfo(np.float32).tiny)
SCALE_METHODS = ("amax", "percentile", "mse")  # fp8 activation scales; weights: amax | mse
FP8_WEIGHT_SCALES = ("amax", "mse")
FP8_WEIGHT_GRANULARITY = ("per-tensor", "per-channel")
# Defaults chosen by measurement (docs/quantization.md#fp8-scales): perplexity of both demo models
# with out-of-domain calibration text, every method side by side.
DEFAULT_FP8_ACTIVATION_SCALE = "amax"
DEFAULT_FP8_WEIGHT_SCALE = "amax"
DEFAULT_FP8_WEIGHTS = "per-tensor"
PERCENTILE = 99.99  # percentile of |x| over every calibration value (Model Optimizer's default)
# Clip candidates for the MSE searches, as fractions of amax: 1.0 down to 0.5 in steps of 0.025.
CLIP_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))

# Linear layers whose weights the exporter/passes pack into one MatMul: stats are kept per original.
PACKED_LINEARS = {".qkv_proj": (".q_proj", ".k_proj", ".v_proj")}


class QuantizationError(ValueError):
    """Bad quantization input or a graph breaking the rules; the message names the node or tensor."""


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize. `precision` is fp8 | int8-sq | int8-wo | None (weights untouched);
    `kv_cache` is fp8 | None."""

    precision: str | None = None
    kv_cache: str | None = None
    smoothquant_alpha: float | None = None  # int8-sq, int8-wo fast: None = searched per layer at calibration
    quantize_lm_head: bool = False  # the build sets it per precision and model: with_lm_head_default
    quantize_router: bool = False
    int4_block_size: int = DEFAULT_INT4_BLOCK_SIZE  # int4-*: input channels per weight scale
    ort_kernels: str = "fast"  # int8-wo / int8-sq / int4-*: ONNX Runtime kernels, see ORT_KERNELS
    int8_activation: str = "per-token"  # int8-sq: per-token (dynamic) | static (per-tensor, calibrated)
    fp8_activation_scale: str = DEFAULT_FP8_ACTIVATION_SCALE  # fp8: amax | percentile | mse
    fp8_weight_scale: str = DEFAULT_FP8_WEIGHT_SCALE  # fp8: amax | mse
    fp8_weights: str = DEFAULT_FP8_WEIGHTS  # fp8: per-tensor | per-channel

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in QUANT_PRECISIONS:
            raise QuantizationError(f"PRECISION={self.precision!r} is not a quantized precision {list(QUANT_PRECISIONS)}")
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE_QUANT:
            raise QuantizationError(f"KV_CACHE={self.kv_cache!r} is not one of {list(KV_CACHE_QUANT)}")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise QuantizationError(f"--smoothquant-alpha {self.smoothquant_alpha} must be in [0, 1]")
        for flag, value, allowed in (("--int8-activation", self.int8_activation, INT8_ACTIVATIONS),
                                     ("--fp8-activation-scale", self.fp8_activation_scale, SCALE_METHODS),
                                     ("--fp8-weight-scale", self.fp8_weight_scale, FP8_WEIGHT_SCALES),
                                     ("--fp8-weights", self.fp8_weights, FP8_WEIGHT_GRANULARITY)):
            if value not in allowed:
                raise QuantizationError(f"{flag} {value!r} is not one of {list(allowed)}")
        if self.int4_block_size not in INT4_BLOCK_SIZES:
            raise QuantizationError(f"--int4-block-size {self.int4_block_size} is not one of {list(INT4_BLOCK_SIZES)}")
        if self.ort_kernels not in ORT_KERNELS:
            raise QuantizationError(f"--ort-kernels {self.ort_kernels!r} is not one of {list(ORT_KERNELS)}")
        if self.ort_kernels == "integer" and (self.precision != "int8-sq" or self.int8_activation != "per-token"):
            raise QuantizationError(f"--ort-kernels integer is int8-sq's per-token integer GEMM; PRECISION="
                                    f"{self.precision} --int8-activation {self.int8_activation} has no such form")

    @property
    def active(self) -> bool:
        return self.precision is not None or self.kv_cache is not None

    def with_lm_head_default(self, tied_embeddings: bool) -> QuantConfig:
        """This config with `quantize_lm_head` at its measured default: on for the engines ONNX
        Runtime runs on MatMulNBits (`runs_matmulnbits`: int8-wo, int4-*, per-token int8-sq, on the
        fast kernels), off otherwise. The head is the largest single weight (a quarter of the bytes
        a decode step of the 125M bench model reads in int8, half in int4); left in fp32 those
        engines decode at about 0.6x onnxruntime-genai, which quantizes its head, and near 1.0x with
        it quantized, within every quality target (docs/benchmarks.md#make-bench-quant). Off where the head is tied to the embedding table, so
        the table stays stored once (share-tied-embedding), and for TensorRT (Model Optimizer's
        recipes keep lm_head unquantized by default)."""
        on = self.runs_matmulnbits and not tied_embeddings
        return replace(self, quantize_lm_head=on)

    @property
    def runs_matmulnbits(self) -> bool:
        """Whether ONNX Runtime runs this engine's linears as MatMulNBits at accuracy level 4 (int8
        activations inside the kernel): the weight-only precisions and per-token int8-sq, on the
        fast kernels. int8-sq then runs W8A8 as onnxruntime-genai's int8 does: its per-channel codes,
        activations rounded per token and block of input channels (finer than per token)."""
        per_token_sq = self.precision == "int8-sq" and self.int8_activation == "per-token"
        return self.ort_kernels == "fast" and (self.precision in WEIGHT_ONLY_PRECISIONS or per_token_sq)

    @property
    def smooths_int8_wo(self) -> bool:
        """int8-wo on ONNX Runtime's fast kernels: MatMulNBits at accuracy level 4 rounds each token's
        activations to int8 (per block of input channels) inside the kernel, which channel outliers
        ruin (+3.4% perplexity on the outlier test model, docs/quantization.md). So that recipe is
        smoothed first, as int8-sq is, with alpha searched for per-token int8 activations: the
        outliers move into the weights. The exact kernels compute with float activations and skip it."""
        return self.precision == "int8-wo" and self.ort_kernels == "fast"

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"precision": self.precision, "kv_cache": self.kv_cache,
                             "quantize_lm_head": self.quantize_lm_head, "quantize_router": self.quantize_router}
        if self.precision == "int8-sq" or self.smooths_int8_wo:
            d["smoothquant_alpha"] = self.smoothquant_alpha  # None (left out): searched, per layer in calibration
        if self.precision in ("fp8", "int8-sq") or self.smooths_int8_wo:
            d["scales"] = self.scales()
        if self.precision in INT4_PRECISIONS:
            d["int4_block_size"] = self.int4_block_size
        if self.precision in ("int8-wo", "int8-sq", *INT4_PRECISIONS):
            d["ort_kernels"] = self.ort_kernels
        return d

    def scales(self) -> dict[str, str]:
        """How the W8A8 precisions' scales are made, in words (the manifest's `quantization.scales`)."""
        if self.smooths_int8_wo:
            alpha = "searched per layer" if self.smoothquant_alpha is None else f"alpha={self.smoothquant_alpha}"
            return {"weights": "per output channel, amax / 127",
                    "activations": "int8 per token and block of input channels, inside MatMulNBits (accuracy level 4)",
                    "smoothquant": alpha}
        if self.precision == "int8-sq":
            act = ("per token, max |x_token| / 127 computed in the graph" if self.int8_activation == "per-token"
                   else "per tensor, calibrated amax / 127 (static)")
            alpha = "searched per layer" if self.smoothquant_alpha is None else f"alpha={self.smoothquant_alpha}"
            return {"weights": "per output channel, amax / 127", "activations": act, "smoothquant": alpha}
        act = {"amax": "calibrated amax", "percentile": f"{PERCENTILE}th percentile of calibrated |x|",
               "mse": "clip searched by the layer's output error"}[self.fp8_activation_scale]
        weight = {"amax": "amax", "mse": "clip searched by the weight's quantization error"}[self.fp8_weight_scale]
        granularity = "per output channel" if self.fp8_weights == "per-channel" else "per tensor"
        return {"weights": f"{granularity}, {weight} / 448", "activations": f"per tensor, {act} / 448"}


@dataclass
class CalibrationStats:
    """Absolute maxima measured on calibration data, keyed by the checkpoint's linear-layer names
    (`model.layers.0.self_attn.q_proj`, ..., `lm_head`).

    act_amax[linear]         per input channel, max |x| over every calibration token  [in]
    weight_in_amax[linear]   per input channel, max |W| over output channels            [in]
    weight_out_amax[linear]  per output channel, max |W| over input channels            [out]
    k_amax[layer], v_amax[layer]  per-tensor max |K after RoPE| and max |V|
    awq_scale[linear]        int4-awq: AWQ's per-input-channel scale s (x W = (x / s)(s W)) [in]
    awq_alpha[linear]        int4-awq: the exponent the search chose, s ~ mean|x|^alpha
    smoothquant_alpha[linear]  int8-sq: the alpha the search chose for the linear's input group
    act_clip[linear]         fp8 percentile / mse: the per-tensor activation clip (scale = clip / 448)
    search                   what the searches measured, per group (output errors), for the manifest
    """

    act_amax: dict[str, np.ndarray] = field(default_factory=dict)
    weight_in_amax: dict[str, np.ndarray] = field(default_factory=dict)
    weight_out_amax: dict[str, np.ndarray] = field(default_factory=dict)
    k_amax: list[float] = field(default_factory=list)
    v_amax: list[float] = field(default_factory=list)
    awq_scale: dict[str, np.ndarray] = field(default_factory=dict)
    awq_alpha: dict[str, float] = field(default_factory=dict)
    smoothquant_alpha: dict[str, float] = field(default_factory=dict)
    act_clip: dict[str, float] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # what was measured: file(s), tokens, sequences
    # A tensor-parallel rank's copy (graphs/quantization/sharding.py): the whole linear's per-tensor
    # max |W| and max |x| before its channels were cut, so per-tensor scales are the same on every
    # rank and equal to the unsharded model's. Derived, never saved.
    whole_weight_amax: dict[str, float] = field(default_factory=dict)
    whole_act_amax: dict[str, float] = field(default_factory=dict)
    # ... and a rank's column-parallel MoE expert weights ([E, in, out]): each expert's max |W| over
    # all its output channels [E], so fp8's per-expert scale is the unsharded one. Derived, never saved.
    whole_expert_amax: dict[str, np.ndarray] = field(default_factory=dict)
    # A TP build's row-parallel linears: the whole weight's per-output-channel amax after smoothing
    # (llamaforge/build/tensor_parallel.py reads it from the checkpoint), which `smoothed` installs in
    # place of the rank's re-measure of its own rows.
    smoothed_weight_out_amax: dict[str, np.ndarray] = field(default_factory=dict)

    def copy(self) -> CalibrationStats:
        return copy.deepcopy(self)

    def _parts(self, linear: str) -> list[str]:
        for packed, parts in PACKED_LINEARS.items():
            if linear.endswith(packed):
                base = linear[: -len(packed)]
                return [base + p for p in parts]
        return [linear]

    def _lookup(self, table: dict[str, np.ndarray], what: str, linear: str) -> list[np.ndarray]:
        parts = self._parts(linear)
        missing = [p for p in parts if p not in table]
        if missing:
            raise QuantizationError(f"calibration statistics have no {what} for {missing[0]!r} "
                                    f"(needed to quantize {linear!r}); known: {sorted(table)[:4]}...")
        return [table[p] for p in parts]

    def activation_amax(self, linear: str) -> np.ndarray:
        """[in]: the linear's input per channel (packed linears share one input)."""
        return np.maximum.reduce(self._lookup(self.act_amax, "activation amax", linear))

    def weight_amax_per_input(self, linear: str) -> np.ndarray:
        return np.maximum.reduce(self._lookup(self.weight_in_amax, "weight amax", linear))

    def weight_amax_per_output(self, linear: str) -> np.ndarray | None:
        """[out] (packed: the parts' outputs concatenated), or None when unknown (after smoothing)."""
        parts = self._parts(linear)
        if any(p not in self.weight_out_amax for p in parts):
            return None
        return np.concatenate([self.weight_out_amax[p] for p in parts])

    def weight_amax_per_tensor(self, linear: str, per_output: np.ndarray) -> float:
        """max |W| of the whole linear: the unsharded one's on a TP rank, else max of `per_output`."""
        parts = self._parts(linear)
        if all(p in self.whole_weight_amax for p in parts):
            return max(self.whole_weight_amax[p] for p in parts)
        return float(per_output.max())

    def activation_amax_per_tensor(self, linear: str) -> float:
        """max |x| of the linear's input: the unsharded one's on a TP rank, else from activation_amax."""
        parts = self._parts(linear)
        if all(p in self.whole_act_amax for p in parts):
            return max(self.whole_act_amax[p] for p in parts)
        return float(self.activation_amax(linear).max())

    def awq_factors(self, linear: str) -> np.ndarray:
        """[in]: AWQ's scale for `linear`'s input (a packed linear's parts share it: one input)."""
        parts = self._lookup(self.awq_scale, "AWQ scale", linear)
        if any(not np.array_equal(p, parts[0]) for p in parts[1:]):
            raise QuantizationError(f"calibration statistics give the parts of {linear!r} different AWQ scales; "
                                    "they read one input, so they must share one")
        return parts[0]

    def _shared(self, table: dict[str, float], what: str, linear: str) -> float:
        parts = self._parts(linear)
        missing = [p for p in parts if p not in table]
        if missing:
            raise QuantizationError(f"calibration statistics have no {what} for {missing[0]!r} (needed to quantize "
                                    f"{linear!r}): they were measured for another recipe; recalibrate")
        values = {table[p] for p in parts}
        if len(values) != 1:
            raise QuantizationError(f"calibration statistics give the parts of {linear!r} different {what}s {sorted(values)}; "
                                    "they read one input, so they must share one")
        return values.pop()

    def searched_alpha(self, linear: str) -> float:
        """int8-sq: the SmoothQuant alpha the calibration search chose for `linear`'s input group."""
        return self._shared(self.smoothquant_alpha, "searched SmoothQuant alpha", linear)

    def activation_clip(self, linear: str) -> float:
        """fp8 percentile / mse: the per-tensor activation clip the calibration search chose."""
        return self._shared(self.act_clip, "activation clip", linear)

    def describe(self) -> dict[str, Any]:
        """The manifest's `quantization.calibration`: the data, and what the searches chose on it."""
        d = dict(self.source)
        if self.smoothquant_alpha:
            d["smoothquant_alpha"] = dict(sorted(self.smoothquant_alpha.items()))
        if self.act_clip:
            d["activation_clip"] = dict(sorted(self.act_clip.items()))
        if self.search:
            d["search"] = self.search
        return d

    def smoothed(self, linear: str, s: np.ndarray) -> None:
        """Record that `linear`'s input was divided by s and its weight rows multiplied by s."""
        for p in self._parts(linear):
            self.act_amax[p] = self.act_amax[p] / s
            self.weight_in_amax[p] = self.weight_in_amax[p] * s
            if p in self.smoothed_weight_out_amax:  # a TP rank's row-parallel part: the whole weight's
                self.weight_out_amax[p] = self.smoothed_weight_out_amax[p]
            else:  # no longer derivable: the pass re-measures the weight
                self.weight_out_amax.pop(p, None)
            self.whole_weight_amax.pop(p, None)
            self.whole_act_amax.pop(p, None)

    def output_scaled(self, linear: str) -> None:
        """Record that `linear`'s weight columns were divided by a smoothing factor (SmoothQuant's 1/s
        for the next linear's input, folded into this one's output): its weight statistics no longer
        describe the weight, so the passes re-measure it. Its input is unchanged."""
        for p in self._parts(linear):
            self.weight_out_amax.pop(p, None)
            self.weight_in_amax.pop(p, None)
            self.whole_weight_amax.pop(p, None)

    # -- persistence (safetensors: what the TensorRT builder or a later build can reuse) ----------
    def save(self, path: Path) -> None:
        tensors = {f"act.{k}": v.astype(np.float32) for k, v in self.act_amax.items()}
        tensors |= {f"w_in.{k}": v.astype(np.float32) for k, v in self.weight_in_amax.items()}
        tensors |= {f"w_out.{k}": v.astype(np.float32) for k, v in self.weight_out_amax.items()}
        tensors["kv.k"] = np.asarray(self.k_amax, np.float32)
        tensors["kv.v"] = np.asarray(self.v_amax, np.float32)
        tensors |= {f"awq.{k}": v.astype(np.float32) for k, v in self.awq_scale.items()}
        tensors |= {f"awq_alpha.{k}": np.asarray([v], np.float32) for k, v in self.awq_alpha.items()}
        # float64: the values read back are the ones the passes used (the manifest lists them too)
        tensors |= {f"sq_alpha.{k}": np.asarray([v], np.float64) for k, v in self.smoothquant_alpha.items()}
        tensors |= {f"act_clip.{k}": np.asarray([v], np.float64) for k, v in self.act_clip.items()}
        save_file(tensors, str(path), metadata={"source": json.dumps(self.source), "search": json.dumps(self.search)})

    @classmethod
    def load(cls, path: Path) -> CalibrationStats:
        stats = cls()
        with safe_open(str(path), "np") as f:
            stats.source = json.loads((f.metadata() or {}).get("source", "{}"))
            stats.search = json.loads((f.metadata() or {}).get("search", "{}"))
            for key in f.keys():
                kind, _, name = key.partition(".")
                value = f.get_tensor(key)
                if kind == "kv":
                    (stats.k_amax if name == "k" else stats.v_amax).extend(float(x) for x in value)
                elif kind in ("awq_alpha", "sq_alpha", "act_clip"):
                    {"awq_alpha": stats.awq_alpha, "sq_alpha": stats.smoothquant_alpha, "act_clip": stats.act_clip}[kind][name] = \
                        float(value[0])
                else:
                    {"act": stats.act_amax, "w_in": stats.weight_in_amax, "w_out": stats.weight_out_amax,
                     "awq": stats.awq_scale}[kind][name] = value
        return stats


@dataclass
class QuantContext:
    """What the quantization passes share: the configuration and the statistics, which the
    SmoothQuant pass updates to describe the smoothed model (so the build passes its own copy)."""

    config: QuantConfig
    stats: CalibrationStats


# -- arithmetic (numpy; the tests' torch oracle mirrors it) -------------------------------------------


def scale_from_amax(amax: np.ndarray | float, qmax: float) -> np.ndarray:
    """Symmetric scale amax / qmax (float32); an all-zero channel gets scale 1 so nothing divides by 0."""
    a = np.asarray(amax, dtype=np.float32)
    return (np.where(a > 0, a, np.float32(qmax)) / np.float32(qmax)).astype(np.float32)


def quantize_int8(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """round-half-even(w / scale) clamped to [-127, 127], as ONNX QuantizeLinear rounds."""
    return np.clip(np.rint(w.astype(np.float32) / scale), -INT8_MAX, INT8_MAX).astype(np.int8)


def quantize_fp8(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """w / scale saturated to +-448 and rounded to float8 e4m3fn (ONNX QuantizeLinear, saturate=1)."""
    return np.clip(w.astype(np.float32) / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def smoothing_factors(act_amax: np.ndarray, weight_amax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel s = amax_x^alpha / amax_w^(1-alpha), in [1e-5, 1e5]; channels
    never active (or with an all-zero weight row) keep s = 1."""
    a = act_amax.astype(np.float64)
    w = weight_amax.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(a, alpha) / np.power(w, 1.0 - alpha)
    s = np.where((a > 0) & (w > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, 1e-5, 1e5).astype(np.float32)


# The linear that reads a self-attention output (not Llama 3.2 Vision's cross-attention, whose
# values come from the image states).
ATTENTION_OUTPUT_LINEAR = ".self_attn.o_proj"


def reads_attention_output(linear: str) -> bool:
    return linear.endswith(ATTENTION_OUTPUT_LINEAR)


@dataclass(frozen=True)
class ValueHeads:
    """o_proj's input channels as attention makes them: channel d of query head h is a softmax-weighted
    sum of channel d of value head h // group (grouped-query attention). A per-channel factor on that
    input equals a factor on the value projection's output columns only when it is the same on the
    `group` query heads that read one value head; then SmoothQuant's and AWQ's 1/s go exactly into
    the V columns of the packed QKV weight instead of an explicit Mul before o_proj (a kernel launch
    per layer and decode step: ~8% of an int8 decode step on the 125M bench model). So the searches
    and the passes tie o_proj's statistics over each such group before computing s from them."""

    head_dim: int
    group: int  # query heads per value head

    @classmethod
    def of(cls, config: ModelConfig) -> ValueHeads:
        return cls(config.head_dim, config.num_heads // config.num_kv_heads)

    def tie(self, per_channel: np.ndarray, reduce: Any = np.max) -> np.ndarray:
        """[heads * head_dim] -> the same shape, each channel replaced by `reduce` over its group."""
        c = per_channel.reshape(-1, self.group, self.head_dim)
        return np.broadcast_to(reduce(c, axis=1, keepdims=True), c.shape).reshape(per_channel.shape).copy()

    def per_value_channel(self, s: np.ndarray) -> np.ndarray | None:
        """[kv_heads * head_dim]: s's value per value-head channel, or None when s is not tied."""
        if s.size % (self.group * self.head_dim):
            return None
        c = s.reshape(-1, self.group, self.head_dim)
        return c[:, 0].reshape(-1).copy() if bool((c == c[:, :1]).all()) else None


def smoothquant_factors(act_amax: np.ndarray, weight_amax: np.ndarray, alpha: float,
                        heads: ValueHeads | None) -> np.ndarray:
    """SmoothQuant's s for one input group, the statistics first tied over query heads where the
    input is the attention output (`heads`: the attention's; None elsewhere). The one definition the
    pass and a TP build's unsharded weight scales both use."""
    if heads is not None:
        act_amax, weight_amax = heads.tie(act_amax), heads.tie(weight_amax)
    return smoothing_factors(act_amax, weight_amax, alpha)


def per_token_scale(x: np.ndarray) -> np.ndarray:
    """int8-sq's dynamic activation scale, one per token (row of the last axis), as the graph
    computes it: max(max |x_row| / 127, PER_TOKEN_SCALE_FLOOR) in float32, shape [..., 1]."""
    amax = np.abs(x.astype(np.float32)).max(axis=-1, keepdims=True)
    return np.maximum(amax / np.float32(INT8_MAX), np.float32(PER_TOKEN_SCALE_FLOOR)).astype(np.float32)


def fp8_weight_scale(w: np.ndarray, method: str, per_channel: bool) -> np.ndarray:
    """FP8 scale(s) of a MatMul weight w [in, out]: one per tensor ([]) or per output channel ([out]),
    clip / 448 with clip = amax ("amax") or the CLIP_GRID fraction of amax with the least squared
    quantization error of w ("mse"; per channel with per_channel)."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=0) if per_channel else np.abs(w).max()
    if method == "amax":
        return np.asarray(scale_from_amax(amax, FP8_MAX), dtype=np.float32)  # a 0-d array per tensor, not a scalar
    best = np.asarray(scale_from_amax(amax, FP8_MAX), dtype=np.float32)  # CLIP_GRID[0] = 1.0
    best_error = np.full(best.shape, np.inf)
    for r in CLIP_GRID:
        scale = scale_from_amax(amax * np.float32(r), FP8_MAX)
        error = ((quantize_fp8(w, scale).astype(np.float32) * scale - w) ** 2).sum(axis=0)
        error = error if per_channel else error.sum()
        better = error < best_error  # the first (largest) clip wins ties
        best = np.where(better, scale, best).astype(np.float32)
        best_error = np.where(better, error, best_error)
    return best



def is_router(name: str) -> bool:
    """MoE routers (Mixtral's `block_sparse_moe.gate`, Llama 4's `feed_forward.router`): kept in float
    by every recipe (a router's few logits pick the experts; rounding them changes the routing)."""
    return name.endswith(".router") or name.endswith(".gate")

# -- ONNX Runtime ----------------------------------------------------------------------------------

def ort_session_config(precision: str | None, kv_cache: str | None, ort_kernels: str = "fast") -> dict[str, str]:
    """Session config entries an engine of this precision needs under ONNX Runtime 1.31 (CPU), written
    to the manifest and applied by `runtime/core/engine.py`. Each was measured (docs/quantization.md):

    * int8 weight-only: ORT fuses DequantizeLinear(int8 per-channel) -> MatMul into `MatMulNBits`,
      whose default accuracy level 4 quantizes the *activations* to int8 on the fly (an error the
      graph does not contain: ~2% of the output range on a test layer). Level 1 keeps fp32 compute,
      so the fused kernel computes exactly the graph's DQ -> MatMul (differences ~1e-6).
    * int8 W8A8 (SmoothQuant): ORT fuses Q/DQ -> MatMul into `MatMulIntegerToFloat`. On x86 CPUs
      without VNNI (AVX2 and AVX-512 without VNNI, like this machine) its u8s8 kernel saturates
      int16 intermediate sums (errors ~17% of the output range on a test layer);
      `session.x64quantprecision=1` selects the exact u8u8 kernel.
    * fp8 (weights or KV cache): ORT 1.31 tries to fuse float8 Q/DQ -> MatMul into
      `MatMulIntegerToFloat`, which has no float8 kernel, and the session fails to load;
      `session.disable_quant_qdq=1` keeps the graph's Q/DQ as written (simulated fp8, fp32 MatMul).
    * `ort_kernels="fast"` (int8-wo, int4-*): `lower-quant-ort` has already written `MatMulNBits`
      nodes with their accuracy level (4); what stays a DQ -> MatMul (MoE experts) keeps level 1.
    * `ort_kernels="exact"`, int4: the fused level-1 MatMulNBits computes the graph's numbers with
      4-bit weights in memory. int8-wo: ORT's level-1 8-bit kernel dequantizes the whole weight on
      every call (0.2x fp32's decode speed, docs/quantization.md), so the exact int8 engine turns
      ORT's Q/DQ handling off instead: the weights' DequantizeLinear is constant-folded at load,
      exact numbers at fp32 speed, fp32 weights in memory (int8 on disk).
    """
    config: dict[str, str] = {}
    if precision == "int8-wo" and ort_kernels == "exact":
        config["session.disable_quant_qdq"] = "1"
    elif precision == "int8-wo" or precision in INT4_PRECISIONS:
        config["session.qdq_matmulnbits_accuracy_level"] = "1"
    if precision == "int8-sq":
        config["session.x64quantprecision"] = "1"
    if precision == "fp8" or kv_cache == "fp8":
        config["session.disable_quant_qdq"] = "1"
    return config
