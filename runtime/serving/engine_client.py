"""What the front ends need from an engine core, as one typed seam.

The gRPC server (runtime/serving/server.py) and the Triton `llama` model (triton_repo/models/llama.py)
are typed against `EngineClient`, not against `EngineCore`; `EngineCore` (runtime/core/engine_core.py)
and the tests' `FakeCore` (tests/helpers/fake_core.py) both satisfy it, which mypy checks
(tests/serving/test_engine_client.py), so a method that goes missing or changes its signature on
either side fails type checking rather than a request at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # annotations only: importing the core here would tie protocol.py's imports to it
    from llamaforge.runtime.core.engine_core import CoreObserver
    from llamaforge.runtime.core.manifest import EngineManifest
    from llamaforge.runtime.core.requests import GenerationRequest, OutputSink, RequestHandle
    from llamaforge.runtime.core.tokenizer import Tokenizer

__all__ = ["EngineClient", "AdmissionLimits"]


class AdmissionLimits(Protocol):
    """The part of the core's configuration a front end sizes itself by: at most `max_num_seqs`
    requests run and `max_queue` wait; the core refuses more with QueueFullError."""

    @property
    def max_num_seqs(self) -> int: ...
    @property
    def max_queue(self) -> int: ...


class EngineClient(Protocol):
    """An engine core as a front end drives it.

    `submit` queues a request (RequestError: a field is wrong; QueueFullError: the waiting queue is
    full); its outputs go to the returned handle, or, with `sink`, to `sink(output)` called from the
    core's thread, ending with one output that has `finished` set. `cancel` ends a request as
    "cancelled" (its KV freed within one step); cancelling an unknown or finished request does
    nothing. `stop` ends every request left as "cancelled". `stats` has the keys
    runtime/serving/metrics.py `CORE_GAUGES` names, plus "generated_tokens"."""

    @property
    def config(self) -> AdmissionLimits: ...
    @property
    def manifest(self) -> EngineManifest: ...
    @property
    def model_name(self) -> str: ...
    @property
    def tokenizer(self) -> Tokenizer | None: ...
    @property
    def context_length(self) -> int: ...
    @property
    def eos_ids(self) -> tuple[int, ...]: ...

    observer: CoreObserver | None  # set by a front end that adds its metrics to a core made without

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def submit(self, request: GenerationRequest, sink: OutputSink | None = None) -> RequestHandle: ...
    def cancel(self, request_id: str) -> None: ...
    def stats(self) -> dict[str, float]: ...
