"""One rank of a tensor-parallel engine, for the numerics tests (a script, run under mpiexec):

    mpiexec -n N python tp_rank.py ENGINE OUT.npz PROMPTS.json NEW_TOKENS

Each rank opens its own graph (ENGINE/rank{i}/model.onnx; ENGINE/model.onnx for a TP=1 engine,
run as one process) with the all-reduce kernel bound to MPI_COMM_WORLD, then runs the same steps as
every other rank: one prefill of the right-padded prompts asking for every position's logits, and a
greedy decode of each prompt with a plain NumPy KV cache. Rank 0 gathers the vocabulary shards in
rank order, picks each next token and broadcasts it, and saves `prefill` [batch, longest, vocab]
and `tokens` [batch, NEW_TOKENS] to OUT.npz. The serving runtime's TP engine is runtime/parallel/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from mpi4py import MPI

from llamaforge.runtime.core.manifest import EngineManifest
from llamaforge.runtime.parallel import collective


def main(engine: Path, out: Path, prompts: list[list[int]], new_tokens: int) -> None:
    comm = MPI.COMM_WORLD
    top = EngineManifest.read(engine)
    rank_dir = engine if top.tensor_parallel is None else engine / f"rank{comm.rank}"
    manifest = EngineManifest.read(rank_dir)
    size = 1 if manifest.tensor_parallel is None else manifest.tensor_parallel.size
    assert size == comm.size, f"{engine} has {size} ranks, mpiexec started {comm.size}"
    collective.bind_communicator(comm)
    options = collective.session_options()
    options.intra_op_num_threads = 1
    for key, value in (manifest.ort_session_config or {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(rank_dir / manifest.model_file), options, providers=["CPUExecutionProvider"])
    kv = manifest.kv_cache
    dtype = np.dtype(kv.dtype)

    def run(ids: np.ndarray, lengths: np.ndarray, index: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list]:
        feeds = {"input_ids": ids, "past_lengths": lengths.astype(np.int32), "logits_index": index}
        for layer in range(kv.num_layers):
            feeds[f"past_key.{layer}"], feeds[f"past_value.{layer}"] = past[2 * layer], past[2 * layer + 1]
        logits, *present = session.run(None, feeds)
        shards = comm.gather(logits, root=0)  # vocabulary shards, rank order
        return (np.concatenate(shards, axis=-1) if comm.rank == 0 else logits), present

    def empty(batch: int, capacity: int) -> list[np.ndarray]:
        return [np.zeros((batch, kv.num_kv_heads, capacity, kv.head_dim), dtype) for _ in range(2 * kv.num_layers)]

    longest = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), longest), np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    index = np.tile(np.arange(longest, dtype=np.int64), (len(prompts), 1))
    prefill, _ = run(ids, np.zeros(len(prompts), np.int32), index, empty(len(prompts), longest))

    tokens = np.zeros((len(prompts), new_tokens), np.int64)
    for b, p in enumerate(prompts):
        past = empty(1, len(p) + new_tokens)
        step_ids, length = np.array([p], np.int64), 0
        for t in range(new_tokens):
            logits, past = run(step_ids, np.array([length]), np.array([[step_ids.shape[1] - 1]], np.int64), past)
            length += step_ids.shape[1]
            token = int(np.argmax(logits[0, -1])) if comm.rank == 0 else 0
            token = comm.bcast(token, root=0)
            tokens[b, t] = token
            step_ids = np.array([[token]], np.int64)
    if comm.rank == 0:
        np.savez(out, prefill=prefill, tokens=tokens)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text()), int(sys.argv[4]))
