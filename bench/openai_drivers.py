"""In-process closed-loop load drivers for `make bench-openai`, on the stock clients of each front end:

  gRPC    Triton's ModelStreamInfer to the text model ("ensemble": TensorRT-LLM's tensor names) with
          `tritonclient.grpc.aio`, one stream per concurrency slot;
  HTTP    POST /v1/completions with stream=true with the official `openai` client (AsyncOpenAI), the
          control for AIPerf: the same driver loop and process as the gRPC side, so a gap between
          the two is the front ends', not the load generators'.

Both keep `concurrency` requests in flight, as AIPerf's `--concurrency` does (it keeps a connection
per slot): each slot sends its next prompt as soon as its previous request has finished, until
`count` requests were sent, taking the prompts in order (AIPerf samples its synthetic dataset
sequentially, so the same list in the same order is the same workload). Latencies follow AIPerf's
definitions, so all sides compare directly:

    TTFT      first response that carries a token - request sent
    ITL       per request: (last token's response - first token's response) / (output tokens - 1)
    duration  first request sent -> last request finished; output tok/s = output tokens / duration
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Trace", "RunStats", "stats_from_traces", "run_grpc_load", "run_openai_load", "percentile"]


@dataclass
class Trace:
    """Client-side timings of one request (perf_counter seconds)."""

    sent: float
    first: float | None = None  # the first response that carried a token
    last: float | None = None  # the response that carried the last token
    output_tokens: int = 0
    input_tokens: int = 0


@dataclass
class RunStats:
    """One run of one side at one concurrency, in the units the table prints."""

    requests: int
    output_tokens: int
    duration_s: float
    ttft_ms: dict[str, float]  # "p50", "p99"
    itl_ms: dict[str, float]
    osl: tuple[int, int]  # min, max output tokens per request
    isl: tuple[int, int]  # min, max prompt tokens per request as the server counted them
    errors: int = 0
    client_cpu_s: float = math.nan  # CPU the load generator used during the run (all its processes)
    server_cpu_s: float = math.nan  # CPU the server process used during the run
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.duration_s

    @property
    def req_s(self) -> float:
        return self.requests / self.duration_s

    @property
    def server_ms_per_token(self) -> float:
        return self.server_cpu_s * 1e3 / self.output_tokens if self.output_tokens else math.nan


def percentile(values: Sequence[float], q: float) -> float:
    """numpy's default (linear) percentile, as AIPerf's summary computes it; NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else math.nan


def stats_from_traces(traces: Sequence[Trace], errors: int = 0) -> RunStats:
    done = [(t, t.first, t.last) for t in traces if t.first is not None and t.last is not None]
    if not done:
        raise RuntimeError("no request of the run produced a token")
    ttft = [(first - t.sent) * 1e3 for t, first, _ in done]
    itl = [(last - first) * 1e3 / (t.output_tokens - 1) for t, first, last in done if t.output_tokens > 1]
    start, end = min(t.sent for t in traces), max(last for _, _, last in done)
    outs, ins = [t.output_tokens for t, _, _ in done], [t.input_tokens for t, _, _ in done]
    return RunStats(requests=len(done), output_tokens=sum(outs), duration_s=end - start,
                    ttft_ms={"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
                    itl_ms={"p50": percentile(itl, 50), "p99": percentile(itl, 99)},
                    osl=(min(outs), max(outs)), isl=(min(ins), max(ins)), errors=errors)


async def _closed_loop(concurrency: int, count: int,
                       open_slot: Callable[[], Awaitable[Callable[[int, Trace], Awaitable[None]]]],
                       close_slot: Callable[[], Awaitable[None]] | None = None) -> list[Trace]:
    """`concurrency` slots share one sequence of request indices; each slot runs its requests one
    after another (`open_slot()` returns the slot's `run(index, trace)`)."""
    traces: list[Trace] = []
    indices: Iterator[int] = iter(range(count))

    async def slot() -> None:
        run = await open_slot()
        for i in indices:
            trace = Trace(sent=time.perf_counter())
            traces.append(trace)
            await run(i, trace)

    try:
        await asyncio.gather(*(slot() for _ in range(concurrency)))
    finally:
        if close_slot is not None:
            await close_slot()
    return traces


# -- gRPC: tritonclient.grpc.aio, ModelStreamInfer ---------------------------------------------------------

def _grpc_request(grpcclient: Any, model: str, prompt: str, max_tokens: int, temperature: float,
                  rid: str) -> dict[str, Any]:
    """One streamed request, [1, 1]-shaped inputs as TensorRT-LLM's clients send them."""
    def tensor(name: str, dtype: str, value: np.ndarray) -> Any:
        x = grpcclient.InferInput(name, list(value.shape), dtype)
        x.set_data_from_numpy(value)
        return x

    inputs = [tensor("text_input", "BYTES", np.array([[prompt.encode()]], dtype=np.object_)),
              tensor("max_tokens", "INT32", np.array([[max_tokens]], dtype=np.int32)),
              tensor("stream", "BOOL", np.array([[True]])),
              tensor("temperature", "FP32", np.array([[temperature]], dtype=np.float32))]
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("text_output", "num_input_tokens", "num_output_tokens")]
    return {"model_name": model, "inputs": inputs, "outputs": outputs, "request_id": rid}


