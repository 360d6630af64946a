"""`llamaforge serve`: one process, one engine core, the gRPC server (runtime/serving/server.py), the
OpenAI-compatible HTTP front end (runtime/serving/openai_server.py) and /metrics, until SIGTERM/SIGINT.

    llamaforge serve ENGINE [--host 127.0.0.1] [--port 8001] [--http-port 8000] [--metrics-port 8002]
        [--tls-cert FILE --tls-key FILE [--tls-client-ca FILE]] [--api-key KEY | $LLAMAFORGE_API_KEY]
        [--drain-timeout 30] ...

Shutdown (docs/serving.md, "Production switches"): the first signal starts the drain (admission.py):
not ready at once, new requests UNAVAILABLE / 503, the admitted ones run to the end for up to
`drain_timeout` seconds, then those left are cancelled; the ports close and serve() returns (the CLI
exits 0). A second signal cuts the wait short.

A tensor-parallel engine (docs/tensor_parallel.md, "Running") is served by rank 0 of its ranks:
`mpiexec -disable-auto-cleanup -n N llamaforge serve ENGINE` (every rank runs this function; ranks
>= 1 run their shard and return), or `llamaforge serve ENGINE` alone, which spawns the other ranks.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import TYPE_CHECKING, Any

from llamaforge.runtime.parallel.launch import exit_after_failure, start_rank, watch_ranks
from llamaforge.runtime.parallel.world import DEFAULT_TIMEOUT_S
from llamaforge.runtime.serving.engine_client import EngineClient
from llamaforge.runtime.serving.metrics import ServerMetrics
from llamaforge.runtime.serving.security import load_tls, resolve_api_key
from llamaforge.runtime.serving.server import (
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_MAX_MESSAGE_BYTES,
    InferenceServer,
    address,
)

if TYPE_CHECKING:
    from llamaforge.runtime.core.engine_core import CoreConfig

__all__ = ["serve"]


def serve(engine_dir: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8001,
          metrics_port: int | None = 8002, core_config: CoreConfig | None = None,
          max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, decoupled: bool = True,
          http_port: int | None = None, tls_cert: str | os.PathLike[str] | None = None,
          tls_key: str | os.PathLike[str] | None = None, tls_client_ca: str | os.PathLike[str] | None = None,
          api_key: str | None = None, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S,
          tp_timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Load the engine, serve until SIGINT/SIGTERM, drain, return. `host`: the address every port binds
    (gRPC, HTTP, metrics); `decoupled`: the models' transaction policy; `http_port`: also serve the
    OpenAI-compatible HTTP front end on the same core, with `max_message_bytes` as its body limit
    (None: no HTTP; 0: a free port).

    `tls_cert`/`tls_key` (`tls_client_ca`): TLS on gRPC and HTTP (security.py); `api_key` (default
    $LLAMAFORGE_API_KEY): required on inference and metadata; `drain_timeout`: how long the drain waits
    for the requests in flight before cancelling them. Bad settings raise ValueError naming the flag
    before the engine loads or a port binds.

    A tensor-parallel engine runs as the ranks of an MPI job (`mpiexec -n N llamaforge serve ...`):
    rank 0 serves, the others run their shard (runtime/parallel/launch.py); `tp_timeout`: how long a
    step's collective waits for the other ranks before the engine is marked unavailable."""
    from llamaforge.runtime.core.engine_core import CoreConfig, EngineCore
    from llamaforge.runtime.serving.openai_server import HttpServer, OpenAIFrontend

    if not drain_timeout >= 0:  # also refuses NaN
        raise ValueError(f"--drain-timeout: must be >= 0 seconds, got {drain_timeout}")
    tls = load_tls(tls_cert, tls_key, tls_client_ca)
    key = resolve_api_key(api_key)
    core_config = core_config or CoreConfig()
    if start_rank(engine_dir, core_config.threads, tp_timeout):  # a tensor-parallel rank >= 1: its part is done
        return
    metrics = ServerMetrics()
    engine_core = EngineCore(engine_dir, core_config, observer=metrics)
    core: EngineClient = engine_core
    server = InferenceServer(core, host, port, metrics_port, metrics=metrics, max_message_bytes=max_message_bytes,
                             decoupled=decoupled, tls=tls, api_key=key)
    stop_ranks = watch_ranks(engine_core, server.servicer.mark_unavailable)
    http = None
    if http_port is not None:
        frontend = OpenAIFrontend(core, metrics, max_body_bytes=max_message_bytes,
                                  ready=lambda: server.servicer.ready, admission=server.admission, api_key=key)
        http = HttpServer(frontend, host, http_port, tls=tls)  # bound now: a busy port fails before anything starts
    first, second = threading.Event(), threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        (second if first.is_set() else first).set()

    # Installed before the start line is printed: a supervisor may signal as soon as it reads it.
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        if http is not None:
            http.start()
    except BaseException:
        for s, h in old.items():
            signal.signal(s, h)
        server.stop(grace=0)
        if http is not None:
            http.stop()
        raise
    names = ", ".join(sorted(server.servicer.models))
    mode = "decoupled" if decoupled else "non-decoupled"
    if tls is not None:
        mode += "; TLS" + (" with client certificates" if tls.client_ca_pem is not None else "")
    if key:
        mode += "; API key required"
    print(f"llama-forge: serving {engine_dir} (models: {names}; {mode}) on grpc {address(host, server.port)}"
          + (f", metrics http://{address(host, server.metrics_port)}/metrics" if server.metrics_port else "")
          + (f", openai {'https' if tls else 'http'}://{address(host, http.port)}/v1" if http is not None else ""),
          flush=True)
    try:
        while not first.wait(1.0):
            pass
        print(f"llama-forge: draining: {server.admission.in_flight} request(s) in flight, up to "
              f"{drain_timeout:g} s; new requests get UNAVAILABLE / 503", flush=True)
        result = server.drain(drain_timeout, interrupt=second)
        stats = core.stats()  # before the core stops: what the drain's cancellations left in the KV cache
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        server.stop(grace=1.0)  # whatever is left ends cancelled with the core, which ends the HTTP ones too
        if http is not None:
            http.stop()
        stop_ranks()
    print(f"llama-forge: stopped after {result.seconds:.1f} s of drain: {result.drained} request(s) answered, "
          f"{result.cancelled} cancelled; KV cache in use: {stats['kv_used_tokens']:g} of "
          f"{stats['kv_total_tokens']:g} tokens", flush=True)
    exit_after_failure()
