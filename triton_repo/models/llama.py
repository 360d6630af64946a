"""`llama`: the in-flight batching engine as a Triton Python-backend model, decoupled (the default)
or not (`make repo DECOUPLED=false`; config.pbtxt `model_transaction_policy.decoupled`).

One `EngineCore` per model instance (runtime/core/engine_core.py, the step loop the standalone server
runs too) is started in `initialize`; the model drives it through runtime/serving/engine_client.py
`EngineClient`, as the gRPC server does. `execute` parses each request (runtime/serving/protocol.py
`parse_inputs`, the server's own validation), submits it with a sink and returns at once. The sink,
called in the core's step thread as each output is produced (no thread per request), sends it
through the request's `response_sender` and always ends with TRITONSERVER_RESPONSE_COMPLETE_FINAL:
on the last data response, or on an error response (INVALID_ARG naming the field, UNAVAILABLE when
the queue is full, CANCELLED, INTERNAL). One thread per instance polls `is_cancelled()` of every
request in flight (the only cancellation signal the Python backend gives) and cancels a cancelled
one in the core, which frees its KV blocks within one step. Triton hands requests over as they
come (no dynamic batching; our scheduler batches), each with its own batch dimension
(`max_batch_size` > 0, as TensorRT-LLM's): every row of a request is submitted as its own sequence
(runtime/serving/protocol.py `parse_batch`), each of its responses is that row's (`[1, ...]`
tensors with its `batch_index`), and TRITONSERVER_RESPONSE_COMPLETE_FINAL comes with the last
response of the request's last row to end. A row with num_return_sequences n sends each of its n
sequences' responses through that sequence's own `_InFlight` (its own detokenization window,
tagged by `sequence_index`); a beam search answers once with its beams stacked (responses.py
`BeamResponseBuilder`, TensorRT-LLM's form). A row that fails ends the request: the others are
cancelled and the error is the final response.

Non-decoupled, a Python model must return one response per request from `execute`, so `execute`
submits its requests the same way, but each one's sender is a `_OneResponse` that keeps the rows'
responses (stacked into one, `stack_arrays`, for a batch), and `execute` returns them once every
request has ended. A request that asks to stream
(streaming = true) is INVALID_ARG. Triton runs one `execute` per instance at a time, so a
non-decoupled instance batches only the requests of one `execute` call: for concurrency, deploy
decoupled (or more instances).

config.pbtxt parameters (all strings; triton_repo/repository.py writes them):

    engine_dir              engine directory (absolute, or relative to the repository root)
    kv_budget_tokens        KV cache size in tokens ("" : kv_budget_bytes, or max_num_seqs sequences of the context length, at most 2048 tokens each)
    kv_budget_bytes         KV cache size in bytes ("" : not used)
    max_num_seqs            sequences in the running batch
    max_num_batched_tokens  tokens per engine step (prefill chunking)
    max_queue               waiting requests before UNAVAILABLE
    scheduling_policy       inflight | static
    enable_kv_cache_reuse   true | false: prefix caching, as TensorRT-LLM's tensorrt_llm model names it ("" : true)
    intra_op_threads        ONNX Runtime threads ("" : ONNX Runtime's default)
    speculative             ngram | draft: speculative decoding ("" : off); with
    num_speculative_tokens, prompt_lookup_min, prompt_lookup_max, speculative_disable_by_batch_size
                            (0: never), draft_engine_dir (absolute, or relative to the repository root),
                            as `llamaforge serve` names them ("" : SpeculativeConfig's defaults)
    gpu_device_ids          GPUs this model may run on, comma-separated ("" : any); an instance that
                            Triton placed elsewhere (instance_group `gpus`) fails to load

Placement follows `instance_group`: KIND_CPU runs ONNX Runtime's CPU provider, KIND_GPU its CUDA
provider on `args["model_instance_device_id"]` (onnxruntime-gpu required; the CPU-only wheel is
refused with a message saying so). The engine manifest's `backend` picks the runner: "ort" runs
here; "trt" fails to load with a message, as this runtime has no TensorRT runner.
"""

from __future__ import annotations

