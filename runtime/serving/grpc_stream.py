"""One ModelStreamInfer call of the gRPC server (runtime/serving/server.py): a reader thread takes
the stream's requests and submits them through the servicer; the core hands every request's outputs
to one queue; the RPC's generator turns them into responses (stream pieces, whole answers, empty
final responses, errors) and yields them, and cancels what still runs when the stream ends.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from tritonclient.grpc import service_pb2 as pb

from llamaforge.runtime.core.requests import GenerationOutput, OutputSink
from llamaforge.runtime.serving.admission import SHUTTING_DOWN, Ticket
from llamaforge.runtime.serving.model_stats import RequestTimer
from llamaforge.runtime.serving.protocol import ParsedRequest
from llamaforge.runtime.serving.responses import FINAL_PARAM, BeamResponseBuilder, ResponseBuilder

if TYPE_CHECKING:  # the servicer creates streams; this module only calls back into it
    from llamaforge.runtime.serving.server import InferenceServicer

__all__ = ["InferStream", "Refused", "POLL_S"]

POLL_S = 0.25  # how often a waiting handler checks that its client is still there


class Refused(Exception):
    """A request refused with a gRPC status (raised by `InferenceServicer.submit_rows`), on a unary
    call or a stream alike."""

    def __init__(self, code: grpc.StatusCode, message: str, admitted: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # Rows of the refused request the core had already taken: the caller cancels them once
        # it has stopped listening to them.
        self.admitted = admitted


_READER_DONE = object()  # the reader thread's last item on the stream's queue


@dataclass(eq=False)
class _StreamGroup:
    """The rows of one request on a stream: its final flag and statistics wait for the last one."""

    request: pb.ModelInferRequest
    timer: RequestTimer
    ticket: Ticket
    open_rows: int = 0  # rows admitted and not yet ended
    failed: bool = False


@dataclass(eq=False)
class _StreamRequest:
    """One sequence of one row of a request on a stream, as the stream's sender sees it (a row has
    one, or n with num_return_sequences / beams; `row_open` counts the row's sequences not ended)."""

    group: _StreamGroup
    parsed: ParsedRequest
    builder: ResponseBuilder | BeamResponseBuilder
    row_open: list[int]
    ended: bool = False

    @property
    def request(self) -> pb.ModelInferRequest:
        return self.group.request

    @property
    def timer(self) -> RequestTimer:
        return self.group.timer


