"""Prometheus metrics of the serving runtime, scraped at `http://HOST:METRICS_PORT/metrics`.

`ServerMetrics` is the engine core's `CoreObserver` (its callbacks come from the step thread and
only touch prometheus-client objects, which are thread-safe and cheap) and owns a dedicated
`CollectorRegistry`, so several servers can run in one process. Gauges that mirror the core's
state are read from `core.stats()` at scrape time.

Metric names (the Triton backend mirrors them):

    llamaforge_requests_total{outcome}          counter    finished or refused requests; outcome is
                                                           stop | length | cancelled | error (from the
                                                           core) | rejected (queue full) | invalid
                                                           (failed validation)
    llamaforge_prompt_tokens_total              counter    prompt tokens of admitted requests
    llamaforge_generated_tokens_total           counter    tokens sampled by the core
    llamaforge_queue_depth                      gauge      requests waiting for a slot
    llamaforge_running_sequences                gauge      sequences in the running batch
    llamaforge_kv_cache_total_tokens            gauge      KV cache capacity (tokens)
    llamaforge_kv_cache_used_tokens             gauge      KV cache positions in use
    llamaforge_kv_cache_free_tokens             gauge      KV cache positions free
    llamaforge_kv_cache_free_fraction           gauge      free / total
    llamaforge_kv_cache_cached_free_tokens      gauge      free positions that keep cached prefix content
    llamaforge_prefix_cache_queries_tokens_total counter   prompt tokens looked up in the prefix cache
    llamaforge_prefix_cache_hits_tokens_total   counter    of them, found cached (vLLM's prefix_cache_hits)
    llamaforge_spec_decode_draft_tokens_total   counter    speculative decoding: draft tokens verified
    llamaforge_spec_decode_accepted_tokens_total counter   of them, accepted
    llamaforge_time_to_first_token_seconds      histogram  arrival at the core -> first token
    llamaforge_inter_token_latency_seconds      histogram  between consecutive tokens of a request
    llamaforge_request_duration_seconds         histogram  server receipt -> last response, per
                                                           admitted request
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, MetricsHandler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ServerMetrics", "METRIC_NAMES", "OUTCOMES", "PREFIX", "CORE_COUNTERS", "CORE_GAUGES", "TTFT_BUCKETS", "LATENCY_BUCKETS"]

PREFIX = "llamaforge_"
OUTCOMES = ("stop", "length", "cancelled", "error", "rejected", "invalid")
METRIC_NAMES = tuple(PREFIX + n for n in (
    "requests_total", "prompt_tokens_total", "generated_tokens_total", "queue_depth", "running_sequences",
    "kv_cache_total_tokens", "kv_cache_used_tokens", "kv_cache_free_tokens", "kv_cache_free_fraction",
    "kv_cache_cached_free_tokens", "prefix_cache_queries_tokens_total", "prefix_cache_hits_tokens_total",
    "spec_decode_draft_tokens_total", "spec_decode_accepted_tokens_total",
    "time_to_first_token_seconds", "inter_token_latency_seconds", "request_duration_seconds",
))

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


# Gauges that mirror the engine core: (name after PREFIX, key of `core.stats()`, help). The Triton
# backend (triton_repo/models/metrics.py) publishes the same table through pb_utils.MetricFamily.
CORE_GAUGES = (
    ("queue_depth", "waiting", "Requests waiting for a slot in the running batch."),
    ("running_sequences", "running", "Sequences in the running batch."),
    ("kv_cache_total_tokens", "kv_total_tokens", "KV cache capacity in tokens."),
    ("kv_cache_used_tokens", "kv_used_tokens", "KV cache positions in use."),
    ("kv_cache_free_tokens", "kv_free_tokens", "KV cache positions free."),
    ("kv_cache_free_fraction", "kv_free_fraction", "Free fraction of the KV cache."),
    ("kv_cache_cached_free_tokens", "kv_cached_free_tokens",
     "Free KV cache positions that keep reusable prefix content (taken last)."),
)
# Counters that mirror the engine core: (name after PREFIX, without _total; key of `core.stats()`; help).
CORE_COUNTERS = (
    ("generated_tokens", "generated_tokens", "Tokens sampled by the engine core."),
    ("prefix_cache_queries_tokens", "prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits_tokens", "prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache."),
    ("spec_decode_draft_tokens", "spec_draft_tokens", "Speculative decoding: draft tokens verified."),
    ("spec_decode_accepted_tokens", "spec_accepted_tokens", "Speculative decoding: draft tokens accepted."),
)


class _CoreCollector(Collector):
    """Gauges and counters read from `core.stats()` at scrape time."""

    _GAUGES = CORE_GAUGES

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        core = self._metrics.core
        stats: dict[str, Any] = {}
        if core is not None:
            try:
                stats = dict(core.stats())
            except Exception:  # noqa: BLE001 - a scrape must not fail because the core is stopping
                stats = {}
        for name, key, doc in self._GAUGES:
            yield GaugeMetricFamily(PREFIX + name, doc, value=float(stats.get(key, 0)))
        for name, key, doc in CORE_COUNTERS:
            yield CounterMetricFamily(PREFIX + name, doc, value=float(stats.get(key, 0)))


class ServerMetrics:
    """CoreObserver + the server's own counters, in a private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.core: Any = None
        self.requests = Counter(PREFIX + "requests", "Requests by outcome.", ["outcome"], registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of admitted requests.",
                                     registry=self.registry)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive tokens.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.duration = Histogram(PREFIX + "request_duration_seconds", "Request duration at the server.",
                                  buckets=_DURATION_BUCKETS, registry=self.registry)
        self.registry.register(_CoreCollector(self))
        # Request ids the core finished as cancelled, recorded only from `watch_cancellations()` on
        # (a drain's count of what its cancellation really ended; a set kept forever would grow).
        self._cancelled: set[str] | None = None
        self._http: Any = None
        self._http_thread: threading.Thread | None = None

    def attach(self, core: Any) -> None:
        self.core = core

    # -- CoreObserver ----------------------------------------------------------------------------
    def on_first_token(self, request_id: str, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_token(self, request_id: str, itl_s: float) -> None:
        self.itl.observe(itl_s)

    def on_finished(self, request_id: str, reason: str, num_output_tokens: int) -> None:
        self.requests.labels(reason if reason in OUTCOMES else "error").inc()
        if reason == "cancelled" and self._cancelled is not None:
            self._cancelled.add(request_id)

    def watch_cancellations(self) -> None:
        """Record the ids of requests the core finishes as cancelled from now on (see `was_cancelled`)."""
        self._cancelled = set()

    def was_cancelled(self, request_id: str) -> bool:
        return self._cancelled is not None and request_id in self._cancelled

    # -- server-side events ---------------------------------------------------------------------------
    def on_rejected(self) -> None:
        self.requests.labels("rejected").inc()

    def on_invalid(self) -> None:
        self.requests.labels("invalid").inc()

    def on_admitted(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_request_done(self, duration_s: float) -> None:
        self.duration.observe(duration_s)

    # -- HTTP endpoint -----------------------------------------------------------------------------------
    def start_http(self, host: str = "127.0.0.1", port: int = 8002) -> int:
        """Serve /metrics (prometheus-client's handler); returns the bound port (0: a free one)."""
        self._http = ThreadingHTTPServer((host, port), MetricsHandler.factory(self.registry))
        self._http.daemon_threads = True
        # A short poll interval so that stop_http() returns at once (tests start many servers).
        self._http_thread = threading.Thread(target=self._http.serve_forever, kwargs={"poll_interval": 0.05},
                                             name="metrics-http", daemon=True)
        self._http_thread.start()
        return int(self._http.server_address[1])

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
            self._http_thread = None
