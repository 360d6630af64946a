"""The engine core's statistics: counters its parts bump from the step loop's thread, and the
`stats()` snapshot the front ends export as gauges and counters (`runtime/serving/metrics.py`,
`triton_repo/models/metrics.py`)."""

from __future__ import annotations

from dataclasses import dataclass

from llamaforge.runtime.core.kv_cache import KVUsage, PrefixCacheStats


@dataclass
class CoreStats:
    steps: int = 0  # steps that ran at least one engine call
    generated_tokens: int = 0  # tokens sampled, end tokens included
    # Where decode time goes; bench/kv_layout.py reads these to weigh the block gathers.
    decode_steps: int = 0
    decode_gathers: int = 0  # decode steps that gathered rows from blocks (a rebuild or newcomers)
    decode_gather_s: float = 0.0  # building the call's inputs, gathers included
    decode_engine_s: float = 0.0
    decode_scatter_s: float = 0.0
    verify_steps: int = 0  # speculative decoding: calls that verified drafts

    def snapshot(self, waiting: int, running: int, kv: KVUsage, prefix: PrefixCacheStats) -> dict[str, float]:
        """`EngineCore.stats()`: queue and batch sizes, KV usage in tokens (blocks held by sequences,
        and free blocks that keep cached content), prefix-cache lookups in tokens, tokens generated."""
        return {
            "waiting": waiting,
            "running": running,
            "kv_total_tokens": kv.total_tokens,
            "kv_used_tokens": kv.used_tokens,
            "kv_free_tokens": kv.free_tokens,
            "kv_free_fraction": kv.free_fraction,
            "kv_cached_free_tokens": kv.cached_tokens,
            "prefix_cache_queries_tokens": prefix.queries_tokens,
            "prefix_cache_hit_tokens": prefix.hit_tokens,
            "generated_tokens": self.generated_tokens,
        }
