"""The OpenAI-compatible HTTP front end: a Starlette app on the same engine core as the gRPC server,
served by uvicorn in a thread of the same process (`llamaforge serve --http-port 8000`).

Routes:

    GET  /v2/health/live          200 while the process serves
    GET  /v2/health/ready         200 when the core is running, 503 otherwise (starting, draining)
    GET  /v1/models               the served model (the engine's variant name)
    GET  /v1/models/{model}       that model, or 404
    POST /v1/completions          prompt: a string, token ids, or a list of either (n choices each)
    POST /v1/chat/completions     messages rendered by the checkpoint's chat template

With `n`, each prompt's n sequences are choices `prompt * n + sequence` (vLLM's numbering); the
prompt is computed once and counted once in the usage.

Request bodies are parsed by runtime/serving/openai_protocol.py (which parameters are honoured, which
are refused). Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`:

    400 invalid_request_error   a parameter is wrong or not supported (`param` names it); the
                                prompt / max_tokens / context checks are runtime/core/validation.py's
    401 invalid_request_error   an API key is set and a /v1/* request's `Authorization` is not
                                `Bearer KEY` (code invalid_api_key; /v2/health/* stays open)
    404 invalid_request_error   unknown model (code model_not_found), or an unknown route
    413 invalid_request_error   the body is over `max_body_bytes` (default: the gRPC message limit)
    429 rate_limit_error        the core's waiting queue is full (nothing was queued)
    500 server_error            the engine failed while running the request, or the server itself
                                failed (a bug: its traceback is in the server's log; a stream
                                under way ends with an error event instead)
    503 service_unavailable     the server is not ready (code not_ready), draining after SIGTERM (code
                                shutting_down: nothing new is admitted), or a request still running at
                                the drain timeout was cancelled

Streaming (`stream: true`) is server-sent events: `data: {chunk}` lines, for chat a first chunk per
choice that carries only the role, the finish reason in the last chunk of each choice, with
`stream_options.include_usage` a chunk with no choices and the usage, then `data: [DONE]`. The
deltas come from the core's outputs as they are made, so they concatenate to the unary text.

A client that disconnects (mid-stream, or while waiting for a unary answer) has its requests
cancelled in the core, which frees their KV within one step.

TLS (`HttpServer(tls=...)`) and the API key (`OpenAIFrontend(api_key=...)`) are runtime/serving/security.py's;
every generation request holds a ticket of the `Admission` shared with the gRPC server until its answer
has been sent (runtime/serving/admission.py), which is what the drain on SIGTERM waits for.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from llamaforge.runtime.core.requests import GenerationOutput, QueueFullError, RequestError
from llamaforge.runtime.core.tokenizer import Tokenizer
from llamaforge.runtime.core.validation import RequestLimits
from llamaforge.runtime.serving import openai_protocol as op
from llamaforge.runtime.serving.admission import SHUTTING_DOWN, Admission, Ticket
from llamaforge.runtime.serving.engine_client import EngineClient
from llamaforge.runtime.serving.metrics import ServerMetrics
from llamaforge.runtime.serving.security import MISSING_KEY, WRONG_KEY, TlsConfig, bearer_matches

__all__ = ["OpenAIFrontend", "HttpServer", "DEFAULT_MAX_BODY_BYTES"]

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # the gRPC server's default receive limit
_POLL_S = 0.25  # how often a unary handler checks that its client is still there


class _Refusal(Exception):
    """An answer other than 200: the status and OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = op.error_body(message, type_, param, code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


def _invalid(e: RequestError) -> _Refusal:
    message = str(e)
    return _Refusal(400, message, "invalid_request_error", e.field)


class _BearerAuth:
    """ASGI middleware: /v1 and /v1/* need `Authorization: Bearer KEY` (401 in OpenAI's error body
    otherwise, as api.openai.com answers); other paths (health) pass."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")):
            values = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"authorization"]
            if not (values and bearer_matches(values[0], self.key)):
                refusal = _Refusal(401, WRONG_KEY if values else MISSING_KEY, "invalid_request_error", None,
                                   "invalid_api_key")
                response = refusal.response()
                response.headers["WWW-Authenticate"] = "Bearer"  # RFC 6750
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Run:
    """One HTTP request's prompts running in the core: each output arrives, from the core's thread,
    on this loop's queue as (choice index, output); a prompt has n choices, its sequences. `ticket`
    (admission.py) gets each prompt's core id."""

    def __init__(self, core: EngineClient, req: op.OpenAIRequest, metrics: ServerMetrics | None,
                 ticket: Ticket) -> None:
        self.core = core
        self.req = req
        self.metrics = metrics
        self.ticket = ticket
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, GenerationOutput]] = asyncio.Queue()
        self.unfinished: set[int] = set()
        self.started = time.monotonic()

    def _sink(self, job: op.PromptJob) -> Callable[[GenerationOutput], None]:
        def put(out: GenerationOutput) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.req.choice_index(job, out.sequence_index), out))
            except RuntimeError:  # the loop has closed: the HTTP server is gone, nobody is waiting
                pass
        return put

    def submit(self, prompt_field: str) -> None:
        """Submit every prompt; on a refusal cancel those already submitted and raise it."""
        for job in self.req.jobs:
            try:
                self.core.submit(job.generation, self._sink(job))
            except RequestError as e:
                self.cancel()
                if self.metrics:
                    self.metrics.on_invalid()
                field = prompt_field if e.field == "text_input" else e.field
                raise _invalid(RequestError(field, str(e).split(": ", 1)[-1])) from None
            except QueueFullError as e:
                self.cancel()
                if self.metrics:
                    self.metrics.on_rejected()
                raise _Refusal(429, f"the waiting queue is full: {e}", "rate_limit_error", None, "queue_full") from None
            self.ticket.rows.append(job.generation.request_id)
            self.unfinished.update(self.req.choice_index(job, i) for i in range(self.req.n))
            if self.metrics:
                self.metrics.on_admitted(len(job.generation.prompt_ids))

    def cancel(self) -> None:
        """Cancel every prompt not yet finished (cancelling a finished one does nothing)."""
        for job in self.req.jobs:
            if any(self.req.choice_index(job, i) in self.unfinished for i in range(self.req.n)):
                self.core.cancel(job.generation.request_id)

    async def next(self) -> tuple[int, GenerationOutput]:
        return self.took(await self.queue.get())

    def took(self, item: tuple[int, GenerationOutput]) -> tuple[int, GenerationOutput]:
        """Book an output taken off `queue` by its consumer: a finished choice leaves `unfinished`.
        Only the handler that then uses the output may call this, never a task that may finish
        unseen: `unfinished` empty means every final output is in the handler's hands."""
        index, out = item
        if out.finished:
            self.unfinished.discard(index)
            first = index - index % self.req.n  # the prompt's choices: a prompt is done with its last
            if self.metrics and not any(c in self.unfinished for c in range(first, first + self.req.n)):
                self.metrics.on_request_done(time.monotonic() - self.started)
        return index, out


