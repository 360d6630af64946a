"""The pass pipeline: named passes, each verified after it runs, with `--dump-after` for debugging.

Modelled on LLVM's pass manager: a pipeline is a list of pass names; `--dump-after NAME` writes the
model as it stands after that pass (weights included) to `dump_dir/after-NAME.onnx`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from .passes.cleanup import Clean
from .passes.fusion import FuseQKV, FuseRMSNorm
from .passes.lower_attention import LowerAttentionForORT
from .passes.weights import FoldWeightTransposes
from .verify import verify

PASSES: dict[str, Callable[[], ir.passes.PassBase]] = {
    "fold-weight-transposes": FoldWeightTransposes,
    "clean": Clean,
    "fuse-rmsnorm": FuseRMSNorm,
    "fuse-qkv": FuseQKV,
    "lower-attention-ort": LowerAttentionForORT,
}

# Per backend: what runs, in order. The plugin op stays intact until the backend's lowering.
PIPELINES: dict[str, list[str]] = {
    "ort": ["fold-weight-transposes", "clean", "fuse-qkv", "fuse-rmsnorm", "lower-attention-ort", "clean"],
}


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
                 dump_dir: Path | None = None, log: Callable[[str], None] = print) -> PipelineReport:
    unknown = [p for p in [*passes, *dump_after] if p not in PASSES]
    if unknown:
        raise PipelineError(f"unknown pass(es) {unknown}; known: {sorted(PASSES)}")
    missing = [p for p in dump_after if p not in passes]
    if missing:
        raise PipelineError(f"--dump-after {missing}: not in this pipeline ({list(passes)})")
    report = PipelineReport()
    verify(model, "export")
    for name in passes:
        start = time.perf_counter()
        result = PASSES[name]()(model)
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
