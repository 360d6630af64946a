"""The pass pipeline: named passes, each verified after it runs, with `--dump-after` for debugging.

Modelled on LLVM's pass manager: a pipeline is a list of pass names; `--dump-after NAME` writes the
model as it stands after that pass (weights included) to `dump_dir/after-NAME.onnx`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx_ir as ir

from llamaforge.graphs.passes.cleanup import Clean
from llamaforge.graphs.passes.fusion import FuseQKV, FuseRMSNorm
from llamaforge.graphs.passes.lower_all_reduce import LowerAllReduceForORT, LowerAllReduceForTensorRT
from llamaforge.graphs.passes.lower_attention import LowerAttentionForORT
from llamaforge.graphs.passes.lower_cross_attention import LowerCrossAttentionForORT
from llamaforge.graphs.passes.lower_moe import LowerMoEForORT
from llamaforge.graphs.passes.lower_quant_ort import LowerQuantForORT
from llamaforge.graphs.passes.quantize import QuantizeKVCache, QuantizeMatMuls, SmoothQuant
from llamaforge.graphs.passes.quantize_experts import QuantizeExperts
from llamaforge.graphs.passes.quantize_int4 import AWQScale, QuantizeInt4
from llamaforge.graphs.passes.tied_embedding import ShareTiedEmbedding
from llamaforge.graphs.passes.validate_quant import ValidateQuantization
from llamaforge.graphs.passes.weights import FoldWeightTransposes
from llamaforge.graphs.quantization.recipes import QuantConfig, QuantContext
from llamaforge.graphs.trt_ops import CheckTensorRTOps
from llamaforge.graphs.verify import verify

PASSES: dict[str, Callable[[], ir.passes.PassBase]] = {
    "fold-weight-transposes": FoldWeightTransposes,
    "clean": Clean,
    "fuse-rmsnorm": FuseRMSNorm,
    "fuse-qkv": FuseQKV,
    "lower-attention-ort": LowerAttentionForORT,
    "lower-cross-attention-ort": LowerCrossAttentionForORT,
    "lower-moe-ort": LowerMoEForORT,
    "lower-all-reduce-ort": LowerAllReduceForORT,  # TP rank graphs; no change at TP=1
    "lower-all-reduce-trt": LowerAllReduceForTensorRT,
    "share-tied-embedding": ShareTiedEmbedding,
    "check-trt-ops": CheckTensorRTOps,
}

# Per backend: what runs, in order. The plugin op stays intact until the backend's lowering.
PIPELINES: dict[str, list[str]] = {
    "ort": ["fold-weight-transposes", "clean", "fuse-qkv", "fuse-rmsnorm", "lower-moe-ort", "lower-attention-ort",
            "lower-cross-attention-ort", "lower-all-reduce-ort", "share-tied-embedding", "clean"],
}

# Quantization passes need the build's calibration statistics: made from a `QuantContext`.
QUANT_PASSES: dict[str, Callable[[QuantContext], ir.passes.PassBase]] = {
    "quantize-kv-fp8": QuantizeKVCache,
    "smooth-int8": SmoothQuant,
    "quantize-fp8": lambda ctx: QuantizeMatMuls(ctx, "fp8"),
    "quantize-int8-sq": lambda ctx: QuantizeMatMuls(ctx, "int8-sq"),
    "quantize-int8-wo": lambda ctx: QuantizeMatMuls(ctx, "int8-wo"),
    "quantize-experts-fp8": lambda ctx: QuantizeExperts(ctx, "fp8"),  # MoE experts, after lower-moe-ort
    "quantize-experts-int8-wo": lambda ctx: QuantizeExperts(ctx, "int8-wo"),
    "validate-quantization": ValidateQuantization,
    "awq-scale": AWQScale,
    "quantize-int4": QuantizeInt4,
    "quantize-experts-int4": lambda ctx: QuantizeExperts(ctx, ctx.config.precision or "int4-rtn"),
    "lower-quant-ort": LowerQuantForORT,  # MatMulNBits; after validate-quantization, ORT only
}
WEIGHT_QUANT_PASSES = {"fp8": ["quantize-fp8", "quantize-experts-fp8"], "int8-sq": ["smooth-int8", "quantize-int8-sq"],
                       "int8-wo": ["quantize-int8-wo", "quantize-experts-int8-wo"]}
WEIGHT_QUANT_PASSES |= {"int4-awq": ["awq-scale", "quantize-int4", "quantize-experts-int4"],
                        "int4-rtn": ["quantize-int4", "quantize-experts-int4"]}
# Precisions whose MatMuls `lower-quant-ort` turns into MatMulNBits (with --ort-kernels fast), or
# int8-sq's per-token form into ORT's integer GEMM (MatMulIntegerToFloat, --ort-kernels integer).
ORT_LOWERED_PRECISIONS = ("int8-wo", "int8-sq", "int4-awq", "int4-rtn")


def pipeline(backend: str, quant: QuantConfig | None = None) -> list[str]:
    """The pass list for a backend and (optional) quantization; what `build` runs and what a
    backend builder (e.g. TensorRT's) should reuse so every backend gets the same Q/DQ graph.

    Quantization runs after the fusions and before the backend's lowering (`lower-attention-*`):
    the KV-cache pass sets scales on the attention op, which the lowering implements, and the
    validator checks the backend-neutral Q/DQ graph, the one TensorRT parses. (`clean` never folds
    Q/DQ: onnxscript's constant folding keeps them by design.)
    """
    if backend == "trt" and "trt" in PIPELINES:  # the ORT graph of this precision, minus ORT-only passes
        # --ort-kernels chooses ONNX Runtime kernels: TensorRT gets the Q/DQ graph of the exact ones
        return trt_passes(pipeline("ort", replace(quant, ort_kernels="exact") if quant is not None else None))
    if backend not in PIPELINES:
        raise PipelineError(f"no pass pipeline for backend {backend!r}; known: {sorted(PIPELINES)}")
    names = list(PIPELINES[backend])
    if quant is None or not quant.active:
        return names
    lowering = next((i for i, n in enumerate(names) if n.startswith("lower-attention")), len(names))
    kv = ["quantize-kv-fp8"] if quant.kv_cache == "fp8" else []
    weights = WEIGHT_QUANT_PASSES.get(quant.precision or "", [])
    if quant.smooths_int8_wo:  # the fast kernel quantizes activations: outlier channels go into the weights first
        weights = ["smooth-int8", *weights]
    # MatMulNBits after the attention lowering: the plugin op's shape inference (run by the checker
    # after every pass) needs typed inputs, and the checker cannot type a com.microsoft op's output.
    lowered = quant.precision in ORT_LOWERED_PRECISIONS and quant.ort_kernels in ("fast", "integer")
    fast = ["lower-quant-ort"] if lowered else []
    return names[:lowering] + kv + weights + ["validate-quantization"] + names[lowering:lowering + 1] + fast + names[lowering + 1:]


# Passes that only make sense for ONNX Runtime: its com.microsoft fusions/kernels and the plugin
# op's lowering. TensorRT keeps the plugin node (plugins/attention/trt_plugin.py implements it).
ORT_ONLY_PASSES = frozenset({"fuse-rmsnorm", "lower-attention-ort", "lower-cross-attention-ort", "lower-quant-ort",
                             "lower-all-reduce-ort"})


def trt_passes(ort_passes: Sequence[str]) -> list[str]:
    """The TensorRT pipeline for a precision: the ORT pipeline of that precision (its quantization
    passes included) without the ORT-only passes, ending with the all-reduce's TensorRT form (TP rank
    graphs: TensorRT-LLM's NCCL plugin) and the TensorRT op-support check."""
    kept = [p for p in ort_passes if p not in ORT_ONLY_PASSES]
    kept = [p for i, p in enumerate(kept) if not (p == "clean" and i and kept[i - 1] == "clean")]  # no clean twice
    return [*kept, "lower-all-reduce-trt", "check-trt-ops"]


PIPELINES["trt"] = trt_passes(PIPELINES["ort"])


class PipelineError(ValueError):
    pass


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float


@dataclass
class PipelineReport:
    records: list[PassRecord] = field(default_factory=list)

    def names(self) -> list[str]:
        return [r.name for r in self.records]


def run_pipeline(model: ir.Model, passes: Sequence[str], dump_after: Sequence[str] = (),
                 dump_dir: Path | None = None, log: Callable[[str], None] = print,
                 quant: QuantContext | None = None) -> PipelineReport:
    unknown = [p for p in [*passes, *dump_after] if p not in PASSES and p not in QUANT_PASSES]
    if unknown:
        raise PipelineError(f"unknown pass(es) {unknown}; known: {sorted([*PASSES, *QUANT_PASSES])}")
    needs_stats = [p for p in passes if p in QUANT_PASSES]
    if needs_stats and quant is None:
        raise PipelineError(f"pass(es) {needs_stats} need calibration statistics (a QuantContext)")
    missing = [p for p in dump_after if p not in passes]
    if missing:
        raise PipelineError(f"--dump-after {missing}: not in this pipeline ({list(passes)})")
    report = PipelineReport()
    verify(model, "export")
    for name in passes:
        start = time.perf_counter()
        result = (QUANT_PASSES[name](quant) if name in QUANT_PASSES else PASSES[name]())(model)  # type: ignore[arg-type]
        model = result.model
        verify(model, f"pass '{name}'")
        seconds = time.perf_counter() - start
        report.records.append(PassRecord(name, result.modified, seconds))
        log(f"  pass {name:<24} {'changed' if result.modified else 'no change':<10} {seconds:6.2f}s  verified")
        if name in dump_after:
            assert dump_dir is not None
            dump_dir.mkdir(parents=True, exist_ok=True)
            path = dump_dir / f"after-{name}.onnx"
            ir.save(model, path, external_data=path.name + ".data")
            log(f"  dumped {path}")
    return report