import functools
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from llamaforge.runtime.core.config import (
    SCHEDULING_POLICIES,
    SPECULATIVE_METHODS,
    CoreConfig,
    KVCacheConfig,
    SchedulerConfig,
    SpeculativeConfig,
)
from llamaforge.runtime.core.detokenizer import resume_point
from llamaforge.runtime.core.engine import EngineError, ort_providers
from llamaforge.runtime.core.engine_core import EngineCore
from llamaforge.runtime.core.requests import GenerationOutput, QueueFullError, RequestError
from llamaforge.runtime.serving.engine_client import EngineClient
from llamaforge.runtime.serving.protocol import ModelContext, ParsedRequest, parse_batch, split_rows
from llamaforge.runtime.serving.responses import (
    BeamResponseBuilder,
    ResponseBuilder,
    output_tensors,
    response_builder,
    responses_per_row,
    stack_arrays,
)
from llamaforge.triton_repo.models import backend
from llamaforge.triton_repo.models.interfaces import LLAMA_MODEL
from llamaforge.triton_repo.models.metrics import TritonCoreMetrics

POLL_S = 0.05  # how often the cancellation poller checks the requests in flight


def core_config(params: dict[str, str], providers: list[Any]) -> CoreConfig:
    """CoreConfig from config.pbtxt parameters (triton_repo/repository.py `core_parameters`); an empty
    or absent one is the default; a bad value is an error naming the parameter."""

    def integer(key: str, least: int = 1) -> int | None:
        value = params.get(key, "").strip()
        if not value:
            return None
        try:
            n = int(value)
        except ValueError:
            raise EngineError(f"config.pbtxt parameter '{key}': {value!r} is not an integer") from None
        if n < least:
            raise EngineError(f"config.pbtxt parameter '{key}': must be >= {least}, got {n}")
        return n

    policy = params.get("scheduling_policy", "").strip() or SchedulerConfig.policy
    if policy not in SCHEDULING_POLICIES:
        raise EngineError(f"config.pbtxt parameter 'scheduling_policy': {policy!r} is not "
                          + " or ".join(repr(p) for p in SCHEDULING_POLICIES))
    reuse = params.get("enable_kv_cache_reuse", "").strip().lower()
    if reuse not in ("", "true", "false"):
        raise EngineError(f"config.pbtxt parameter 'enable_kv_cache_reuse': {reuse!r} is not 'true' or 'false'")
    method = params.get("speculative", "").strip() or None
    if method is not None and method not in SPECULATIVE_METHODS:
        raise EngineError(f"config.pbtxt parameter 'speculative': {method!r} is not "
                          + " or ".join(repr(m) for m in SPECULATIVE_METHODS) + " (empty: off)")
    draft_engine = params.get("draft_engine_dir", "").strip() or None
    if method == "draft" and draft_engine is None:
        raise EngineError("config.pbtxt parameter 'draft_engine_dir': speculative 'draft' needs a draft engine "
                          "directory")
    disable_by_batch_size = integer("speculative_disable_by_batch_size", least=0)  # 0: never disabled
    spec = SpeculativeConfig
    return CoreConfig(
        KVCacheConfig(budget_tokens=integer("kv_budget_tokens"), budget_bytes=integer("kv_budget_bytes"),
                      prefix_caching=KVCacheConfig.prefix_caching if not reuse else reuse == "true"),
        SchedulerConfig(max_num_seqs=integer("max_num_seqs") or SchedulerConfig.max_num_seqs,
                        max_num_batched_tokens=integer("max_num_batched_tokens") or SchedulerConfig.max_num_batched_tokens,
                        policy=policy),
        speculative=SpeculativeConfig(
            method, integer("num_speculative_tokens") or spec.num_speculative_tokens,
            integer("prompt_lookup_min") or spec.prompt_lookup_min, integer("prompt_lookup_max") or spec.prompt_lookup_max,
            draft_engine, spec.disable_by_batch_size if disable_by_batch_size is None else disable_by_batch_size),
        max_queue=integer("max_queue") or CoreConfig.max_queue, threads=integer("intra_op_threads"),
        providers=tuple(providers),
    )


def placement(params: dict[str, str], args: dict[str, str]) -> list[Any]:
    """ONNX Runtime providers for this instance, from instance_group (kind, device id)."""
    kind = args.get("model_instance_kind", "CPU").upper()
    if kind == "CPU":
        return ort_providers("cpu")
    if kind != "GPU":
        raise EngineError(f"instance_group kind {kind!r} is not supported (KIND_CPU or KIND_GPU)")
    device_id = int(args.get("model_instance_device_id", "0") or 0)
    allowed = [d.strip() for d in params.get("gpu_device_ids", "").split(",") if d.strip()]
    if allowed and str(device_id) not in allowed:
        raise EngineError(f"config.pbtxt parameter 'gpu_device_ids' is {','.join(allowed)} but Triton placed this "
                          f"instance on GPU {device_id} (instance_group gpus); make the two agree")
    return ort_providers("gpu", device_id)


