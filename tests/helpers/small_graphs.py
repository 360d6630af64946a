"""Small hand-built ONNX graphs for the graph-pass unit tests (a helper module, not a test file).

    model = small_model([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
                        inputs={"x": (FLOAT, ["batch", 4])}, outputs={"y": (FLOAT, ["batch", 3])},
                        initializers={"w": np.ones((4, 3), np.float32)})
    (y,) = run_ort(model, {"x": x})        # ONNX Runtime on a serialized copy; `model` is untouched
    op_counts(model)                       # Counter of (domain, op_type), Loop/If bodies included
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

ValueSpec = tuple[int, Sequence[int | str | None]]  # (onnx.TensorProto element type, shape)


def small_model(nodes: Sequence[onnx.NodeProto], inputs: Mapping[str, ValueSpec], outputs: Mapping[str, ValueSpec],
                initializers: Mapping[str, np.ndarray] | None = None,
                opsets: Mapping[str, int] | None = None) -> ir.Model:
    """An onnx-ir model of `nodes` (opset 23 plus `opsets`, e.g. {"llamaforge": 1}); the
    initializers are numpy arrays, stored with their names."""
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        list(nodes), "small",
        [vi(name, elem, list(shape)) for name, (elem, shape) in inputs.items()],
        [vi(name, elem, list(shape)) for name, (elem, shape) in outputs.items()],
        [onnx.numpy_helper.from_array(array, name) for name, array in (initializers or {}).items()],
    )
    imports = [onnx.helper.make_opsetid("", 23)] + [onnx.helper.make_opsetid(d, v) for d, v in (opsets or {}).items()]
    return ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=imports, ir_version=10))


def run_ort(model: ir.Model, feeds: Mapping[str, np.ndarray],
            session_config: Mapping[str, str] | None = None) -> list[np.ndarray]:
    """All graph outputs, in order, from ONNX Runtime (CPU, graph optimizations off so the graph runs
    as written; lazy weights are computed when the copy is serialized)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for key, value in (session_config or {}).items():
        options.add_session_config_entry(key, value)
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, dict(feeds))


def op_counts(model: ir.Model) -> Counter[tuple[str, str]]:
    """How many nodes of each (domain, op_type), subgraphs included."""
    return Counter((n.domain, n.op_type) for n in ir.traversal.RecursiveGraphIterator(model.graph))


def copy_model(model: ir.Model) -> ir.Model:
    """An independent copy (a serialization round trip), to run a pass on one and compare with the other."""
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


MLP_LAYER = "model.layers.0.mlp"


def mlp_linears(hidden: int, ffn: int) -> dict[str, tuple[int, int]]:
    """The MLP's linears by module name, with their weights' [in, out] shapes."""
    return {f"{MLP_LAYER}.gate_proj": (hidden, ffn), f"{MLP_LAYER}.up_proj": (hidden, ffn),
            f"{MLP_LAYER}.down_proj": (ffn, hidden)}


def mlp_model(hidden: int, ffn: int, vocab: int, seed: int = 0) -> ir.Model:
    """x -> RMSNormalization -> gate/up (sharing the normalised input) -> Mul -> down -> lm_head -> logits,
    the quantization passes' test graph. Weights [in, out] named `<module>.weight.T`, as after
    fold-weight-transposes; the norm weight is `gamma`."""
    make_node, real = onnx.helper.make_node, onnx.TensorProto.FLOAT
    rng = np.random.default_rng(seed)
    layer = MLP_LAYER
    weights = {f"{name}.weight.T": (0.3 * rng.standard_normal(shape)).astype(np.float32)
               for name, shape in mlp_linears(hidden, ffn).items()}
    weights["lm_head.weight.T"] = rng.standard_normal((hidden, vocab)).astype(np.float32)
    weights["gamma"] = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32)
    nodes = [make_node("RMSNormalization", ["x", "gamma"], ["normed"], axis=-1, epsilon=1e-5, stash_type=1),
             make_node("MatMul", ["normed", f"{layer}.gate_proj.weight.T"], ["gate"]),
             make_node("MatMul", ["normed", f"{layer}.up_proj.weight.T"], ["up"]),
             make_node("Mul", ["gate", "up"], ["act"]),
             make_node("MatMul", ["act", f"{layer}.down_proj.weight.T"], ["down"]),
             make_node("MatMul", ["down", "lm_head.weight.T"], ["logits"])]
    return small_model(nodes, {"x": (real, ["batch", hidden])}, {"logits": (real, ["batch", vocab])}, weights)
