"""Admission of work into the front ends, and the drain on shutdown (`llamaforge serve --drain-timeout`).

Both front ends (the gRPC server and the OpenAI-compatible HTTP one) share one `Admission`. A request
takes a `Ticket` before it reaches the core and gives it back once it has been answered (its last
response handed to the transport, or its client gone); the ticket lists the core request ids of its
rows, so a drain that runs out of time can cancel them.

    ticket = admission.admit()       # None once draining: answer UNAVAILABLE / 503
    ticket.rows.append(request_id)   # each row submitted to the core
    ticket.release()                 # idempotent

The drain (`drain()`, what serve() does on SIGTERM/SIGINT) is Triton's --exit-timeout-secs: stop
admitting at once, wait for the admitted requests (running or still queued) to be answered, and when
the timeout passes cancel those left in the core (which frees their KV within one step), so their
clients get CANCELLED / 503 rather than a dropped connection.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Admission", "Ticket", "DrainResult", "SHUTTING_DOWN"]

SHUTTING_DOWN = "the server is shutting down: it admits no new requests"  # UNAVAILABLE / 503 while draining


class Ticket:
    """One admitted front-end request (see the module docstring)."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.rows: list[str] = []  # core request ids, appended as they are submitted
        self.released = False

    def release(self) -> None:
        self._admission._release(self)


@dataclass(frozen=True)
class DrainResult:
    """What a drain did: `drained` requests were answered in time, `cancelled` were cancelled when
    the timeout passed (or a second signal cut the wait short), `seconds` it took."""

    drained: int
    cancelled: int
    seconds: float
    left: int = 0  # still not answered after the cancellation wait (their handlers end with the server)


class Admission:
    """The gate both front ends admit requests through (thread-safe)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tickets: set[Ticket] = set()
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def in_flight(self) -> int:
        with self._cond:
            return len(self._tickets)

    def admit(self) -> Ticket | None:
        """A ticket for a new request, or None once draining."""
        with self._cond:
            if self._draining:
                return None
            ticket = Ticket(self)
            self._tickets.add(ticket)
            return ticket

    def _release(self, ticket: Ticket) -> None:
        with self._cond:
            if ticket.released:
                return
            ticket.released = True
            self._tickets.discard(ticket)
            if not self._tickets:
                self._cond.notify_all()

    def start_draining(self) -> None:
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float, interrupt: threading.Event | None = None) -> bool:
        """Wait until no ticket is out (True), the timeout passes or `interrupt` is set (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._tickets:
                left = deadline - time.monotonic()
                if left <= 0 or (interrupt is not None and interrupt.is_set()):
                    return False
                # Bounded waits, so a set `interrupt` (no notify of its own) is seen promptly.
                self._cond.wait(min(left, 0.1))
            return True

    def cancel_all(self, cancel: Callable[[str], None]) -> list[Ticket]:
        """Cancel in the core every row of every ticket still out; those tickets."""
        with self._cond:
            tickets = list(self._tickets)
        for ticket in tickets:
            for request_id in list(ticket.rows):
                cancel(request_id)
        return tickets

    def drain(self, timeout: float, cancel: Callable[[str], None], interrupt: threading.Event | None = None,
              cancel_wait: float = 5.0, was_cancelled: Callable[[str], bool] | None = None) -> DrainResult:
        """Stop admitting, wait up to `timeout` s for the requests in flight, then cancel the rest and
        wait up to `cancel_wait` s for their handlers to answer them. `was_cancelled(request_id)`,
        where given, tells which rows the core really ended as cancelled: a request whose last output
        the core had sent just before the timeout, its handler not yet done, counts as answered."""
        start = time.monotonic()
        self.start_draining()
        before = self.in_flight
        if self.wait_idle(timeout, interrupt):
            return DrainResult(before, 0, time.monotonic() - start)
        tickets = self.cancel_all(cancel)
        self.wait_idle(cancel_wait)
        cancelled = len(tickets) if was_cancelled is None else \
            sum(1 for t in tickets if any(was_cancelled(r) for r in t.rows) or not t.rows)
        return DrainResult(before - cancelled, cancelled, time.monotonic() - start, left=self.in_flight)