class _ContextWindow:
    """The ids generated so far for one request and the window `postprocessing` needs before each
    response's new ids (runtime/core/detokenizer.py `resume_point`)."""

    def __init__(self, tokenizer: Any, stop_words: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop_words = stop_words
        self.generated: list[int] = []

    def tensors(self, new_ids: list[int], final: bool) -> dict[str, np.ndarray]:
        start, continuing = len(self.generated), False
        if self.tokenizer is not None:
            start, continuing = resume_point(self.tokenizer, self.generated, len(self.generated), self.stop_words)
        context = self.generated[start:]
        self.generated.extend(new_ids)
        return {"context_ids": np.array([context], dtype=np.int32), "context_continues": np.array([[continuing]]),
                "is_final": np.array([[final]])}


class _OneResponse:
    """A non-decoupled request's stand-in for a response sender: keeps each row's response (the
    request is never streamed, so each row sends one) and, at the final one, the request's one
    response for `execute` to return: the rows stacked, or the error that ended it."""

    def __init__(self) -> None:
        self.response: Any = None
        self.rows: list[dict[str, np.ndarray]] = []
        self.done = threading.Event()

    def send(self, response: Any = None, flags: int = 0) -> None:
        if response is not None and not response.has_error():
            self.rows.append({t.name(): t.as_numpy() for t in response.output_tensors()})
        if flags & backend.FINAL:
            if response is not None and response.has_error():
                self.response = response
            elif len(self.rows) == 1:
                self.response = response
            else:
                self.response = pb_utils.InferenceResponse(
                    output_tensors=backend.output_tensors(stack_arrays(self.rows)))
            self.done.set()


@dataclass(eq=False)
class _Request:
    """One Triton request: its sender, and how many of its rows' sequences have not ended."""

    request: Any
    sender: Any
    open_rows: int
    rows: list[_InFlight]
    closed: bool = False  # its final response is sent


@dataclass(eq=False)
class _InFlight:
    """One sequence of an admitted row (a row has n, with num_return_sequences): where its responses
    go and what building them needs. Each is detokenized on its own by postprocessing."""

    group: _Request  # the Triton request this row belongs to
    parsed: ParsedRequest
    builder: ResponseBuilder | BeamResponseBuilder
    window: _ContextWindow
    echo: dict[str, np.ndarray]  # the row's inputs postprocessing reads, as llama's echo_* outputs
    sequence_index: int = 0
    cancel_sent: bool = False
    ended: bool = False  # its last response is sent: later outputs are dropped

    @property
    def request(self) -> Any:  # the Triton request: is_cancelled() is polled
        return self.group.request

    @property
    def key(self) -> tuple[str, int]:
        return self.parsed.generation.request_id, self.sequence_index


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = backend.parameters(args)
        providers = placement(params, args)
        config = core_config(params, providers)
        if config.speculative.draft_engine is not None:  # relative: to the repository's root, as engine_dir
            config.speculative.draft_engine = str(backend.repository_path(config.speculative.draft_engine, args))
        labels = {"model": args.get("model_name", "llama"), "version": args.get("model_version", "1"),
                  "instance": args.get("model_instance_name", "0")}
        self.core: EngineClient = EngineCore(backend.engine_dir(params, args), config)
        self.metrics = TritonCoreMetrics(labels)  # after the core loads: a failed load registers no metrics
        self.core.observer = self.metrics
        self.metrics.attach(self.core)
        self.ctx = ModelContext.from_core(self.core)
        self.decoupled = backend.decoupled(args)
        self._lock = threading.Lock()
        self._in_flight: dict[tuple[str, int], _InFlight] = {}
        self._stopping = threading.Event()
        self.core.start()
        self._poller = threading.Thread(target=self._poll_cancellations, name="llama-cancellations", daemon=True)
        self._poller.start()

    def execute(self, requests: list[Any]) -> list[Any] | None:
        """Decoupled: submit and return None (responses go through each request's sender).
        Otherwise: submit all, wait for each one's final response, return them in order."""
        if self.decoupled:
            for request in requests:
                self._submit(request, request.get_response_sender())
            return None
        senders = [_OneResponse() for _ in requests]
        for request, sender in zip(requests, senders):
            self._submit(request, sender)
        for sender in senders:
            sender.done.wait()
        return [sender.response for sender in senders]

    def finalize(self) -> None:
        self.core.stop()  # what is left finishes as cancelled: its sink sends the final response
        self._stopping.set()
        self._poller.join(timeout=5)
        with self._lock:
            left = list(self._in_flight.values())
        for entry in left:  # admitted but never taken in by the step loop: still owed a final response
            self._end(entry, pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"request {self._request_id(entry)} was cancelled", pb_utils.TritonError.CANCELLED)))

    # -- per request -------------------------------------------------------------------------------
    def _submit(self, request: Any, sender: Any) -> None:
        try:
            tensors = backend.input_tensors(request)
            rows = parse_batch(tensors, LLAMA_MODEL, self.ctx, uuid.uuid4().hex,
                               params=backend.request_parameters(request), client_id=request.request_id())
            row_tensors = split_rows(tensors, LLAMA_MODEL)
            for parsed in rows:
                if parsed.stream and not self.decoupled:
                    raise RequestError("streaming", "this model is deployed non-decoupled (one response per "
                                                    "request), so it cannot stream; send streaming=false, or "
                                                    "generate the repository decoupled (make repo DECOUPLED=true)")
                # Text-aligned chunks: the core emits a stream response when its text grows, so no
                # response of the ensemble carries an empty piece of a split character.
                parsed.generation.detokenize = self.core.tokenizer is not None
        except Exception as e:  # noqa: BLE001 - answer the request rather than leave it hanging
            self._refuse(sender, e)
            return
        # A row's n sequences each send their own responses (postprocessing detokenizes each
        # through its own window); a beam search answers once, its beams stacked, as TensorRT-LLM's.
        sequences: list[list[_InFlight]] = []  # each row's
        group = _Request(request, sender, 0, [])
        for parsed, row in zip(rows, row_tensors):
            sequences.append([_InFlight(group, parsed, response_builder(parsed, "llama"),
                                        _ContextWindow(self.core.tokenizer, parsed.generation.stop_words),
                                        _echo(row), sequence_index=i)
                              for i in range(responses_per_row(parsed))])
            group.rows.extend(sequences[-1])
        group.open_rows = len(group.rows)
        with self._lock:  # before submit: a sink may run (and end its row) before submit returns
            for entry in group.rows:
                self._in_flight[entry.key] = entry
        for i, entries in enumerate(sequences):
            try:
                self.core.submit(entries[0].parsed.generation, sink=functools.partial(self._route, entries))
            except Exception as e:  # noqa: BLE001 - refused by the core: this row and the rest were not queued
                with self._lock:
                    for later in (entry for row in sequences[i:] for entry in row):
                        later.ended = True
                        self._in_flight.pop(later.key, None)
                self._fail(group, backend.error_response(e))
                if isinstance(e, (RequestError, QueueFullError)):
                    self.metrics.on_refused("invalid" if isinstance(e, RequestError) else "rejected")
                return
            self.metrics.on_admitted(len(entries[0].parsed.generation.prompt_ids))

    def _refuse(self, sender: Any, error: Exception) -> None:
        if isinstance(error, (RequestError, QueueFullError)):
            self.metrics.on_refused("invalid" if isinstance(error, RequestError) else "rejected")
        sender.send(backend.error_response(error), flags=backend.FINAL)

    def _route(self, entries: list[_InFlight], out: GenerationOutput) -> None:
        """A row's sink: each output goes to its sequence's entry; a beam search's beams (their
        final outputs come together) to its one entry, which answers with the last."""
        entry = entries[0]
        if isinstance(entry.builder, BeamResponseBuilder):
            if out.sequence_index < len(entry.builder.beams) - 1 and out.finish_reason in ("stop", "length"):
                entry.builder.add(out)
                return
        else:
            entry = entries[out.sequence_index]
        self._forward(entry, out)

    def _forward(self, entry: _InFlight, out: GenerationOutput) -> None:
        """The request's sink, called from the core's step thread: send what `out` brings. It must not
        raise, so a failure becomes the request's final (error) response and the request is cancelled."""
        if entry.ended:
            return
        try:
            response, final = self._response(entry, out)
        except Exception as e:  # noqa: BLE001 - the client must get its final response
            self.core.cancel(entry.parsed.generation.request_id)  # frees its KV; its last output is dropped
            self._end(entry, backend.error_response(e))
            return
        if final:
            self._end(entry, response)
        elif response is not None:
            try:
                entry.group.sender.send(response, flags=0)
            except Exception:  # noqa: BLE001 - the request is gone: stop generating for it
                self.core.cancel(entry.parsed.generation.request_id)
                self._end(entry, None)

    def _end(self, entry: _InFlight, response: Any) -> None:
        """Send the row's last response (None: nothing more can be sent) once, and forget the row;
        final for the request when it is its last open row. An error ends the whole request."""
        group = entry.group
        with self._lock:
            if entry.ended:
                return
            entry.ended = True
            self._in_flight.pop(entry.key, None)
            group.open_rows -= 1
            error = response is not None and response.has_error()
            last = group.open_rows == 0 and not group.closed
            if not error:
                group.closed = group.closed or last
        if error:
            self._fail(group, response)
            return
        if response is None or (not last and group.closed):
            return
        try:
            group.sender.send(response, flags=backend.FINAL if last else 0)
        except Exception:  # noqa: BLE001 - the request is already gone
            pass

    def _fail(self, group: _Request, response: Any) -> None:
        """End the request with an error response: its other rows are cancelled, their outputs dropped."""
        with self._lock:
            if group.closed:
                return
            group.closed = True
            others = [e for e in group.rows if not e.ended]
            for entry in others:
                entry.ended = True
                self._in_flight.pop(entry.key, None)
        for request_id in dict.fromkeys(entry.parsed.generation.request_id for entry in others):
            self.core.cancel(request_id)
        try:
            group.sender.send(response, flags=backend.FINAL)
        except Exception:  # noqa: BLE001 - the request is already gone
            pass

    def _response(self, entry: _InFlight, out: GenerationOutput) -> tuple[Any, bool]:
        """The response `out` makes (None: nothing to send yet) and whether it is the final one."""
        parsed = entry.parsed
        if out.finished and out.finish_reason not in ("stop", "length"):
            if out.finish_reason == "cancelled":
                error = pb_utils.TritonError(f"request {self._request_id(entry)} was cancelled",
                                             pb_utils.TritonError.CANCELLED)
            else:
                error = pb_utils.TritonError(f"request {self._request_id(entry)} failed: {out.error or out.finish_reason}",
                                             pb_utils.TritonError.INTERNAL)
            return pb_utils.InferenceResponse(error=error), True
        if parsed.stream:
            tensors = {name: arr for name, (_, arr) in output_tensors(
                out.text, list(out.token_ids), list(out.log_probs), out, batch_index=parsed.batch_index,
                generation_logits=out.generation_logits, streaming=True).items()}
            tensors.update(entry.window.tensors(list(out.token_ids), out.finished))
        elif out.finished:
            entry.builder.add(out)
            tensors = {name: arr for name, (_, arr) in entry.builder.whole_tensors().items()}
            tensors.update(entry.window.tensors([], True))  # the whole text from an empty window
        else:
            entry.builder.add(out)
            return None, False
        tensors.update(entry.echo)
        outputs = {t.name: tensors[t.name] for t in LLAMA_MODEL.outputs if t.name in tensors}
        return pb_utils.InferenceResponse(output_tensors=backend.output_tensors(outputs)), out.finished

    @staticmethod
    def _request_id(entry: _InFlight) -> str:
        return entry.parsed.client_id or entry.parsed.generation.request_id

    # -- cancellation ----------------------------------------------------------------------------------
    def _poll_cancellations(self) -> None:
        """One thread per model instance: Triton's Python backend tells a model of a cancelled request
        only through `request.is_cancelled()`, so every in-flight request is polled here, and a
        cancelled one is cancelled in the core (which frees its KV blocks within one step and ends
        it through its sink with a CANCELLED response)."""
        while not self._stopping.wait(POLL_S):
            with self._lock:
                entries = [e for e in self._in_flight.values() if not e.cancel_sent]
            for entry in entries:
                try:
                    cancelled = entry.request.is_cancelled()
                except Exception:  # noqa: BLE001 - a request Triton has released counts as cancelled
                    cancelled = True
                if cancelled:
                    entry.cancel_sent = True
                    self.core.cancel(entry.parsed.generation.request_id)


def _echo(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A row's inputs that postprocessing reads, as llama's echo_* outputs (with a batch dim of 1)."""
    names = {"text_input": "text_input", "stop_words": "stop_words", "streaming": "stream",
             "exclude_input_in_output": "exclude_input_in_output"}
    return {f"echo_{ensemble}": row[name][None] for name, ensemble in names.items() if name in row}
