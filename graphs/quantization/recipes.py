"""Explicit (Q/DQ) quantization: the precisions, the calibration statistics the passes consume, and
the quantization arithmetic shared by the passes, the tests' oracle and the benchmark.

Everything follows TensorRT's explicit-quantization rules: symmetric scales with zero point 0, a
QuantizeLinear -> DequantizeLinear pair right before each MatMul activation input, and weights
stored quantized with a DequantizeLinear in front of the MatMul.

  fp8       FP8 E4M3 W8A8: per-tensor weight and activation scales, scale = amax / 448
  int8-sq   INT8 SmoothQuant W8A8: per-output-channel weight scales, per-tensor activation scales,
            smoothing factors s = amax_x^alpha / amax_w^(1 - alpha) folded into the preceding
            RMSNorm weights (else an explicit Mul); scale = amax / 127
  int8-wo   INT8 weight-only: per-output-channel weight scales, activations untouched
  KV fp8    (KV_CACHE=fp8, with any precision) per-layer K and V scales, K measured after RoPE

The statistics come from `graphs/quantization/calibrate.py` (PyTorch, one decoder layer at a time); this
module holds only numbers, so `graphs/` never needs torch.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

QUANT_PRECISIONS = ("fp8", "int8-sq", "int8-wo")
KV_CACHE_QUANT = ("fp8",)
FP8_MAX = 448.0  # largest finite float8 e4m3fn
INT8_MAX = 127.0  # symmetric: -127..127, so the range is the same both ways (TensorRT's convention)
DEFAULT_SMOOTHQUANT_ALPHA = 0.5

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
    smoothquant_alpha: float = DEFAULT_SMOOTHQUANT_ALPHA
    quantize_lm_head: bool = False  # lm_head (and MoE routers) stay in the activation dtype by default
    quantize_router: bool = False

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in QUANT_PRECISIONS:
            raise QuantizationError(f"PRECISION={self.precision!r} is not a quantized precision {list(QUANT_PRECISIONS)}")
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE_QUANT:
            raise QuantizationError(f"KV_CACHE={self.kv_cache!r} is not one of {list(KV_CACHE_QUANT)}")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise QuantizationError(f"SmoothQuant alpha={self.smoothquant_alpha} must be in [0, 1]")

    @property
    def active(self) -> bool:
        return self.precision is not None or self.kv_cache is not None

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"precision": self.precision, "kv_cache": self.kv_cache,
                             "quantize_lm_head": self.quantize_lm_head, "quantize_router": self.quantize_router}
        if self.precision == "int8-sq":
            d["smoothquant_alpha"] = self.smoothquant_alpha
        return d


@dataclass
class CalibrationStats:
    """Absolute maxima measured on calibration data, keyed by the checkpoint's linear-layer names
    (`model.layers.0.self_attn.q_proj`, ..., `lm_head`).

    act_amax[linear]         per input channel, max |x| over every calibration token  [in]
    weight_in_amax[linear]   per input channel, max |W| over output channels            [in]
    weight_out_amax[linear]  per output channel, max |W| over input channels            [out]
    k_amax[layer], v_amax[layer]  per-tensor max |K after RoPE| and max |V|
    """

    act_amax: dict[str, np.ndarray] = field(default_factory=dict)
    weight_in_amax: dict[str, np.ndarray] = field(default_factory=dict)
    weight_out_amax: dict[str, np.ndarray] = field(default_factory=dict)
    k_amax: list[float] = field(default_factory=list)
    v_amax: list[float] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # what was measured: file(s), tokens, sequences

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

    def smoothed(self, linear: str, s: np.ndarray) -> None:
        """Record that `linear`'s input was divided by s and its weight rows multiplied by s."""
        for p in self._parts(linear):
            self.act_amax[p] = self.act_amax[p] / s
            self.weight_in_amax[p] = self.weight_in_amax[p] * s
            self.weight_out_amax.pop(p, None)  # no longer derivable: the pass re-measures the weight

    # -- persistence (safetensors: what the TensorRT builder or a later build can reuse) ----------
    def save(self, path: Path) -> None:
        tensors = {f"act.{k}": v.astype(np.float32) for k, v in self.act_amax.items()}
        tensors |= {f"w_in.{k}": v.astype(np.float32) for k, v in self.weight_in_amax.items()}
        tensors |= {f"w_out.{k}": v.astype(np.float32) for k, v in self.weight_out_amax.items()}
        tensors["kv.k"] = np.asarray(self.k_amax, np.float32)
        tensors["kv.v"] = np.asarray(self.v_amax, np.float32)
        save_file(tensors, str(path), metadata={"source": json.dumps(self.source)})

    @classmethod
    def load(cls, path: Path) -> CalibrationStats:
        stats = cls()
        with safe_open(str(path), "np") as f:
            stats.source = json.loads((f.metadata() or {}).get("source", "{}"))
            for key in f.keys():
                kind, _, name = key.partition(".")
                value = f.get_tensor(key)
                if kind == "kv":
                    (stats.k_amax if name == "k" else stats.v_amax).extend(float(x) for x in value)
                else:
                    {"act": stats.act_amax, "w_in": stats.weight_in_amax, "w_out": stats.weight_out_amax}[kind][name] = value
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


# -- ONNX Runtime ----------------------------------------------------------------------------------

def ort_session_config(precision: str | None, kv_cache: str | None) -> dict[str, str]:
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
    """
    config: dict[str, str] = {}
    if precision == "int8-wo":
        config["session.qdq_matmulnbits_accuracy_level"] = "1"
    if precision == "int8-sq":
        config["session.x64quantprecision"] = "1"
    if precision == "fp8" or kv_cache == "fp8":
        config["session.disable_quant_qdq"] = "1"
    return config
