"""Arithmetic of `make bench-quant`'s speed half (bench/quant_speed.py), kept free of engines and
peers so tests/bench/test_quant_speed.py can check it on small inputs:

- weight bytes read per decode step, from an ONNX graph's initializers or a GGUF's tensor list;
- medians and ratios of decode rates, the targets' verdicts;
- per-op time from an ONNX Runtime profile (enable_profiling's JSON), decode steps only.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ops that read one row of their table per token: a decode step reads one embedding row, not the table.
GATHER_OPS = {"Gather": (0,), "GatherBlockQuantized": (0, 2)}  # op -> inputs indexed by the token id
# Ops that only rewrite a table for a Gather after them (ORT folds them into the initializer).
PASS_THROUGH_OPS = {"DequantizeLinear", "Cast"}
FOUR_BIT = {"INT4", "UINT4", "FLOAT4E2M1"}
# A control-flow node's kernel time is its subgraph's run, whose nodes ORT profiles themselves.
CONTROL_FLOW_OPS = {"If", "Loop", "Scan"}


def initializer_bytes(tensor: Any) -> int:
    """Bytes of an ONNX TensorProto's data, stored inline or externally (read from its header only)."""
    import onnx

    numel = int(math.prod(tensor.dims))
    name = onnx.TensorProto.DataType.Name(tensor.data_type)
    if name in FOUR_BIT:
        return (numel + 1) // 2
    if name == "STRING":
        return 0
    return numel * int(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)


def onnx_step_bytes(model: Any) -> tuple[int, int]:
    """(bytes a batch-1 decode step reads, bytes of all initializers) of an ONNX ModelProto loaded
    without its external data. A step reads every initializer once, except a table consumed only
    by gathers (through DequantizeLinear/Cast at most), of which it reads one row: dims[0] rows.
    Constants inside subgraphs and Constant nodes are not counted (no weights live there in the
    engines measured here)."""
    graph = model.graph
    consumers: dict[str, list[tuple[Any, int]]] = defaultdict(list)
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers[name].append((node, i))

    def gathered(name: str, depth: int = 0) -> bool:
        uses = consumers.get(name, [])
        if not uses or depth > 2:
            return False
        for node, i in uses:
            if node.op_type in GATHER_OPS:
                if i not in GATHER_OPS[node.op_type]:
                    return False
            elif node.op_type in PASS_THROUGH_OPS and i == 0:
                if not all(gathered(out, depth + 1) for out in node.output):
                    return False
            else:
                return False
        return True

    step = total = 0
    for t in graph.initializer:
        size = initializer_bytes(t)
        total += size
        if t.name not in consumers:
            continue
        step += size // t.dims[0] if t.dims and gathered(t.name) else size
    return step, total


def onnx_file_step_bytes(path: Path) -> tuple[int, int]:
    import onnx

    return onnx_step_bytes(onnx.load(str(path), load_external_data=False))


def gguf_step_bytes(tensors: Sequence[tuple[str, Sequence[int], int]]) -> tuple[int, int]:
    """(bytes a batch-1 decode step reads, bytes of all tensors) of a GGUF's tensor list (name,
    ggml ne [row length first], bytes). The token embedding is read one row per step unless the
    model has no output.weight (a tied head reads the whole table)."""
    names = {name for name, _, _ in tensors}
    step = total = 0
    for name, ne, size in tensors:
        total += size
        rows = math.prod(ne[1:]) if len(ne) > 1 else 1
        step += size // rows if name == "token_embd.weight" and "output.weight" in names else size
    return step, total


@dataclass(frozen=True)
class Sample:
    decode_s: float  # first generated token to the last
    steps: int  # decode steps in that span (new tokens - 1)

    @property
    def tok_s(self) -> float:
        return self.steps / self.decode_s


def median_tok_s(samples: Iterable[Sample]) -> float:
    rates = [s.tok_s for s in samples]
    if not rates:
        raise ValueError("median_tok_s: no samples")
    return float(statistics.median(rates))


def paired_ratio(a: Sequence[Sample], b: Sequence[Sample]) -> float:
    """The median over rounds of a's rate over b's in the same round (round i's samples are the
    i-th of each): engines of a round run seconds apart, so the machine's slower drift cancels in
    each pair, which a ratio of the two medians keeps."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_ratio: needs one sample of each per round, got {len(a)} and {len(b)}")
    return float(statistics.median(x.tok_s / y.tok_s for x, y in zip(a, b)))


def roofline_fraction(step_bytes: int, tok_s: float, copy_bytes_per_s: float) -> float:
    """Weight bytes read per second at this decode rate over the copy bandwidth (read + write bytes
    per second of a large numpy copy, as bench/serve.py measures it)."""
    if copy_bytes_per_s <= 0:
        raise ValueError(f"copy bandwidth must be positive, got {copy_bytes_per_s}")
    return step_bytes * tok_s / copy_bytes_per_s


def round_orders(names: Sequence[str], rounds: int) -> list[list[str]]:
    """Round-robin order of each round, alternating direction (A..Z, Z..A, ...): an engine's place in
    a round, and any drift of the machine's speed across it, weighs on every engine alike."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two greedy runs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def verdict(value: float, floor: float) -> str:
    return "PASS" if value >= floor else "FAIL"


# -- ONNX Runtime profiles ---------------------------------------------------------------------------

@dataclass(frozen=True)
class OpTime:
    op: str
    ms_per_step: float
    share: float  # of all node time in the decode steps
    calls_per_step: float


def profile_by_op(events: Sequence[dict[str, Any]], skip_runs: int = 1) -> tuple[list[OpTime], int]:
    """Per-op-type kernel time per decode step from ONNX Runtime's profile events, skipping the
    first `skip_runs` model runs (the prompt's prefill). Returns (ops by time, decode runs seen).
    A node event belongs to the model_run whose [ts, ts + dur] holds its start. Control-flow nodes
    are left out: their subgraphs' nodes are events of their own, so counting both would count
    that time twice."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    kept = runs[skip_runs:]
    if not kept:
        return [], 0
    total: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        ts = e["ts"]
        if not any(lo <= ts <= hi for lo, hi in kept):
            continue
        op = e.get("args", {}).get("op_name", "?")
        if op in CONTROL_FLOW_OPS:
            continue
        total[op] += e["dur"]
        calls[op] += 1
    all_us = sum(total.values()) or 1.0
    ops = [OpTime(op, us / 1e3 / len(kept), us / all_us, calls[op] / len(kept)) for op, us in total.items()]
    return sorted(ops, key=lambda o: -o.ms_per_step), len(kept)
