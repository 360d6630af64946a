"""Generic clean-up: constant folding, dead code, identities, duplicate subexpressions."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer._constant_folding as constant_folding


class Clean(ir.passes.InPlacePass):
    """Fold small constants (never weights: the size limit keeps folding away from them),
    drop identities and dead nodes, merge common subexpressions, re-sort."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        passes = ir.passes.Sequential(
            constant_folding.FoldConstantsPass(shape_inference=False, input_size_limit=8192, output_size_limit=8192),
            common.IdentityEliminationPass(),
            common.CommonSubexpressionEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedOpsetsPass(),
            common.TopologicalSortPass(),
        )
        result = passes(model)
        return ir.passes.PassResult(result.model, result.modified)
