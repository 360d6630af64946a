"""Triton's per-model statistics (the `ModelStatistics` RPC, Triton's statistics extension) as the
server measures them: one `InferStats` per served model (version "1"), one `RequestTimer` per request.

What Triton fills, and how the phases of a request here map onto it (docs/serving.md):

    success          count and duration (ns) of the requests that completed: RPC receipt -> last
                     response built
    fail             count and duration of the requests that failed: refused (invalid, queue
                     full, unknown version), cancelled or failed in the engine; as in Triton, a
                     failed request adds to `fail` only
    queue            arrival at the engine core -> the scheduler first admits the request into the
                     running batch (GenerationOutput.queue_s)
    compute_input    RPC receipt -> the request is handed to the core: parsing the tensors and
                     tokenizing the prompt
    compute_infer    admission -> the request's final output (its last token) leaves the core
    compute_output   building the request's responses (all of them, for a stream)
    inference_count, execution_count
                     completed requests, each counted once whatever its batch size
                     (inference_count == execution_count); the engine's own step batching is
                     not Triton batching
    batch_stats      one entry, batch_size 1, with the same count and compute durations
    last_inference   ms since the epoch when the last request (success or failure) ended

Each successful request adds one to success, queue, compute_input, compute_infer and compute_output,
so `queue.count` grows with the requests served (perf_analyzer picks the version whose queue count
grew when no `-x` is given), and success.ns >= queue.ns + compute_input.ns + compute_infer.ns, the
three being consecutive parts of the request's time (compute_output overlaps compute_infer for
streams, whose responses are built as tokens come).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tritonclient.grpc import service_pb2 as pb

from llamaforge.runtime.core.requests import GenerationOutput

__all__ = ["InferStats", "RequestTimer", "PHASES"]

PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


class RequestTimer:
    """The phases of one request (monotonic ns). The server calls `submitted()` when the core takes
    the request, `output(out)` for each output the core sends, and wraps the building of each
    response in `building()`."""

    def __init__(self) -> None:
        self.received = time.monotonic_ns()
        self.submitted_at: int | None = None
        self.finished_at: int | None = None
        self.queue_s: float | None = None
        self.output_ns = 0

    def submitted(self) -> None:
        self.submitted_at = time.monotonic_ns()

    def output(self, out: GenerationOutput) -> None:
        if out.queue_s is not None:
            self.queue_s = out.queue_s
        if out.finished:
            self.finished_at = time.monotonic_ns()

    @contextmanager
    def building(self) -> Iterator[None]:
        t0 = time.monotonic_ns()
        try:
            yield
        finally:
            self.output_ns += time.monotonic_ns() - t0

    def phases(self) -> dict[str, int]:
        """ns per phase of a request that has completed (see the module docstring)."""
        submitted = self.submitted_at if self.submitted_at is not None else self.received
        finished = self.finished_at if self.finished_at is not None else time.monotonic_ns()
        in_core = max(0, finished - submitted)
        # The core measures queue_s on its own clock: clamp it into the time the server saw.
        queue = min(in_core, max(0, round((self.queue_s or 0.0) * 1e9)))
        return {"queue": queue, "compute_input": submitted - self.received, "compute_infer": in_core - queue,
                "compute_output": self.output_ns}


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, ns)


@dataclass
class InferStats:
    """Cumulative statistics of one model version, filled as Triton fills them. Thread-safe."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    phases: dict[str, _Duration] = field(default_factory=lambda: {p: _Duration() for p in PHASES})
    last_inference_ms: int = 0

    def record_success(self, timer: RequestTimer) -> None:
        phases = timer.phases()
        total = time.monotonic_ns() - timer.received
        with self.lock:
            self.success.add(total)
            for name, ns in phases.items():
                self.phases[name].add(ns)
            self.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, timer: RequestTimer) -> None:
        total = time.monotonic_ns() - timer.received
        with self.lock:
            self.fail.add(total)
            self.last_inference_ms = int(time.time() * 1000)

    def fill(self, ms: pb.ModelStatistics) -> None:
        """Write the statistics into a `ModelStatistics` message (name and version are the caller's)."""
        with self.lock:
            ms.last_inference = self.last_inference_ms
            ms.inference_count = ms.execution_count = self.success.count
            stats = ms.inference_stats
            for name, d in (("success", self.success), ("fail", self.fail), *self.phases.items()):
                target = getattr(stats, name)
                target.count, target.ns = d.count, d.ns
            if self.success.count:
                batch = ms.batch_stats.add(batch_size=1)
                for name in ("compute_input", "compute_infer", "compute_output"):
                    d = self.phases[name]
                    getattr(batch, name).count, getattr(batch, name).ns = d.count, d.ns
