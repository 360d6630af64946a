"""The ranks' all-reduce kernel (runtime/parallel/collective.py) under mpiexec: 2 rank processes
run an ONNX graph holding `ai.onnx.contrib::LlamaforgeAllReduce`; each gets the sum of both."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from llamaforge.runtime.parallel import collective

RANK_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import onnxruntime as ort
    from mpi4py import MPI
    from llamaforge.runtime.parallel import collective

    comm = MPI.COMM_WORLD
    collective.bind_communicator(comm)
    session = ort.InferenceSession(sys.argv[1], collective.session_options(),
                                   providers=["CPUExecutionProvider"])
    x = np.arange(6, dtype=np.float32).reshape(2, 3) * (comm.rank + 1)
    (y,) = session.run(None, {"x": x})
    np.save(f"{sys.argv[2]}/rank{comm.rank}.npy", y)
""")


def all_reduce_graph(path: Path) -> None:
    node = helper.make_node(collective.ALL_REDUCE_OP_TYPE, ["x"], ["h"], domain=collective.ALL_REDUCE_DOMAIN)
    double = helper.make_node("Add", ["h", "h"], ["y"])
    graph = helper.make_graph([node, double], "all_reduce",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", 3])])
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 23), helper.make_opsetid(collective.ALL_REDUCE_DOMAIN, 1)])
    onnx.save(model, path)


def test_two_ranks_each_get_the_sum(tmp_path: Path) -> None:
    all_reduce_graph(tmp_path / "g.onnx")
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    subprocess.run([str(mpiexec), "-n", "2", sys.executable, str(tmp_path / "rank.py"),
                    str(tmp_path / "g.onnx"), str(tmp_path)], check=True, timeout=120)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"rank{rank}.npy"), 2 * (x * 1 + x * 2))


def test_a_process_with_no_communicator_cannot_load_the_graph(tmp_path: Path) -> None:
    """Outside a rank process (no communicator bound, so no kernel registered) a graph holding the
    op is refused when the session is made, naming the op, rather than running as if alone."""
    all_reduce_graph(tmp_path / "g.onnx")
    assert not collective._registered
    with pytest.raises(Exception, match=collective.ALL_REDUCE_OP_TYPE):
        ort.InferenceSession(str(tmp_path / "g.onnx"), collective.session_options(),
                             providers=["CPUExecutionProvider"])