class InferStream:
    """One ModelStreamInfer call. A reader thread takes requests and submits them; the core hands
    every request's outputs to one queue (a sink called in the core's thread, not a thread per
    request); the RPC's generator turns them into responses and yields them."""

    def __init__(self, servicer: InferenceServicer, context: Any) -> None:
        self.servicer = servicer
        self.context = context
        self.out: queue.Queue[Any] = queue.Queue()  # responses, (_StreamRequest, output), _READER_DONE
        self.lock = threading.Lock()
        self.active: set[str] = set()  # ids of started requests not yet ended, for cancel_all
        self.started = 0  # requests admitted; with `ended`, tells the generator when all are done
        self.ended = 0
        self.closed = False
        self.tickets: set[Ticket] = set()  # of requests not yet answered (see admission.py)

    def read(self, request_iterator: Any) -> None:
        try:
            for request in request_iterator:
                self.start(request)
        except Exception:  # noqa: BLE001 - the client went away: nothing more will come
            pass
        finally:
            self.out.put(_READER_DONE)

    def start(self, request: pb.ModelInferRequest) -> None:
        refusal = self.servicer.unavailable
        ticket = self.servicer.admission.admit() if refusal is None else None
        if ticket is None:  # draining: this request is refused, the stream and its running requests go on
            self.out.put(self.error(request, refusal or SHUTTING_DOWN))
            return
        with self.lock:
            self.tickets.add(ticket)
        timer = RequestTimer()
        group = _StreamGroup(request, timer, ticket)
        entries: list[_StreamRequest] = []

        def sink(parsed: ParsedRequest) -> OutputSink:
            n = parsed.generation.n
            if parsed.generation.beam_width > 1:
                return beam_sink(parsed, n)
            row_open = [n]
            states = [_StreamRequest(group, parsed, ResponseBuilder(parsed, request.model_name), row_open)
                      for _ in range(n)]
            with self.lock:
                entries.extend(states)
                group.open_rows += n

            def put(out: GenerationOutput) -> None:
                timer.output(out)
                self.out.put((states[out.sequence_index], out))
            return put

        def beam_sink(parsed: ParsedRequest, n: int) -> OutputSink:
            """A row's beams answer once, stacked (TensorRT-LLM's beam search response): the core
            sends every beam's final output together; the last one sends the response."""
            state = _StreamRequest(group, parsed, BeamResponseBuilder(parsed, request.model_name), [1])
            with self.lock:
                entries.append(state)
                group.open_rows += 1
            arrived = [0]

            def put(out: GenerationOutput) -> None:
                timer.output(out)
                arrived[0] += out.finished
                if arrived[0] < n:
                    state.builder.add(out)
                else:
                    self.out.put((state, out))
            return put

        try:
            rows = self.servicer.submit_rows(request, streaming_rpc=True, timer=timer, sink=sink, ticket=ticket)
        except Exception as e:  # noqa: BLE001 - one bad request must not end the stream
            with self.lock:  # rows the core took before refusing one: their outputs are dropped
                for state in entries:
                    state.ended = True
            if isinstance(e, Refused):
                self.servicer.cancel_ids(e.admitted)
            self.release(ticket)
            self.servicer.record_refused(request, timer)
            message = e.message if isinstance(e, Refused) else f"internal error: {e!r}"
            self.out.put(self.error(request, message))
            return
        ids = [parsed.generation.request_id for parsed, _ in rows]
        with self.lock:
            self.started += len(entries)
            for state in entries:
                if not state.ended:  # its last output may already have been sent
                    self.active.add(state.parsed.generation.request_id)
            closed = self.closed
        if closed:  # cancel_all has run: nobody will answer these
            self.servicer.cancel_ids(ids)
            self.release(ticket)

    def release(self, ticket: Ticket) -> None:
        with self.lock:
            self.tickets.discard(ticket)
        ticket.release()

    def error(self, request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
        if request.id:  # tritonclient hands a stream callback only the message
            message = f"{message} (request id '{request.id}')"
        return pb.ModelStreamInferResponse(error_message=message, infer_response=pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version or "1", id=request.id))

    def responses_for(self, st: _StreamRequest, out: GenerationOutput) -> list[pb.ModelStreamInferResponse]:
        """The responses one core output makes: a piece of the stream (stream=true), the whole
        answer (stream=false, at the end), an empty final response, or the error it ended with."""
        if st.ended:  # failed while building an earlier response, or refused: already answered
            return []
        responses = []
        parsed, group, failure = st.parsed, st.group, None
        completed = not out.finished or out.finish_reason in ("stop", "length")  # else: cancelled or failed
        # A non-decoupled model sends its one response final, with no empty final response.
        empty_final = parsed.empty_final and self.servicer.decoupled
        # The request's last response: this row's last, when no other row is still open.
        last_row = out.finished and group.open_rows == 1
        try:
            with st.timer.building():
                if completed and parsed.stream:
                    resp = st.builder.piece(out, out.finished and last_row and not empty_final)
                    if resp is not None:
                        responses.append(pb.ModelStreamInferResponse(infer_response=resp))
                elif completed:
                    st.builder.add(out)
                    if out.finished:
                        resp = st.builder.whole()
                        resp.parameters[FINAL_PARAM].bool_param = last_row and not empty_final
                        responses.append(pb.ModelStreamInferResponse(infer_response=resp))
                if completed and last_row and empty_final:
                    responses.append(pb.ModelStreamInferResponse(infer_response=st.builder.empty_final()))
        except Exception as e:  # noqa: BLE001 - report it on the stream rather than leave the client waiting
            self.servicer.core.cancel(parsed.generation.request_id)
            failure = f"internal error: {e!r}"
        if out.finished or failure is not None:
            ok = failure is None and completed
            if not ok:
                if failure is None:
                    failure = f"request {out.finish_reason}" + (f": {out.error}" if out.error else "")
                responses.append(self.error(st.request, failure))
            with self.lock:
                st.ended = True
                self.ended += 1
                st.row_open[0] -= 1
                if not st.row_open[0]:
                    self.active.discard(parsed.generation.request_id)
                group.open_rows -= 1
                group.failed = group.failed or not ok
                request_done = group.open_rows == 0
            if request_done:
                self.servicer.record(st.request.model_name, not group.failed, st.timer)
        return responses

    def cancel_all(self) -> None:
        """The stream has ended (or its client has gone): cancel what runs, give back every ticket."""
        with self.lock:
            self.closed = True
            ids = list(self.active)
            tickets, self.tickets = self.tickets, set()
        for rid in ids:
            self.servicer.core.cancel(rid)
        for ticket in tickets:
            ticket.release()

    def responses(self) -> Any:
        reader_done = False
        try:
            while True:
                try:
                    item = self.out.get(timeout=POLL_S)
                except queue.Empty:
                    if not self.context.is_active():
                        return
                    continue
                if item is _READER_DONE:
                    reader_done = True
                elif isinstance(item, tuple):
                    yield from self.responses_for(*item)
                    group = item[0].group
                    if group.open_rows == 0:  # the request's last response has gone to the transport
                        self.release(group.ticket)
                else:
                    yield item
                if reader_done:
                    with self.lock:
                        idle = self.ended == self.started
                    if idle and self.out.empty():
                        return
        finally:  # returned, or closed by gRPC when the RPC ended: nothing more will be answered
            self.cancel_all()
