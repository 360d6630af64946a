"""Tensor-parallel engines for the runtime's tests (a helper module, not a test file).

    tp_dir = tp_engine(tiny_builds, checkpoint, size=2)     # one place that makes the TP engine

`tp_engine` is the single switch between the two ways a test gets a TP engine directory (the layout
of docs/tensor_parallel.md: rank{i}/ with each rank's graph and manifest, the top-level manifest
with `tensor_parallel`):

  * `llamaforge build --tp N` (the real, Megatron-sharded export) where the build has it
    (`BuildOptions.tp`);
  * otherwise `replicate_tp_engine`: the TP=1 engine's graph on every rank, with the runtime-visible
    parts of a TP engine added: an all-reduce (`ai.onnx.contrib::LlamaforgeAllReduce`) after every
    o_proj and down_proj, fed each rank's output divided by N (so the sum over ranks is the TP=1
    value: division by a power of two is exact in fp32), and `logits` cut to the rank's vocabulary
    shard (uneven shards, so the gather's offsets are tested). Every rank computes every head, so it
    tests the runtime (ranks, broadcast steps, per-rank KV, collectives, logits gather, failure), not
    the sharding math, which is the build's and its own tests'.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from llamaforge.runtime.parallel.collective import ALL_REDUCE_DOMAIN, ALL_REDUCE_OP_TYPE

__all__ = ["tp_engine", "replicate_tp_engine", "vocab_shards"]


def vocab_shards(vocab: int, size: int) -> list[list[int]]:
    """Uneven shards: rank 0 takes a little less than an even share (offsets are then non-trivial)."""
    cuts = [0] + [vocab * (r + 1) // size - (size - r - 1) * 20 for r in range(size - 1)] + [vocab]
    return [[cuts[r], cuts[r + 1]] for r in range(size)]


def tp_engine(builds: Any, checkpoint: Path, size: int = 2) -> Path:
    """A TP engine of `size` ranks for `checkpoint` (see the module docstring for which kind)."""
    from llamaforge.build.builder import BuildOptions

    if "tp" in {f.name for f in dataclasses.fields(BuildOptions)}:
        return Path(builds.engine(checkpoint, tp=size))
    tp1 = Path(builds.engine(checkpoint))
    out = tp1.parent.parent / f"{tp1.parent.name}-replicated-tp{size}"
    if not (out / "manifest.json").exists():
        replicate_tp_engine(tp1, out, size)
    return out


def _rank_graph(model: onnx.ModelProto, size: int, shard: list[int]) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    nodes = []
    scale = numpy_helper.from_array(np.array(1.0 / size, np.float32), "tp_scale")
    graph.initializer.append(scale)
    for node in graph.node:
        nodes.append(node)
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else ""
        if ".o_proj." in weight or ".down_proj." in weight:  # row-parallel in a real TP engine
            out = node.output[0]
            node.output[0] = f"{out}.partial"
            nodes.append(helper.make_node("Mul", [f"{out}.partial", "tp_scale"], [f"{out}.scaled"]))
            nodes.append(helper.make_node(ALL_REDUCE_OP_TYPE, [f"{out}.scaled"], [out], domain=ALL_REDUCE_DOMAIN,
                                          name=f"{out}.all_reduce"))
        if "logits" in node.output:  # the LM head: keep this rank's vocabulary columns
            node.output[list(node.output).index("logits")] = "logits.full"
            for name, value in (("tp_vocab_start", shard[0]), ("tp_vocab_end", shard[1]), ("tp_vocab_axis", -1)):
                graph.initializer.append(helper.make_tensor(name, TensorProto.INT64, [1], [value]))
            nodes.append(helper.make_node("Slice", ["logits.full", "tp_vocab_start", "tp_vocab_end", "tp_vocab_axis"],
                                          ["logits"]))
    del graph.node[:]
    graph.node.extend(nodes)
    for out in graph.output:
        if out.name == "logits":
            out.type.tensor_type.shape.dim[-1].dim_value = shard[1] - shard[0]
    model.opset_import.append(helper.make_opsetid(ALL_REDUCE_DOMAIN, 1))
    return model


def replicate_tp_engine(tp1: Path, out: Path, size: int) -> Path:
    """Write the TP engine directory of `size` ranks described in the module docstring, built from
    the TP=1 engine `tp1` (written beside, then renamed into place)."""
    manifest = json.loads((tp1 / "manifest.json").read_text())
    config = manifest["config"]
    shards = vocab_shards(int(config["vocab_size"]), size)
    info = {"size": size, "rank": None, "kv_heads_per_rank": manifest["kv_cache"]["num_kv_heads"],
            "q_heads_per_rank": int(config["num_heads"]), "vocab_shards": shards}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = onnx.load(str(tp1 / manifest["model_file"]))  # external data read in (tiny models)
    for rank in range(size):
        rank_dir = tmp / f"rank{rank}"
        rank_dir.mkdir()
        onnx.save(_rank_graph(model, size, shards[rank]), str(rank_dir / manifest["model_file"]),
                  save_as_external_data=True, location=manifest["external_data"])
        rank_manifest = dict(manifest, tokenizer={"kind": "none"}, tensor_parallel=dict(info, rank=rank))
        (rank_dir / "manifest.json").write_text(json.dumps(rank_manifest, indent=2))
    for f in tp1.iterdir():
        if f.is_file() and f.name not in (manifest["model_file"], manifest["external_data"], "manifest.json"):
            shutil.copy(f, tmp / f.name)
    (tmp / "manifest.json").write_text(json.dumps(dict(manifest, tensor_parallel=info), indent=2))
    tmp.rename(out)
    return out
