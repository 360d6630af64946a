"""The pure parts of `make bench-quant`'s speed half (bench/quant_speed.py, bench/quant_roofline.py,
bench/quant_peers.py, bench/llamacpp_worker.py): bytes per decode step, profile aggregation, round
order, the peers' install and build commands. No install, build or network here; expected values
come from the arrays and events each test makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from quant_peers import (
    CMAKE_ARGS,
    LLAMA_CPP_PYTHON,
    TORCH,
    build_env,
    converter_command,
    genai_builder_command,
    genai_threads_overlay,
    llamacpp_install_steps,
    missing,
    ninja_progress,
)
from quant_roofline import (
    Sample,
    first_divergence,
    gguf_step_bytes,
    median_tok_s,
    onnx_step_bytes,
    paired_ratio,
    profile_by_op,
    roofline_fraction,
    round_orders,
    verdict,
)

V, H = 50, 8  # vocabulary rows, hidden size


def tiny_lm(tied: bool) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Gather(embedding) -> MatMul(w1) -> MatMul(head): an untied head reads its own [H, V] matrix;
    a tied one reads the embedding table through Gemm(transB=1), so the table is not gather-only.
    Plus an int8 table gathered through DequantizeLinear and an int4 weight (packed, 2 per byte)."""
    rng = np.random.default_rng(0)
    arrays = {"emb": rng.standard_normal((V, H)).astype(np.float32), "w1": rng.standard_normal((H, H)).astype(np.float32),
              "q_table": rng.integers(-8, 8, (V, H)).astype(np.int8), "q_scale": np.array(0.1, np.float32)}
    if not tied:
        arrays["head"] = rng.standard_normal((H, V)).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for n, a in arrays.items()]
    int4 = helper.make_tensor("w4", TensorProto.INT4, [H, 3], np.zeros(H * 3, np.int8).tolist())  # 24 values: 12 bytes
    inits.append(int4)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"]),
             helper.make_node("DequantizeLinear", ["q_table", "q_scale"], ["q_deq"]),
             helper.make_node("Gather", ["q_deq", "ids"], ["x2"]),
             helper.make_node("Add", ["x", "x2"], ["x3"]),
             helper.make_node("MatMul", ["x3", "w1"], ["h"]),
             helper.make_node("Cast", ["w4"], ["w4f"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["h", "w4f"], ["side"]),
             helper.make_node("Gemm", ["h", "emb"], ["logits"], transB=1) if tied
             else helper.make_node("MatMul", ["h", "head"], ["logits"])]
    graph = helper.make_graph(nodes, "lm", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("side", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph), arrays


def test_untied_step_reads_one_row_of_each_gathered_table_and_every_other_weight() -> None:
    model, a = tiny_lm(tied=False)
    step, total = onnx_step_bytes(model)
    int4_bytes = 12
    assert total == sum(x.nbytes for x in a.values()) + int4_bytes
    assert step == (a["emb"].nbytes // V + a["q_table"].nbytes // V + a["q_scale"].nbytes + a["w1"].nbytes
                    + a["head"].nbytes + int4_bytes)


def test_tied_table_read_by_the_head_counts_in_full() -> None:
    model, a = tiny_lm(tied=True)
    step, _ = onnx_step_bytes(model)
    assert step == a["emb"].nbytes + a["q_table"].nbytes // V + a["q_scale"].nbytes + a["w1"].nbytes + 12


def test_unused_initializer_is_not_read() -> None:
    model, a = tiny_lm(tied=False)
    model.graph.initializer.append(numpy_helper.from_array(np.ones(1000, np.float32), "unused"))
    step, total = onnx_step_bytes(model)
    assert total - onnx_step_bytes(tiny_lm(tied=False)[0])[1] == 4000
    assert step == onnx_step_bytes(tiny_lm(tied=False)[0])[0]


def test_gguf_embedding_is_one_row_unless_the_head_is_tied() -> None:
    rows, width = 32000, 768
    emb = ("token_embd.weight", [width, rows], rows * width * 4)
    out = ("output.weight", [width, rows], rows * width // 2)
    blk = ("blk.0.ffn_up.weight", [width, 2048], 2048 * width)
    assert gguf_step_bytes([emb, out, blk]) == (width * 4 + out[2] + blk[2], emb[2] + out[2] + blk[2])
    assert gguf_step_bytes([emb, blk]) == (emb[2] + blk[2], emb[2] + blk[2])


def test_profile_skips_the_prefill_run_and_averages_per_step() -> None:
    def run(ts: int, dur: int) -> dict[str, object]:
        return {"cat": "Session", "name": "model_run", "ts": ts, "dur": dur}

    def node(ts: int, dur: int, op: str) -> dict[str, object]:
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ts": ts, "dur": dur, "args": {"op_name": op}}

    fence = {"cat": "Node", "name": "n2330_fence_before", "ts": 2330, "dur": 5, "args": {"op_name": "MatMul"}}
    events = [run(0, 1000), node(10, 900, "MatMul"),  # prefill: skipped
              run(2000, 500), node(2010, 300, "MatMul"), node(2320, 100, "Add"), fence,  # not a kernel event
              run(3000, 500), node(3010, 500, "MatMul"), node(3400, 100, "Add"),
              node(3300, 150, "If"), node(3310, 100, "Add")]  # If: its subgraph's Add is an event of its own
    ops, steps = profile_by_op(events)
    assert steps == 2
    by = {o.op: o for o in ops}
    assert by["MatMul"].ms_per_step == pytest.approx((300 + 500) / 1e3 / 2)
    assert by["Add"].ms_per_step == pytest.approx((100 + 100 + 100) / 1e3 / 2)
    assert by["MatMul"].share == pytest.approx(800 / 1100)
    assert by["MatMul"].calls_per_step == 1.0 and by["Add"].calls_per_step == 1.5
    assert "If" not in by
    assert [o.op for o in ops] == ["MatMul", "Add"]
    assert profile_by_op(events[:2]) == ([], 0)


def test_rounds_alternate_direction_and_refuse_zero() -> None:
    assert round_orders(["a", "b", "c"], 3) == [["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]
    with pytest.raises(ValueError, match="rounds"):
        round_orders(["a"], 0)


def test_rates_ratios_and_verdicts() -> None:
    samples = [Sample(2.0, 100), Sample(1.0, 100), Sample(4.0, 100)]
    assert [s.tok_s for s in samples] == [50.0, 100.0, 25.0]
    assert median_tok_s(samples) == 50.0
    with pytest.raises(ValueError, match="no samples"):
        median_tok_s([])
    assert roofline_fraction(1_000_000, 20.0, 40e6) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="copy bandwidth"):
        roofline_fraction(1, 1.0, 0.0)
    assert verdict(1.6, 1.6) == "PASS" and verdict(1.59, 1.6) == "FAIL"
    # Rates a: 100, 50, 90 and b: 100, 25, 100 tok/s: the median of the rounds' ratios (1.0, 2.0,
    # 0.9) is 1.0, where the ratio of the medians would be 0.9.
    a, b = [Sample(1.0, 100), Sample(2.0, 100), Sample(1.0, 90)], [Sample(1.0, 100), Sample(4.0, 100), Sample(1.0, 100)]
    assert paired_ratio(a, b) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one sample of each per round"):
        paired_ratio(a, b[:2])
    assert first_divergence([1, 2, 3], [1, 2, 4]) == 2 and first_divergence([1, 2], [1, 2, 3]) == 2


def test_ninja_progress_reads_status_lines_only() -> None:
    assert ninja_progress("  [17/140] /usr/bin/g++ -c ggml.c") == (17, 140)
    assert ninja_progress("-- Build files have been written to: /tmp/x [1/2]") is None
    assert ninja_progress("Collecting numpy") is None


def test_llamacpp_install_puts_cpu_torch_first_and_builds_from_the_sdist(tmp_path: Path) -> None:
    venv, sdist = tmp_path / "venv", tmp_path / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    steps = llamacpp_install_steps(venv, sdist)
    names = [name for name, _, _ in steps]
    assert names[0].startswith("torch") and names[-1] == "llama-cpp-python build"
    _, torch_wanted, torch_cmd = steps[0]
    assert torch_cmd[-1] == f"torch=={TORCH}" and torch_wanted == {"torch": f"{TORCH}+cpu"}
    assert all(cmd[0] == str(venv / "bin" / "python") for _, _, cmd in steps)
    _, wanted, build = steps[-1]
    assert wanted == {"llama_cpp_python": LLAMA_CPP_PYTHON}
    assert build[-3:] == ["--no-binary", "llama-cpp-python", str(sdist)]
    gguf_py = steps[2][2][-1]
    assert gguf_py == str(tmp_path / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp" / "gguf-py")
    env = build_env({"PATH": "/bin"}, 2)
    assert env["PATH"] == "/bin" and env["CMAKE_BUILD_PARALLEL_LEVEL"] == "2"
    assert env["CMAKE_ARGS"].split() == list(CMAKE_ARGS)
    assert "-DGGML_NATIVE=ON" in CMAKE_ARGS and "-DGGML_CUDA=OFF" in CMAKE_ARGS


def test_missing_compares_exact_versions() -> None:
    have = {"torch": "2.13.0+cpu", "numpy": "2.4.6", "gguf": "0.19.0"}
    assert missing(have, {"torch": "2.13.0+cpu", "gguf": ""}) == []
    assert missing(have, {"numpy": "2.2.6", "transformers": "4.57.6"}) == ["numpy", "transformers"]


def test_peer_commands(tmp_path: Path) -> None:
    py = Path("/venv/bin/python")
    sdist = tmp_path / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    cmd = converter_command(py, sdist, tmp_path / "src", tmp_path / "f32.gguf")
    assert cmd[1].endswith("vendor/llama.cpp/convert_hf_to_gguf.py") and cmd[-2:] == ["--outtype", "f32"]
    g = genai_builder_command(py, tmp_path / "ckpt", tmp_path / "out", "int4", tmp_path / "cache")
    assert g[:3] == [str(py), "-m", "onnxruntime_genai.models.builder"]
    assert g[g.index("-p") + 1] == "int4" and g[g.index("-e") + 1] == "cpu"
    with pytest.raises(ValueError, match="'int3'"):
        genai_builder_command(py, tmp_path, tmp_path, "int3", tmp_path)
    assert '"intra_op_num_threads": 2' in genai_threads_overlay(2)


def test_worker_refuses_an_unknown_quant_type_by_name() -> None:
    worker = Path(__file__).resolve().parents[2] / "bench" / "llamacpp_worker.py"
    proc = subprocess.run([sys.executable, str(worker), "quantize", "a.gguf", "b.gguf", "q5_k"], capture_output=True, text=True)
    assert proc.returncode != 0 and "'q5_k'" in proc.stderr


def test_precisions_outside_the_build_are_refused_by_name() -> None:
    from quant_speed import our_precisions

    with pytest.raises(SystemExit, match="int3-xyz"):
        our_precisions(["fp32", "int3-xyz"])
    assert our_precisions(["int8-wo"])[0] == "fp32"  # the baseline is always there
