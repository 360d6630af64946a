"""The standalone in-flight batching server: KServe v2 `GRPCInferenceService` (Triton's gRPC
protocol) over one `EngineCore`, plus Prometheus metrics on a second port.

    llamaforge serve ENGINE [--port 8001] [--metrics-port 8002] ...      (make serve ENGINE=dir)

The process around it (runtime/serving/serve.py `serve()`) also runs the OpenAI-compatible HTTP front
end (runtime/serving/openai_server.py, --http-port 8000) on the same core, and drains both on SIGTERM.

Models (interfaces in `runtime/serving/model_interface.py`): the text model as "ensemble" (what TensorRT-LLM
ensemble clients call), "tensorrt_llm_bls" and the engine's variant name; the token model as
"tensorrt_llm". Version "" or "1".

RPCs: ServerLive, ServerReady, ModelReady (false for an unknown model or version), ServerMetadata,
ModelMetadata, ModelConfig, ModelInfer, ModelStreamInfer, ModelStatistics, RepositoryIndex; the
others (repository load/unload, shared memory, trace, log settings) answer UNIMPLEMENTED.

Status codes (unary calls; on a stream the same message goes into `error_message`, with the
request's `id` in `infer_response.id`, and the stream stays open):

    INVALID_ARGUMENT    a request field is wrong; the message starts with the field's name
                        ("max_tokens: must be > 0, got 0", "text_input: not valid UTF-8 ...")
    NOT_FOUND           unknown model ("model_name: ...") or version ("model_version: ...")
    RESOURCE_EXHAUSTED  the core's waiting queue is full (answered at once, nothing queued), a
                        message over the receive limit (`max_message_bytes`, from gRPC itself),
                        or more concurrent RPCs than handler threads (max_num_seqs + max_queue + 8)
    CANCELLED           the request was cancelled (client gone, or still running at the drain timeout)
    INTERNAL            the engine failed while running the request
    UNAVAILABLE         the server is draining (SIGTERM): a new ModelInfer or ModelStreamInfer call, or
                        a new request on a stream already open (which stays open for those running);
                        or the engine became unavailable (a tensor-parallel rank died): every request
                        then, and those in flight when it happened (docs/tensor_parallel.md)
    UNAUTHENTICATED     an API key is set and the call's `authorization` metadata is not `Bearer KEY`
                        (every RPC but ServerLive and ServerReady; security.py)

Decoupled mode is a deployment choice (`decoupled`, `llamaforge serve --no-decoupled`, `make serve
DECOUPLED=false`); ModelConfig reports it as `model_transaction_policy.decoupled`.

Decoupled (the default): streaming as Triton's decoupled models: one response per new piece of text
(token model: per new token), each with `triton_final_response` set (false, then true on the last).
With `triton_enable_empty_final_response` (tritonclient `enable_empty_final_response=True`) every
data response has it false and an extra response without outputs carries true, which is what
Triton sends for ensembles. A request with stream=false on the stream gets one response.
Unary ModelInfer on the same (decoupled) models serves stream=false requests whole; stream=true on
a unary call is INVALID_ARGUMENT naming `stream` (Triton refuses unary calls to decoupled models).

Non-decoupled: one response per request, as Triton's non-decoupled models. Unary ModelInfer serves
every model (what perf_analyzer's and genai-perf's non-streaming modes send); ModelStreamInfer is
served too, as Triton serves it for non-decoupled models, with one response per request
(`triton_final_response` true). A request that asks to stream (stream / streaming = true) is
INVALID_ARGUMENT naming the field on either RPC: streaming needs the decoupled deployment.

ModelStatistics is filled as Triton fills it (runtime/serving/model_stats.py: success, fail, queue,
compute_input, compute_infer, compute_output, inference_count, execution_count, last_inference),
per model and version "1"; an unknown model or version is NOT_FOUND.

Batches (max_batch_size > 0, as TensorRT-LLM's models; runtime/serving/model_interface.py): each
row of a request is its own sequence in flight. On a stream every response belongs to one row and
carries its `batch_index`; `triton_final_response` is true only on the last response of the
request's last row to end (or on the empty final response after it). A unary call answers once,
when every row has ended, with the rows stacked (`stack_rows`). A request counts once in the
statistics, as failed if any of its rows failed.

Cancellation: when a unary call's client cancels or disconnects, or a stream is cancelled or
closed by the client, each of its requests is cancelled in the core (KV freed within one step).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any, NoReturn

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from llamaforge.runtime.core.requests import GenerationOutput, OutputSink, QueueFullError, RequestError, RequestHandle
from llamaforge.runtime.serving.admission import SHUTTING_DOWN, Admission, DrainResult, Ticket
from llamaforge.runtime.serving.engine_client import EngineClient
from llamaforge.runtime.serving.grpc_stream import POLL_S, InferStream, Refused
from llamaforge.runtime.serving.metrics import ServerMetrics
from llamaforge.runtime.serving.model_interface import TEXT_MODEL, TOKEN_MODEL, ModelSpec, model_config, model_metadata
from llamaforge.runtime.serving.model_stats import InferStats, RequestTimer
from llamaforge.runtime.serving.protocol import ModelContext, ParsedRequest, parse_request
from llamaforge.runtime.serving.responses import encode_response, response_builder, responses_per_row, stack_rows
from llamaforge.runtime.serving.security import ApiKeyInterceptor, TlsConfig

__all__ = ["InferenceServer", "InferenceServicer", "DEFAULT_MAX_MESSAGE_BYTES", "DEFAULT_DRAIN_TIMEOUT_S", "address"]

SERVER_NAME = "llama-forge"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_DRAIN_TIMEOUT_S = 30.0  # Triton's --exit-timeout-secs and Kubernetes' terminationGracePeriodSeconds


_Rows = list[tuple[ParsedRequest, RequestHandle]]


def _abort(context: Any, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable: ServicerContext.abort raises")  # for the type checker (grpc is untyped)


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("llama-forge")
    except Exception:  # noqa: BLE001
        return "0"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 gRPC over an engine core (runtime/serving/engine_client.py `EngineClient`);
    `decoupled`: the models' transaction policy (see the module docstring)."""

    def __init__(self, core: EngineClient, metrics: ServerMetrics | None = None, decoupled: bool = True,
                 admission: Admission | None = None) -> None:
        self.core = core
        self.metrics = metrics
        self.decoupled = decoupled
        self.admission = admission if admission is not None else Admission()
        self.ctx = ModelContext.from_core(core)
        self.models: dict[str, ModelSpec] = {}
        if core.tokenizer is not None:
            for name in (TEXT_MODEL.name, "tensorrt_llm_bls", core.model_name):
                if name and name != TOKEN_MODEL.name:
                    self.models.setdefault(name, TEXT_MODEL)
        self.models[TOKEN_MODEL.name] = TOKEN_MODEL
        self.stats = {name: InferStats() for name in self.models}
        self.ready = True
        self.unavailable: str | None = None  # why the engine can no longer serve (mark_unavailable)
        self._version = _package_version()

    def mark_unavailable(self, reason: str) -> None:
        """The engine can no longer run (a tensor-parallel rank died): not ready from now on, and every
        new request is refused UNAVAILABLE naming `reason`; health and metadata keep answering."""
        self.unavailable = f"the engine is unavailable: {reason}"
        self.ready = False

    # -- helpers -------------------------------------------------------------------------------------
    def _resolve(self, name: str, version: str) -> ModelSpec:
        spec = self.models.get(name)
        if spec is None:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"model_name: unknown model '{name}' (served: "
                                                       f"{', '.join(sorted(self.models))})")
        if version not in ("", "1"):
            raise Refused(grpc.StatusCode.NOT_FOUND, f"model_version: version '{version}' of model '{name}' is "
                                                       "not found (served: '1'; '' means the latest)")
        return spec

    def _new_id(self) -> str:
        return uuid.uuid4().hex

    def submit_rows(self, request: pb.ModelInferRequest, streaming_rpc: bool, timer: RequestTimer,
                    sink: Callable[[ParsedRequest], OutputSink], ticket: Ticket) -> _Rows:
        """Resolve, parse and submit every row of the request; raises Refused with the status to
        answer (every row is checked before any is submitted; rows taken before the core refused
        one are in `Refused.admitted`). `sink`, given a row's parsed request, makes the sink its
        outputs go to (see RequestHandle); `ticket` records the core ids of the rows submitted."""
        spec = self._resolve(request.model_name, request.model_version)
        rows: _Rows = []
        try:
            # Non-decoupled models refuse streaming on either RPC, with their own message.
            parsed_rows = parse_request(request, spec, self.ctx, self._new_id(), streaming_rpc or not self.decoupled)
            if any(p.stream for p in parsed_rows) and not self.decoupled:
                field_name = "stream" if spec.kind == "text" else "streaming"
                raise RequestError(field_name, f"model '{request.model_name}' is deployed non-decoupled (one response "
                                               "per request), so it cannot stream; send "
                                               f"{field_name}=false, or serve it decoupled (--decoupled)")
            timer.submitted()
            sinks = [sink(parsed) for parsed in parsed_rows]  # all before any row can end: see InferStream
            for parsed, row_sink in zip(parsed_rows, sinks):
                rows.append((parsed, self.core.submit(parsed.generation, row_sink)))
                ticket.rows.append(parsed.generation.request_id)
        except RequestError as e:  # the core can refuse a later row (a guide that does not compile)
            if self.metrics:
                self.metrics.on_invalid()
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(e),
                          tuple(p.generation.request_id for p, _ in rows)) from None
        except QueueFullError as e:
            if self.metrics:
                self.metrics.on_rejected()
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, f"queue full: {e}",
                          tuple(p.generation.request_id for p, _ in rows)) from None
        if self.metrics:
            for parsed, _ in rows:
                self.metrics.on_admitted(len(parsed.generation.prompt_ids))
        return rows

    def cancel_ids(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self.core.cancel(rid)

    def record(self, model: str, ok: bool, timer: RequestTimer) -> None:
        """Statistics of an admitted request that has ended."""
        st = self.stats.get(model)
        if st is not None:
            (st.record_success if ok else st.record_failure)(timer)
        if self.metrics:
            self.metrics.on_request_done((time.monotonic_ns() - timer.received) / 1e9)

    def record_refused(self, request: pb.ModelInferRequest, timer: RequestTimer) -> None:
        """A request answered with an error before it reached the core counts as failed in the model
        version it named, as in Triton (a version that does not exist has no statistics)."""
        st = self.stats.get(request.model_name)
        if st is not None and request.model_version in ("", "1"):
            st.record_failure(timer)

    # -- health and metadata ---------------------------------------------------------------------------
    def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready)

    def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        ok = request.name in self.models and request.version in ("", "1")
        return pb.ModelReadyResponse(ready=self.ready and ok)

    def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version,
                                         extensions=["model_configuration", "statistics", "model_repository"])

    def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        try:
            spec = self._resolve(request.name, request.version)
        except Refused as e:
            context.abort(e.code, e.message)
        return model_metadata(spec, request.name)

    def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        try:
            spec = self._resolve(request.name, request.version)
        except Refused as e:
            context.abort(e.code, e.message)
        return pb.ModelConfigResponse(config=model_config(spec, request.name, decoupled=self.decoupled))

    def ModelStatistics(self, request: Any, context: Any) -> pb.ModelStatisticsResponse:
        if request.name:
            try:
                self._resolve(request.name, request.version)
            except Refused as e:
                context.abort(e.code, e.message)
            names = [request.name]
        else:
            names = sorted(self.models)
        resp = pb.ModelStatisticsResponse()
        for name in names:
            self.stats[name].fill(resp.model_stats.add(name=name, version="1"))
        return resp

    def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        resp = pb.RepositoryIndexResponse()
        for name in sorted(self.models):
            resp.models.add(name=name, version="1", state="READY")
        return resp

    # -- inference --------------------------------------------------------------------------------------
    def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        if self.unavailable is not None:
            _abort(context, grpc.StatusCode.UNAVAILABLE, self.unavailable)
        ticket = self.admission.admit()
        if ticket is None:
            _abort(context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        try:
            return self._infer(request, context, ticket)
        finally:
            ticket.release()

    def _infer(self, request: pb.ModelInferRequest, context: Any, ticket: Ticket) -> pb.ModelInferResponse:
        timer = RequestTimer()
        outputs: queue.Queue[tuple[int, GenerationOutput]] = queue.Queue()  # (batch index, output) of every row

        def sink(parsed: ParsedRequest) -> OutputSink:
            return lambda out: outputs.put((parsed.batch_index, out))
        try:
            rows = self.submit_rows(request, streaming_rpc=False, timer=timer, sink=sink, ticket=ticket)
        except Refused as e:
            self.cancel_ids(e.admitted)
            self.record_refused(request, timer)
            context.abort(e.code, e.message)

        def unfinished() -> list[str]:
            return [p.generation.request_id for p, h in rows if not h.done.is_set()]
        context.add_callback(lambda: self.cancel_ids(unfinished()))
        # One builder per sequence of each row (n > 1: several, by sequence_index; a row's beams share
        # one, which stacks them on the beam axis); a unary response stacks the builders as rows.
        beams = {parsed.batch_index for parsed, _ in rows if parsed.generation.beam_width > 1}
        builders = {(parsed.batch_index, i): response_builder(parsed, request.model_name)
                    for parsed, _ in rows for i in range(responses_per_row(parsed))}
        ends: dict[tuple[int, int], GenerationOutput] = {}
        while len(ends) < sum(parsed.generation.n for parsed, _ in rows):
            try:
                row, out = outputs.get(timeout=POLL_S)
            except queue.Empty:
                if not context.is_active():
                    self.cancel_ids(unfinished())
                continue
            timer.output(out)
            with timer.building():
                builders[(row, 0 if row in beams else out.sequence_index)].add(out)
            if out.finished:
                ends[(row, out.sequence_index)] = out
        failed = [out for _, out in sorted(ends.items()) if out.finish_reason not in ("stop", "length")]
        if not failed:
            with timer.building():
                if len(builders) == 1:
                    response = next(iter(builders.values())).whole()
                else:
                    response = encode_response(stack_rows([b.whole_tensors() for _, b in sorted(builders.items())]),
                                               rows[0][0], request.model_name)
        self.record(request.model_name, not failed, timer)
        name = request.id or rows[0][0].generation.request_id
        if any(out.finish_reason == "cancelled" for out in failed):
            context.abort(grpc.StatusCode.CANCELLED, f"request {name} was cancelled")
        if any(out.finish_reason == "unavailable" for out in failed):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"request {name} failed: {failed[0].error or 'unavailable'}")
        if failed:
            context.abort(grpc.StatusCode.INTERNAL, f"request {name} failed: {failed[0].error or failed[0].finish_reason}")
        return response

    def ModelStreamInfer(self, request_iterator: Any, context: Any) -> Any:
        if self.admission.draining:  # a new stream; requests on a stream already open: InferStream.start
            _abort(context, grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        if self.unavailable is not None:
            _abort(context, grpc.StatusCode.UNAVAILABLE, self.unavailable)
        stream = InferStream(self, context)
        context.add_callback(stream.cancel_all)
        reader = threading.Thread(target=stream.read, args=(request_iterator,), name="grpc-stream-reader", daemon=True)
        reader.start()
        yield from stream.responses()


def address(host: str, port: int) -> str:
    """host:port as gRPC and URLs write it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 literal needs brackets


class InferenceServer:
    """gRPC server (+ metrics endpoint) around an engine core. `start()` starts the core too;
    `drain()` stops admitting and waits for the requests in flight (see admission.py); `stop()`
    stops the gRPC server, the metrics endpoint and, if `own_core`, the core.

    `tls`: serve gRPC over TLS (security.py `load_tls`); `api_key`: require `authorization: Bearer
    KEY` metadata on every RPC but ServerLive/ServerReady; `admission`: the gate shared with the HTTP
    front end (default: one of its own)."""

    def __init__(self, core: EngineClient, host: str = "127.0.0.1", port: int = 8001, metrics_port: int | None = 8002,
                 metrics: ServerMetrics | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 max_workers: int | None = None, own_core: bool = True, decoupled: bool = True,
                 tls: TlsConfig | None = None, api_key: str | None = None,
                 admission: Admission | None = None) -> None:
        self.core = core
        self.host = host
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.metrics.attach(core)
        if core.observer is None:
            core.observer = self.metrics  # the core was made without one: observe it from now on
        self.admission = admission if admission is not None else Admission()
        self.servicer = InferenceServicer(core, self.metrics, decoupled=decoupled, admission=self.admission)
        # Every admitted request can hold a handler thread while it runs or waits, plus room for
        # health checks and requests that will be refused with RESOURCE_EXHAUSTED.
        self.max_workers = max_workers or core.config.max_num_seqs + core.config.max_queue + 8
        options = [
            ("grpc.max_receive_message_length", int(max_message_bytes)),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
        interceptors = [ApiKeyInterceptor(api_key)] if api_key else []
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=self.max_workers,
                                                            thread_name_prefix="grpc-handler"),
                                 options=options, maximum_concurrent_rpcs=self.max_workers, interceptors=interceptors)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self._grpc)
        self.tls = tls
        if tls is not None:
            self.port = self._grpc.add_secure_port(address(host, port), tls.grpc_credentials())
        else:
            self.port = self._grpc.add_insecure_port(address(host, port))
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {address(host, port)}")
        self._metrics_port_req = metrics_port
        self.metrics_port: int | None = None
        self.own_core = own_core
        self._stopped = threading.Event()

    def start(self) -> InferenceServer:
        self.core.start()
        self._grpc.start()
        if self._metrics_port_req is not None:
            self.metrics_port = self.metrics.start_http(self.host, self._metrics_port_req)
        return self

    def drain(self, timeout: float, interrupt: threading.Event | None = None) -> DrainResult:
        """Not ready from now on; new requests are refused (UNAVAILABLE, and 503 on an HTTP front end
        sharing `admission`); wait up to `timeout` s (or until `interrupt` is set) for those admitted,
        then cancel the rest in the core. The server keeps listening: call `stop()` after."""
        self.servicer.ready = False
        observed = self.core.observer is self.metrics  # then the metrics see how each request ended
        if observed:
            self.metrics.watch_cancellations()
        return self.admission.drain(timeout, self.core.cancel, interrupt,
                                    was_cancelled=self.metrics.was_cancelled if observed else None)

    def stop(self, grace: float | None = 1.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.servicer.ready = False
        ev = self._grpc.stop(grace)
        if self.own_core:
            self.core.stop()  # finishes whatever is left as cancelled, which ends its handlers
        ev.wait(timeout=10)
        self.metrics.stop_http()

    def wait(self) -> None:
        self._grpc.wait_for_termination()

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
