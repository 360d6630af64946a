"""The engine core's metrics as Triton custom metrics (pb_utils.MetricFamily), under the names of
the standalone server's Prometheus metrics (runtime/serving/metrics.py): Triton serves them on its own
metrics port (8002, /metrics) next to its nv_* metrics.

    llamaforge_queue_depth, llamaforge_running_sequences, llamaforge_kv_cache_{total,used,free}_tokens,
    llamaforge_kv_cache_free_fraction, llamaforge_kv_cache_cached_free_tokens  GAUGE, from core.stats()
    llamaforge_prefix_cache_{queries,hits}_tokens_total,
    llamaforge_spec_decode_{draft,accepted}_tokens_total     COUNTER, from core.stats()
    llamaforge_time_to_first_token_seconds                  HISTOGRAM (Triton >= 24.09)
    llamaforge_inter_token_latency_seconds                  HISTOGRAM (Triton >= 24.09)
    llamaforge_requests_total{outcome}, llamaforge_prompt_tokens_total,
    llamaforge_generated_tokens_total                       COUNTER

Triton metrics are pushed, not scraped from us, so the gauges are refreshed from the core's
callbacks (throttled to every `refresh_s` while tokens flow, always when a request ends or is
admitted, which is when KV usage and queue depth change most).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import triton_python_backend_utils as pb_utils

from llamaforge.runtime.serving.metrics import (
    CORE_COUNTERS,
    CORE_GAUGES,
    LATENCY_BUCKETS,
    OUTCOMES,
    PREFIX,
    TTFT_BUCKETS,
)

__all__ = ["TritonCoreMetrics"]


class TritonCoreMetrics:
    """CoreObserver of one `llama` model instance; `labels` tell instances apart."""

    def __init__(self, labels: Mapping[str, str], refresh_s: float = 0.1) -> None:
        family = pb_utils.MetricFamily
        self.core: Any = None
        self._labels = dict(labels)
        self._refresh_s = refresh_s
        self._last = 0.0
        self._lock = threading.Lock()
        self._families: list[Any] = []  # the MetricFamily objects must outlive their Metrics

        def metric(name: str, doc: str, kind: Any, **labels: str) -> Any:
            fam = family(name=PREFIX + name, description=doc, kind=kind)
            self._families.append(fam)
            return fam.Metric(labels={**self._labels, **labels})

        self.gauges = [(key, metric(name, doc, family.GAUGE)) for name, key, doc in CORE_GAUGES]
        requests = family(name=PREFIX + "requests_total", description="Requests by outcome.", kind=family.COUNTER)
        self._families.append(requests)
        self.requests = {o: requests.Metric(labels={**self._labels, "outcome": o}) for o in OUTCOMES}
        self.prompt_tokens = metric("prompt_tokens_total", "Prompt tokens of admitted requests.", family.COUNTER)
        self.generated_tokens = metric("generated_tokens_total", "Tokens sampled by the engine core.", family.COUNTER)
        # The core's other counters, pushed as increments since the last refresh (generated tokens
        # are counted by the callbacks themselves).
        self.counters = [(key, metric(name + "_total", doc, family.COUNTER)) for name, key, doc in CORE_COUNTERS
                         if key != "generated_tokens"]
        self._counted: dict[str, float] = {}
        self.ttft = self.itl = None
        histogram = getattr(family, "HISTOGRAM", None)  # added in Triton 24.09
        if histogram is not None:
            for attr, name, doc, buckets in (
                ("ttft", "time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS),
                ("itl", "inter_token_latency_seconds", "Time between consecutive tokens.", LATENCY_BUCKETS),
            ):
                fam = family(name=PREFIX + name, description=doc, kind=histogram)
                self._families.append(fam)
                setattr(self, attr, fam.Metric(labels=self._labels, buckets=list(buckets)))

    def attach(self, core: Any) -> None:
        self.core = core
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if self.core is None or (not force and now - self._last < self._refresh_s):
                return
            self._last = now
        stats = self.core.stats()
        for key, gauge in self.gauges:
            gauge.set(float(stats.get(key, 0)))
        with self._lock:
            for key, counter in self.counters:
                value = float(stats.get(key, 0))
                if value > self._counted.get(key, 0.0):
                    counter.increment(value - self._counted.get(key, 0.0))
                    self._counted[key] = value

    # -- CoreObserver (called from the engine core's step thread) --------------------------------
    def on_first_token(self, request_id: str, ttft_s: float) -> None:
        if self.ttft is not None:
            self.ttft.observe(ttft_s)
        self.generated_tokens.increment(1)
        self.refresh()

    def on_token(self, request_id: str, itl_s: float) -> None:
        if self.itl is not None:
            self.itl.observe(itl_s)
        self.generated_tokens.increment(1)
        self.refresh()

    def on_finished(self, request_id: str, reason: str, num_output_tokens: int) -> None:
        self.requests[reason if reason in OUTCOMES else "error"].increment(1)
        self.refresh(force=True)

    # -- front-end events -----------------------------------------------------------------------
    def on_admitted(self, num_prompt_tokens: int) -> None:
        self.prompt_tokens.increment(num_prompt_tokens)
        self.refresh(force=True)

    def on_refused(self, outcome: str) -> None:
        self.requests[outcome].increment(1)