async def _grpc_load(url: str, model: str, prompts: Sequence[str], max_tokens: int, temperature: float,
                     concurrency: int, count: int, errors: list[str]) -> list[Trace]:
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    closers: list[Callable[[], Awaitable[None]]] = []

    async def open_slot() -> Callable[[int, Trace], Awaitable[None]]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[dict[str, Any]]:
            while (item := await queue.get()) is not None:
                yield item

        stream = client.stream_infer(requests())

        async def close() -> None:
            await queue.put(None)  # ends the request iterator, so the stream closes
            stream.cancel()

        closers.append(close)

        async def run(i: int, trace: Trace) -> None:
            await queue.put(_grpc_request(grpcclient, model, prompts[i % len(prompts)], max_tokens, temperature, str(i)))
            async for result, error in stream:
                now = time.perf_counter()
                if error is not None:  # this request is over; the stream goes on
                    errors.append(str(error))
                    return
                n = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
                result.as_numpy("text_output")  # decoded, as a client reading the text would
                if n > trace.output_tokens:
                    trace.first = trace.first or now
                    trace.last, trace.output_tokens = now, n
                    trace.input_tokens = int(result.as_numpy("num_input_tokens").reshape(-1)[0])
                if result.get_response().parameters["triton_final_response"].bool_param:
                    return
        return run

    async def close_all() -> None:
        for close in closers:
            await close()
        await client.close()

    return await _closed_loop(concurrency, count, open_slot, close_all)


def run_grpc_load(url: str, model: str, prompts: Sequence[str], max_tokens: int, concurrency: int, count: int,
                  temperature: float = 0.0) -> RunStats:
    """Closed-loop streaming load over gRPC at `concurrency`, `count` requests."""
    if not prompts:
        raise ValueError("prompts: empty")
    errors: list[str] = []
    traces = asyncio.run(_grpc_load(url, model, prompts, max_tokens, temperature, concurrency, count, errors))
    return _with_errors(stats_from_traces(traces, len(errors)), errors)


# -- HTTP: the official openai client, /v1/completions with stream=true --------------------------------------

async def _openai_load(base_url: str, model: str, prompts: Sequence[str], max_tokens: int, temperature: float,
                       concurrency: int, count: int, errors: list[str]) -> list[Trace]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)

    async def run(i: int, trace: Trace) -> None:
        try:
            stream = await client.completions.create(
                model=model, prompt=prompts[i % len(prompts)], max_tokens=max_tokens, temperature=temperature,
                stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.choices:  # every choice chunk carries at least one token (the route skips empty ones)
                    trace.first = trace.first or now
                    trace.last = now
                if chunk.usage is not None:  # the last chunk: the token counts
                    trace.output_tokens = chunk.usage.completion_tokens
                    trace.input_tokens = chunk.usage.prompt_tokens
        except openai.APIError as e:
            errors.append(str(e))

    async def open_slot() -> Callable[[int, Trace], Awaitable[None]]:
        return run

    async def close() -> None:
        await client.close()

    return await _closed_loop(concurrency, count, open_slot, close)


def run_openai_load(base_url: str, model: str, prompts: Sequence[str], max_tokens: int, concurrency: int,
                    count: int, temperature: float = 0.0) -> RunStats:
    """Closed-loop SSE streaming load over HTTP at `concurrency`, `count` requests."""
    if not prompts:
        raise ValueError("prompts: empty")
    errors: list[str] = []
    traces = asyncio.run(_openai_load(base_url, model, prompts, max_tokens, temperature, concurrency, count, errors))
    return _with_errors(stats_from_traces(traces, len(errors)), errors)


def _with_errors(stats: RunStats, errors: list[str]) -> RunStats:
    if errors:
        stats.extra["first_error"] = errors[0]
    return stats
