"""`clean` (graphs/passes/cleanup.py): folds small constants (never weights), drops identities and
dead nodes, merges common subexpressions and re-sorts; the function the graph computes is unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest
from small_graphs import op_counts, run_ort, small_model

from llamaforge.graphs.passes.cleanup import Clean
from llamaforge.graphs.verify import VerificationError, verify

FLOAT = onnx.TensorProto.FLOAT
make_node = onnx.helper.make_node
RNG = np.random.default_rng(0)
BIG = (96, 96)  # 9216 elements: past clean's 8192-element folding limit, like any real weight


def constant(name: str, array: np.ndarray) -> onnx.NodeProto:
    return make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(array))


def messy_model(order: slice = slice(None)) -> ir.Model:
    """x [6] -> Reshape to a shape computed from two Constants (foldable) through an Identity, two
    identical Relus (one subexpression), a dead Neg, a MatMul by `big * 2` (a weight times a constant:
    too big to fold) and by a small folded Mul."""
    nodes = [
        constant("dims", np.array([2, 3], np.int64)),
        constant("ones", np.array([1, 1], np.int64)),
        make_node("Mul", ["dims", "ones"], ["shape"]),
        make_node("Identity", ["x"], ["x_again"]),
        make_node("Reshape", ["x_again", "shape"], ["x2d"]),
        make_node("Relu", ["x2d"], ["relu_a"]),
        make_node("Relu", ["x2d"], ["relu_b"]),
        make_node("Neg", ["x2d"], ["unused"]),
        make_node("Add", ["relu_a", "relu_b"], ["summed"]),
        make_node("Mul", ["small", "two"], ["small_x2"]),
        make_node("MatMul", ["summed", "small_x2"], ["projected"]),
        make_node("Mul", ["big", "two"], ["big_x2"]),
        make_node("ReduceSum", ["big_x2"], ["big_sum"], keepdims=0),
        make_node("Add", ["projected", "big_sum"], ["y"]),
    ][order]
    rng = np.random.default_rng(1)  # the same weights on every call
    return small_model(nodes, {"x": (FLOAT, [6])}, {"y": (FLOAT, [2, 3])},
                       {"small": rng.standard_normal((3, 3)).astype(np.float32), "two": np.array(2.0, np.float32),
                        "big": rng.standard_normal(BIG).astype(np.float32)})


def clean_and_check(model: ir.Model) -> None:
    """Run `clean` and assert its promise on `messy_model`: the Constants, the shape Mul and the
    small weight's Mul folded, no Identity, one Relu, no dead Neg, the big weight's Mul kept (and the
    weight itself untouched), a valid sorted graph, the same outputs under ONNX Runtime."""
    x = RNG.standard_normal(6).astype(np.float32)
    big = model.graph.initializers["big"].const_value
    (want,) = run_ort(model, {"x": x})

    assert Clean()(model).modified
    verify(model, "clean")
    counts = op_counts(model)
    assert counts[("", "Constant")] == 0 and counts[("", "Identity")] == 0 and counts[("", "Neg")] == 0
    assert counts[("", "Relu")] == 1
    assert counts[("", "Mul")] == 1  # big * 2 only
    (mul,) = [n for n in model.graph if n.op_type == "Mul"]
    assert mul.inputs[0] is model.graph.initializers["big"] and mul.inputs[0].const_value is big
    (got,) = run_ort(model, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_clean_folds_dedupes_and_drops_but_keeps_weights_and_function() -> None:
    clean_and_check(messy_model())


def test_clean_sorts_an_unsorted_graph() -> None:
    model = messy_model(slice(None, None, -1))  # every node before its producers
    with pytest.raises(VerificationError, match="topologically sorted"):
        verify(model, "export")
    x = RNG.standard_normal(6).astype(np.float32)
    (want,) = run_ort(messy_model(), {"x": x})
    Clean()(model)
    verify(model, "clean")
    (got,) = run_ort(model, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_clean_keeps_dequantize_of_a_stored_weight() -> None:
    """Quantized weights stay quantized: `clean` runs after the quantization passes and must not fold
    DequantizeLinear(int8 weight) back into a float weight (pipeline.py relies on it)."""
    model = small_model([make_node("DequantizeLinear", ["w_q", "scale", "zero"], ["w"], axis=1),
                         make_node("MatMul", ["x", "w"], ["y"])],
                        {"x": (FLOAT, [2, 4])}, {"y": (FLOAT, [2, 3])},
                        {"w_q": RNG.integers(-127, 128, (4, 3)).astype(np.int8),
                         "scale": np.full(3, 0.01, np.float32), "zero": np.zeros(3, np.int8)})
    Clean()(model)
    assert op_counts(model)[("", "DequantizeLinear")] == 1
    assert model.graph.initializers["w_q"].const_value.dtype == ir.DataType.INT8


class KeepEverything(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


def test_a_clean_that_keeps_dead_nodes_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "RemoveUnusedNodesPass", KeepEverything)
    with pytest.raises(AssertionError):
        clean_and_check(messy_model())