def _failure(out: GenerationOutput) -> _Refusal | None:
    if out.finish_reason == "cancelled":
        return _Refusal(503, "the request was cancelled (the server is stopping)", "service_unavailable")
    if out.finish_reason == "unavailable":
        return _Refusal(503, f"the engine became unavailable: {out.error}", "service_unavailable")
    if out.finish_reason not in ("stop", "length"):
        return _Refusal(500, f"the engine failed while running the request: {out.error or out.finish_reason}",
                        "server_error")
    return None


def _internal_error(where: str, e: Exception) -> _Refusal:
    """A 500 for an exception no other path answers (a bug): its traceback goes to the server's
    stderr (its log), and the client gets OpenAI's error body naming the exception."""
    print(f"llama-forge: {where} failed:", file=sys.stderr, flush=True)
    traceback.print_exception(e, file=sys.stderr)
    sys.stderr.flush()
    return _Refusal(500, f"the server failed while answering the request ({type(e).__name__}: {e}); "
                         "the server's log has the traceback", "server_error")


def _sse(payload: Mapping[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class _EventStream:
    """An ASGI response that sends `events` as they come and calls `on_close` when the client
    disconnects (at once, from a task listening for it, so a stream waiting for its next token is
    cancelled in the core too) or the stream ends."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        self.events = events
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.on_close()

        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})
        watcher = asyncio.create_task(watch())
        try:
            tail = b""
            try:
                async for event in self.events:
                    await send({"type": "http.response.body", "body": event, "more_body": True})
            except OSError:  # the client has gone (uvicorn's ClientDisconnected)
                return
            except Exception as e:  # noqa: BLE001 - a bug: end the stream with an error event, not a cut
                tail = _sse(_internal_error("a stream", e).body)
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        except OSError:
            pass
        finally:
            watcher.cancel()
            self.on_close()


class OpenAIFrontend:
    """The ASGI app (`.app`) over an engine core. `ready`: whether the core is running (default: from
    `start_serving()` until `stop_serving()`); `max_body_bytes`: the largest request body; `admission`:
    the gate shared with the gRPC server (default: one of its own); `api_key`: required on /v1/*."""

    def __init__(self, core: EngineClient, metrics: ServerMetrics | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, ready: Callable[[], bool] | None = None,
                 admission: Admission | None = None, api_key: str | None = None) -> None:
        self.core = core
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.admission = admission if admission is not None else Admission()
        self._serving = False
        self._ready = ready or (lambda: self._serving)
        self.model_name = core.model_name
        self.created = int(time.time())
        # The core's own limits (it checks them again on submit): its KV cache never grows.
        vision = core.manifest.vision  # a Llama 3.2 Vision model takes image_url content parts
        self.limits = RequestLimits(core.context_length, core.manifest.vocab_size,
                                    kv_tokens=int(core.stats()["kv_total_tokens"]) or None,
                                    image_token_id=vision.image_token_id if vision is not None else None)
        self.app: ASGIApp = Starlette(routes=[
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ], exception_handlers={HTTPException: self._http_error})
        if api_key:
            self.app = _BearerAuth(self.app, api_key)

    def start_serving(self) -> None:
        self._serving = True

    def stop_serving(self) -> None:
        self._serving = False

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.core.tokenizer

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        type_ = "invalid_request_error" if status < 500 else "server_error"
        message = exc.detail if isinstance(exc, HTTPException) else str(exc)
        return JSONResponse(op.error_body(f"{request.method} {request.url.path}: {message}", type_), status_code=status)

    # -- health and models --------------------------------------------------------------------------
    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    async def ready(self, request: Request) -> Response:
        return Response(status_code=200 if self._ready() and not self.admission.draining else 503)

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "llama-forge",
                "max_model_len": self.core.context_length}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.model_name:
            return self._unknown_model(name).response()
        return JSONResponse(self._model_card())

    def _unknown_model(self, name: str) -> _Refusal:
        return _Refusal(404, f"The model `{name}` does not exist (served: {self.model_name})", "invalid_request_error",
                        "model", "model_not_found")

    # -- generation ----------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response | _EventStream:
        return await self._generate(request, op.parse_completion, "prompt")

    async def chat_completions(self, request: Request) -> Response | _EventStream:
        return await self._generate(request, op.parse_chat, "messages")

    async def _read_body(self, request: Request) -> dict[str, Any]:
        too_large = _Refusal(413, f"the request body is over {self.max_body_bytes} bytes", "invalid_request_error",
                             None, "request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise too_large
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > self.max_body_bytes:
                raise too_large
        try:
            body = json.loads(data)
        except ValueError as e:
            raise _Refusal(400, f"the body is not valid JSON: {e}", "invalid_request_error") from None
        if not isinstance(body, dict):
            raise _Refusal(400, "the body must be a JSON object", "invalid_request_error")
        return body

    async def _generate(self, request: Request,
                        parse: Callable[[Mapping[str, Any], Tokenizer | None, RequestLimits], op.OpenAIRequest],
                        prompt_field: str) -> Response | _EventStream:
        ticket = self.admission.admit()
        if ticket is None:
            return _Refusal(503, SHUTTING_DOWN, "service_unavailable", None, "shutting_down").response()
        try:
            response = await self._answer(request, parse, prompt_field, ticket)
        except ClientDisconnect:  # gone while sending the body: nothing was submitted, nobody to answer
            ticket.release()
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001 - a bug here must still answer in OpenAI's schema, and be logged
            for request_id in ticket.rows:  # whatever reached the core (cancelling a finished one does nothing)
                self.core.cancel(request_id)
            ticket.release()
            return _internal_error(f"{request.method} {request.url.path}", e).response()
        except BaseException:
            ticket.release()
            raise
        if not isinstance(response, _EventStream):
            ticket.release()  # answered (the body goes out next; the drain's server stop lets it)
        return response

    async def _answer(self, request: Request,
                      parse: Callable[[Mapping[str, Any], Tokenizer | None, RequestLimits], op.OpenAIRequest],
                      prompt_field: str, ticket: Ticket) -> Response | _EventStream:
        try:
            if not self._ready():
                raise _Refusal(503, "the server is not ready", "service_unavailable", None, "not_ready")
            body = await self._read_body(request)
            model = body.get("model")
            if isinstance(model, str) and model and model != self.model_name:
                raise self._unknown_model(model)
            try:
                req = parse(body, self.tokenizer, self.limits)
            except RequestError as e:
                if self.metrics:
                    self.metrics.on_invalid()
                raise _invalid(e) from None
            run = _Run(self.core, req, self.metrics, ticket)
            if any(job.generation.images for job in req.jobs):  # decoding and resizing them: off the event loop
                await asyncio.to_thread(run.submit, prompt_field)
            else:
                run.submit(prompt_field)
        except _Refusal as refusal:
            return refusal.response()
        if req.stream:
            def close() -> None:  # the stream has ended or its client has gone
                run.cancel()
                ticket.release()
            return _EventStream(self._events(run), close)
        return await self._whole(request, run)

    async def _whole(self, request: Request, run: _Run) -> Response:
        """Wait for every prompt's outputs, then answer them in one body."""
        parts: dict[int, list[GenerationOutput]] = {index: [] for index, _ in run.req.choices()}
        # One getter task at a time, polled, so no output is lost to a timeout's cancellation. The
        # getter only takes the output off the queue; it is booked (`took`) here, once this loop has
        # it. A getter that booked it itself could finish while `is_disconnected()` awaits (it
        # always yields to the loop) and empty `unfinished` before this loop had the output: the
        # loop then ended without that choice's final output (an IndexError, HTTP 500, when that
        # was its only one), which a loaded machine, slowing every poll, made likely.
        getter: asyncio.Task[tuple[int, GenerationOutput]] | None = None
        while run.unfinished:
            getter = getter or asyncio.ensure_future(run.queue.get())
            done, _ = await asyncio.wait({getter}, timeout=_POLL_S)
            if not done:
                if await request.is_disconnected():
                    getter.cancel()
                    run.cancel()
                    return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
                continue
            index, out = run.took(getter.result())
            getter = None
            parts[index].append(out)
            failure = _failure(out) if out.finished else None
            if failure is not None:
                run.cancel()
                return failure.response()
        req, tok = run.req, self.tokenizer
        finals = [outs[-1] for outs in parts.values()]
        choices = []
        for index, job in req.choices():
            outs = parts[index]
            text = "".join(o.text for o in outs)
            ids = [t for o in outs for t in o.token_ids]
            lps = [x for o in outs for x in o.log_probs]
            tops = [x for o in outs for x in o.top_log_probs]
            reason = outs[-1].finish_reason
            if req.kind == "chat":
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": op.chat_logprobs(tok, ids, lps, tops) if req.logprobs else None,
                                "finish_reason": reason})
            else:
                choices.append({"index": index, "text": job.echo + text, "finish_reason": reason,
                                "logprobs": op.completion_logprobs(tok, ids, lps, len(job.echo), tops)
                                if req.logprobs else None})
        usage = op.usage_body(finals)
        build = op.chat_body if req.kind == "chat" else op.completion_body
        return JSONResponse(build(req, choices, usage))

    async def _events(self, run: _Run) -> AsyncIterator[bytes]:
        """The SSE stream of a request (see the module docstring)."""
        req, tok = run.req, self.tokenizer
        chat = req.kind == "chat"
        chunk = op.chat_chunk if chat else op.completion_chunk
        offsets = {index: len(job.echo) for index, job in req.choices()}
        finals: list[GenerationOutput] = []
        for index, job in req.choices():
            if chat:
                yield _sse(chunk(req, [{"index": index, "delta": {"role": "assistant"}, "logprobs": None,
                                        "finish_reason": None}]))
            elif job.echo:
                yield _sse(chunk(req, [{"index": index, "text": job.echo, "logprobs": None, "finish_reason": None}]))
        while run.unfinished:
            index, out = await run.next()
            failure = _failure(out) if out.finished else None
            if failure is not None:
                run.cancel()
                yield _sse(failure.body)
                return
            if not (out.text or out.token_ids or out.finished):
                continue
            logprobs = None
            if req.logprobs:
                logprobs = (op.chat_logprobs(tok, out.token_ids, out.log_probs, out.top_log_probs) if chat else
                            op.completion_logprobs(tok, out.token_ids, out.log_probs, offsets[index],
                                                   out.top_log_probs))
            offsets[index] += len(out.text)
            reason = out.finish_reason if out.finished else None
            if chat:
                choice = {"index": index, "delta": {"content": out.text} if out.text else {}, "logprobs": logprobs,
                          "finish_reason": reason}
            else:
                choice = {"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": reason}
            yield _sse(chunk(req, [choice]))
            if out.finished:
                finals.append(out)
        if req.include_usage:
            yield _sse(chunk(req, [], op.usage_body(finals)))
        yield _sse("[DONE]")


class HttpServer:
    """uvicorn serving an `OpenAIFrontend` from a thread of this process. The socket is bound here,
    so a busy port fails in the caller and `port` is known (0: a free one) before `start()`."""

    def __init__(self, frontend: OpenAIFrontend, host: str = "127.0.0.1", port: int = 8000,
                 tls: TlsConfig | None = None) -> None:
        self.frontend = frontend
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as e:
            self._socket.close()
            raise OSError(f"cannot bind the HTTP port {host}:{port}: {e}") from None
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(frontend.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2, **(tls.uvicorn_options() if tls is not None else {}))
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self) -> HttpServer:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="http-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server on {self.host}:{self.port} did not start")
            time.sleep(0.01)
        self.frontend.start_serving()
        return self

    def stop(self) -> None:
        self.frontend.stop_serving()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._socket.close()
