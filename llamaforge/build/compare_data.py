"""Inputs for `polygraphy run --data-loader-script` (make compare-trt): feeds for an engine directory's
graph interface, read from its manifest (`LLAMAFORGE_ENGINE`, default engines/stdlib-5m).

Prefill feeds within the context profile: `COMPARE_BATCH` rows (default 2) of `COMPARE_SEQ` tokens
(default 16) continuing `COMPARE_PAST` cached tokens (default 8). Every row has the same lengths and
the cache capacity is exactly past + seq, so every position of `present_*` is defined (the op leaves
positions past a row's length unspecified) and all outputs can be compared. Seeded: each run of
polygraphy gets the same feeds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llamaforge.runtime.core.manifest import EngineManifest


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def load_data() -> Iterator[dict[str, np.ndarray]]:
    engine = Path(os.environ.get("LLAMAFORGE_ENGINE", "engines/stdlib-5m"))
    manifest = EngineManifest.read(engine)
    kv, vocab = manifest.kv_cache, manifest.vocab_size
    batch, seq, past = _int("COMPARE_BATCH", 2), _int("COMPARE_SEQ", 16), _int("COMPARE_PAST", 8)
    dtypes = {i.name: np.dtype(i.dtype) for i in manifest.inputs}
    rng = np.random.default_rng(0)
    for _ in range(_int("COMPARE_ITERATIONS", 1)):
        feed: dict[str, np.ndarray] = {"input_ids": rng.integers(0, vocab, (batch, seq), dtype=np.int64),
                                       "past_lengths": np.full(batch, past, dtype=np.int32)}
        if "logits_index" in dtypes:  # compare every position's logits
            feed["logits_index"] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        shape = (batch, kv.num_kv_heads, past + seq, kv.head_dim)
        for layer in range(kv.num_layers):
            for name in (f"past_key.{layer}", f"past_value.{layer}"):
                feed[name] = rng.standard_normal(shape, dtype=np.float32).astype(dtypes[name])
        yield feed
