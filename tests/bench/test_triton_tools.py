"""bench/triton_tools.py (make bench-triton-tools): the command lines it gives perf_analyzer and
genai-perf, the input data it writes for perf_analyzer (checked against the model interfaces the
server declares: perf_analyzer refuses an input the model config does not declare), and the parsing
of the tools' outputs. No tool is installed or run here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from triton_tools import (
    GP_METRICS,
    GPRun,
    PARun,
    genai_perf_command,
    perf_analyzer_command,
    read_genai_perf,
    read_perf_analyzer_csv,
    read_perf_analyzer_export,
    served_address,
    text_input_data,
    token_input_data,
)

from llamaforge.runtime.serving.model_interface import TEXT_MODEL, TOKEN_MODEL, ModelSpec


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


@pytest.mark.parametrize("run", [PARun("ensemble", True), PARun("tensorrt_llm", False),
                                 PARun("ensemble", False, batch=4, concurrency="1:2")])
def test_perf_analyzer_command(run: PARun, tmp_path: Path) -> None:
    cmd = perf_analyzer_command("perf_analyzer", run, "127.0.0.1:9", tmp_path / "in.json", 3000,
                                tmp_path / "o.csv", tmp_path / "o.json")
    assert cmd[0] == "perf_analyzer" and "-x" not in cmd  # the model's version is left to the server
    assert _flag(cmd, "-m") == run.model and _flag(cmd, "-i") == "grpc" and _flag(cmd, "-u") == "127.0.0.1:9"
    assert ("--streaming" in cmd) == run.streaming
    assert ("-b" in cmd) == (run.batch != 1) and (run.batch == 1 or _flag(cmd, "-b") == str(run.batch))
    assert _flag(cmd, "--concurrency-range") == run.concurrency
    assert _flag(cmd, "--measurement-interval") == "3000"
    assert _flag(cmd, "-f") == str(tmp_path / "o.csv")


def test_genai_perf_command(tmp_path: Path) -> None:
    cmd = genai_perf_command("genai-perf", GPRun("tensorrt_llm_bls", 8), "127.0.0.1:9", tmp_path, 128, 64, 6000,
                             tmp_path / "a")
    assert cmd[:2] == ["genai-perf", "profile"] and "--streaming" in cmd
    for flag, value in (("-m", "tensorrt_llm_bls"), ("--backend", "tensorrtllm"), ("--endpoint-type", "kserve"),
                        ("--tokenizer", str(tmp_path)), ("--concurrency", "8"), ("--synthetic-input-tokens-mean", "128"),
                        ("--output-tokens-mean", "64"), ("--measurement-interval", "6000")):
        assert _flag(cmd, flag) == value, flag
    # It sends `min_length`: the models declare it beside min_tokens (perf_analyzer refuses undeclared inputs).
    assert "--output-tokens-mean-deterministic" in cmd


_JSON_TYPES = {"BYTES": str, "INT32": int, "BOOL": bool}


def _check_entry(entry: dict[str, object], spec: ModelSpec) -> None:
    declared = {t.name: t for t in spec.inputs}
    for name, value in entry.items():
        assert name in declared, f"{name} is not an input {spec.name} declares"
        t = declared[name]
        content = value["content"] if isinstance(value, dict) else value
        assert isinstance(content, list) and content
        assert all(type(x) is _JSON_TYPES[t.datatype] for x in content), (name, t.datatype)
        if isinstance(value, dict):  # a variable-length input: its shape must match its content
            assert value["shape"] == [len(content)]
        else:
            assert t.dims == (1,) and len(content) == 1, name
    required = {t.name for t in spec.inputs if not t.optional}
    assert required <= entry.keys()


@pytest.mark.parametrize("streaming", [True, False])
def test_input_data_declared_by_the_models(streaming: bool) -> None:
    text = text_input_data(["def f(x):", "class A:"], 7, streaming)["data"]
    tokens = token_input_data([[0, 5, 9], [0, 4]], 7, streaming)["data"]
    assert len(text) == 2 and len(tokens) == 2
    for entry in text:
        _check_entry(entry, TEXT_MODEL)
        assert entry["max_tokens"] == entry["min_tokens"] == [7]
        assert entry.get("stream") == ([True] if streaming else None)
    for entry, ids in zip(tokens, ([0, 5, 9], [0, 4])):
        _check_entry(entry, TOKEN_MODEL)
        assert entry["input_ids"] == {"content": ids, "shape": [len(ids)]} and entry["input_lengths"] == [len(ids)]
        assert entry.get("streaming") == ([True] if streaming else None)


# perf_analyzer 2.60's -f CSV header with --streaming (without it, no "Response Throughput" column).
PA_HEADER = ("Concurrency,Inferences/Second,Response Throughput,Client Send,Network+Server Send/Recv,Server Queue,"
             "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,"
             "p95 latency,p99 latency").split(",")


@pytest.mark.parametrize("streaming", [True, False])
def test_read_perf_analyzer_csv(streaming: bool, tmp_path: Path) -> None:
    header = PA_HEADER if streaming else [h for h in PA_HEADER if h != "Response Throughput"]
    values = [{"Concurrency": c, "Inferences/Second": 1.5 * c, "Response Throughput": 40.0 * c,
               "p50 latency": 1000 * c + 1, "p90 latency": 2000 * c, "p95 latency": 2500 * c, "p99 latency": 3000 * c}
              for c in (2, 1)]  # perf_analyzer writes the rows by throughput, not by concurrency
    path = tmp_path / "pa.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, header, restval=0, extrasaction="ignore")
        w.writeheader()
        w.writerows(values)
    rows = read_perf_analyzer_csv(path)
    assert [r["concurrency"] for r in rows] == [1, 2]
    for r, v in zip(rows, values[::-1]):
        assert r["infer_s"] == v["Inferences/Second"]
        assert r["p50_ms"] == pytest.approx(v["p50 latency"] / 1e3) and r["p99_ms"] == pytest.approx(v["p99 latency"] / 1e3)
        assert ("responses_s" in r) == streaming
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(header) + "\n")
    with pytest.raises(ValueError, match="no rows"):
        read_perf_analyzer_csv(empty)


def _stream_request(t0: int, first_ms: float, tokens: int) -> dict[str, object]:
    """A streamed request as perf_analyzer 2.60 exports it: one response per token (cumulative
    num_output_tokens of row 0), then the closing response, whose outputs it writes as ""."""
    stamps = [t0 + int((first_ms + i) * 1e6) for i in range(tokens + 1)]
    outputs: list[dict[str, object]] = [{"num_output_tokens": i + 1, "batch_index": 0, "text_output": "x"}
                                        for i in range(tokens)]
    closing = {"num_output_tokens": "", "batch_index": "", "text_output": ""}
    return {"timestamp": t0, "response_timestamps": stamps, "response_outputs": [*outputs, closing]}


def test_read_perf_analyzer_export(tmp_path: Path) -> None:
    firsts = {1: [10.0, 30.0, 20.0], 2: [5.0, 7.0]}
    lengths = {1: [4, 6, 5], 2: [3, 3]}
    exps = [{"experiment": {"mode": "concurrency", "value": c},
             "requests": [_stream_request(10**12 * (i + 1), f, n) for i, (f, n) in enumerate(zip(firsts[c], lengths[c]))]}
            for c in (1, 2)]
    # A unary request of 2 rows (-b 2): one response stacking both rows' counts.
    exps[1]["requests"].append({"timestamp": 0, "response_timestamps": [int(9e6)],
                                "response_outputs": [{"num_output_tokens": [[8], [6]], "batch_index": [[0], [1]]}]})
    path = tmp_path / "export.json"
    path.write_text(json.dumps({"experiments": exps, "version": "2.60.0"}))
    got = read_perf_analyzer_export(path)
    assert got[1]["first_response_p50_ms"] == pytest.approx(float(np.median(firsts[1])), abs=1e-3)
    assert got[1]["tokens_per_row"] == pytest.approx(np.mean(lengths[1]))
    assert got[2]["first_response_p50_ms"] == pytest.approx(float(np.median([5.0, 7.0, 9.0])), abs=1e-3)
    assert got[2]["tokens_per_row"] == pytest.approx((3 + 3 + 8 + 6) / 4)


def test_read_genai_perf(tmp_path: Path) -> None:
    doc = {metric: {"unit": "x", "avg": float(i), "p50": i + 0.5, "p99": i + 0.9}
           for i, metric in enumerate(sorted({m for m, _ in GP_METRICS.values()}))}
    path = tmp_path / "profile_export_genai_perf.json"
    path.write_text(json.dumps(doc))
    got = read_genai_perf(path)
    assert got == {col: doc[metric][stat] for col, (metric, stat) in GP_METRICS.items()}
    del doc["time_to_first_token"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="time_to_first_token"):
        read_genai_perf(path)


def test_served_address() -> None:
    line = ("llama-forge: serving /e (models: ensemble, tensorrt_llm; decoupled) on grpc 127.0.0.1:40123, "
            "metrics http://127.0.0.1:40124/metrics")
    assert served_address(line) == "127.0.0.1:40123"
    assert served_address("llama-forge: draining: 0 request(s) in flight") is None
