"""`fold-weight-transposes` (graphs/passes/weights.py): Transpose of a constant 2-D weight, what
nn.Linear traces to, becomes one pre-transposed, lazily computed initializer `<name>.T`."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from small_graphs import op_counts, run_ort, small_model

from llamaforge.graphs.passes import weights
from llamaforge.graphs.passes.weights import FoldWeightTransposes
from llamaforge.graphs.verify import verify

FLOAT = onnx.TensorProto.FLOAT
W = "model.layers.0.mlp.up_proj.weight"  # [out, in], as a checkpoint stores it
RNG = np.random.default_rng(0)


def linear_model(weight: np.ndarray, readers: int = 1, perm: list[int] | None = None) -> ir.Model:
    """x [batch, in] -> `readers` x (Transpose(W) -> MatMul), summed; W [out, in] an initializer."""
    out, inp = weight.shape
    transpose = {"perm": perm} if perm is not None else {}
    nodes = [onnx.helper.make_node("Transpose", [W], ["wt"], **transpose)]
    nodes += [onnx.helper.make_node("MatMul", ["x", "wt"], [f"y{i}"]) for i in range(readers)]
    nodes += [onnx.helper.make_node("Sum", [f"y{i}" for i in range(readers)], ["y"])]
    return small_model(nodes, {"x": (FLOAT, ["batch", inp])}, {"y": (FLOAT, ["batch", out])}, {W: weight})


def fold_and_check(weight: np.ndarray) -> None:
    """Run the pass on `linear_model(weight)` and assert its promise: no Transpose left, the MatMul
    reads a lazy `<name>.T` initializer holding W.T, and ONNX Runtime gives the unfolded outputs."""
    x = RNG.standard_normal((2, weight.shape[1])).astype(np.float32)
    model = linear_model(weight)
    (want,) = run_ort(model, {"x": x})

    assert FoldWeightTransposes()(model).modified
    verify(model, "fold-weight-transposes")
    assert op_counts(model)[("", "Transpose")] == 0
    folded = model.graph.initializers[f"{W}.T"]
    assert isinstance(folded.const_value, ir.LazyTensor)  # computed when the engine is written
    assert folded.shape.numpy() == weight.T.shape
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    assert matmul.inputs[1] is folded
    (got,) = run_ort(model, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 5), (4, 4)])
def test_transpose_of_a_weight_becomes_a_pre_transposed_initializer(shape: tuple[int, int]) -> None:
    fold_and_check(RNG.standard_normal(shape).astype(np.float32))


def test_perm_1_0_folds_and_readers_share_one_transposed_weight() -> None:
    weight = RNG.standard_normal((4, 6)).astype(np.float32)
    model = linear_model(weight, readers=2, perm=[1, 0])
    assert FoldWeightTransposes()(model).modified
    transposed = [name for name in model.graph.initializers if name.endswith(".T")]
    assert transposed == [f"{W}.T"]
    assert {n.inputs[1].name for n in model.graph if n.op_type == "MatMul"} == {f"{W}.T"}


@pytest.mark.parametrize("case", ["activation", "rank-3", "identity-perm"])
def test_leaves_alone_what_is_not_a_2d_weight_transpose(case: str) -> None:
    """A Transpose of an activation, of a 3-D constant or with a perm that is not a 2-D transpose
    must stay as it is."""
    if case == "activation":
        model = small_model([onnx.helper.make_node("Transpose", ["x"], ["y"])],
                            {"x": (FLOAT, [2, 3])}, {"y": (FLOAT, [3, 2])})
    elif case == "rank-3":
        model = small_model([onnx.helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 1]),
                             onnx.helper.make_node("MatMul", ["x", "t"], ["y"])],
                            {"x": (FLOAT, [2, 3, 4])}, {"y": (FLOAT, [2, 3, 3])},
                            {"c": RNG.standard_normal((2, 3, 4)).astype(np.float32)})
    else:
        weight = RNG.standard_normal((4, 4)).astype(np.float32)
        model = linear_model(weight, perm=[0, 1])
    before = op_counts(model)
    assert not FoldWeightTransposes()(model).modified
    assert op_counts(model) == before and not any(name.endswith(".T") for name in model.graph.initializers)


def test_a_fold_that_forgets_to_transpose_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """`fold_and_check` rejects a pass whose new weight is the source untransposed (a square weight,
    so the graph stays well-typed and only the numbers are wrong)."""
    original = weights.lazy_weight
    monkeypatch.setattr(weights, "lazy_weight", lambda name, sources, fn, dtype, shape:
                        original(name, sources, lambda w: w, dtype, shape))
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        fold_and_check(RNG.standard_normal((4, 4)).astype(np.float32))
