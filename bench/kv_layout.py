"""How the KV cache is held, measured: paged blocks rather than one fixed slot per sequence, and a
decode step that updates its cache arrays in place rather than copying them.

1. Capacity: for the same token budget, how many sequences can hold their KV at once when every
   sequence reserves a full-context slot, versus when it holds only the blocks its tokens fill.
   Lengths are drawn from the same mixed prompt/output distribution as `make bench-serve`.
2. Cost: blocks must be gathered into the attention op's per-row layout when a decode batch
   changes. Runs the engine core on a mixed workload and reports the time spent gathering and
   scattering against the time spent in the engine, and how often the batch had to be regathered.
3. In place: one decode step of 16 rows, each with half the context cached, through `Engine.step`
   (ORT gets the past caches and returns new present caches: a copy of every row's whole cache)
   and through `Engine.decode_in_place_step` (past and present bound to one buffer, the GQA kernel
   appends the new token); median of 7 after a warm-up, and the ratio.

  python bench/kv_layout.py [ENGINE_DIR]      (make bench-kv; default engines/stdlib-5m, built by
                                               `make engine`; bench/.work/engine-bench after `make bench-serve`)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from timing import call_times

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
from llamaforge.runtime.core.engine_core import EngineCore
from llamaforge.runtime.core.kv_cache import KVCacheManager
from llamaforge.runtime.core.requests import GenerationRequest
from llamaforge.runtime.core.sampling import SamplingParams


def capacity_table(budget: int, context: int, block: int, rng: np.random.Generator) -> None:
    prompt = rng.integers(16, context // 2, size=10_000)
    output = rng.integers(16, context // 4, size=10_000)
    need = prompt + output
    slots = budget // context
    blocks_needed = -(-need // block)
    fits = int(np.searchsorted(np.cumsum(blocks_needed), budget // block, side="right"))
    print(f"capacity, budget {budget} tokens, context {context}, lengths prompt~U[16,{context // 2}) + output~U[16,{context // 4})")
    print(f"  slots (one full-context slot per sequence): {slots:>5} sequences")
    print(f"  blocks of {block} tokens:                   {fits:>5} sequences  ({fits / max(slots, 1):.1f}x)")


def cost(engine_dir: str, rng: np.random.Generator) -> None:
    core = EngineCore(engine_dir, CoreConfig(KVCacheConfig(budget_tokens=16384),
                                             SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256)))
    vocab = core.engine.vocab_size
    core.start()
    handles = []
    start = time.perf_counter()
    for i in range(48):
        prompt = rng.integers(3, vocab, size=int(rng.integers(16, 200))).tolist()
        handles.append(core.submit(GenerationRequest(f"r{i}", prompt, int(rng.integers(16, 96)),
                                                     SamplingParams(temperature=0.8, seed=i), end_ids=())))
        time.sleep(float(rng.exponential(0.02)))
    for h in handles:
        list(h)
    wall = time.perf_counter() - start
    core.stop()
    c = core.counters
    data = c.decode_gather_s + c.decode_scatter_s
    print(f"cost, {len(handles)} requests through the engine core ({engine_dir}), {wall:.1f}s wall")
    print(f"  decode steps {c.decode_steps}, regathered {c.decode_gathers} ({c.decode_gathers / max(c.decode_steps, 1):.0%}); "
          f"other steps reuse the previous call's cache arrays")
    print(f"  engine {c.decode_engine_s:.2f}s   gather {c.decode_gather_s:.3f}s   scatter {c.decode_scatter_s:.3f}s   "
          f"-> block bookkeeping = {data / c.decode_engine_s:.1%} of engine time")


def in_place(engine_dir: str, rows: int = 16, repeat: int = 7) -> None:
    from llamaforge.runtime.core.engine import Engine

    engine = Engine(engine_dir)
    if not engine.decode_in_place:
        print(f"in place: {engine_dir} cannot update its cache in place (manifest kv_cache.decode_in_place)")
        return
    capacity = min(engine.kv.max_capacity, 1024)
    ids = np.ones((rows, 1), np.int64)
    lengths = np.full(rows, capacity // 2, np.int32)
    caches = engine.kv.empty(rows, capacity)

    copied = 1e3 * float(np.median(call_times(lambda: engine.step(ids, lengths, caches), repeat)))
    in_place_ms = 1e3 * float(np.median(call_times(lambda: engine.decode_in_place_step(ids, lengths, caches), repeat)))
    mb = rows * capacity * KVCacheManager.bytes_per_token(engine.kv) / 1e6
    print(f"in place, decode step of {rows} rows at {capacity // 2}/{capacity} cached tokens ({mb:.0f} MB of cache):")
    print(f"  copying past -> present: {copied:7.1f} ms   in place: {in_place_ms:7.1f} ms   -> {copied / in_place_ms:.2f}x")


def main() -> None:
    rng = np.random.default_rng(0)
    capacity_table(budget=131072, context=8192, block=16, rng=rng)
    capacity_table(budget=32768, context=2048, block=16, rng=rng)
    engine_dir = sys.argv[1] if len(sys.argv) > 1 else "engines/stdlib-5m"
    if Path(engine_dir, "manifest.json").exists():
        cost(engine_dir, rng)
        in_place(engine_dir)
    else:
        print(f"(no engine at {engine_dir}: run `make engine` for the cost and in-place parts)")


if __name__ == "__main__":
    main()
