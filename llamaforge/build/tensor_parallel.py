"""`make engine TP=N` / `llamaforge build --tp N`: one engine directory holding N rank graphs.

    <engine>/manifest.json              the model's manifest + tensor_parallel {size N, rank null, ...}
    <engine>/tokenizer files, calibration.safetensors (quantized: measured once, on the whole model)
    <engine>/rank{i}/model.onnx, model.onnx.data, manifest.json   rank i's graph, its shard only

The rank graph is traced once with `export.tensor_parallel.RankShard`'s shapes (its heads, FFN
columns and vocabulary rows; an all-reduce after every row-parallel projection: the same graph on
every rank, but for the logits width when N does not divide the vocabulary) and copied for each
rank, whose initializers are bound to its own slices, so its external data holds only its shard: each weight is read whole from the checkpoint, sliced, written
and dropped, one at a time, and peak memory stays about the largest tensor. Calibration runs once
on the unsharded model; each rank's quantization passes read its cut of the statistics
(graphs/quantization/sharding.py). BACKEND=trt builds each rank's graph into rank{i}/engine.plan
(`rank_plan`: TensorRT-LLM's plugin library loaded for the all-reduce). The whole directory is
staged and renamed into place.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from llamaforge.build.atomic import staged_dir
from llamaforge.build.builder import (
    CALIBRATION_FILE,
    MODEL_FILE,
    BuildError,
    BuildOptions,
    _calibrate,
    activation_precision,
    manifest_for,
    quantized_manifest,
    write_graph,
)
from llamaforge.build.trt_backend import PLAN_FILE, TIMING_CACHE_FILE, TensorRTBuildError, build_rank_plan
from llamaforge.export.checkpoint_base import Checkpoint
from llamaforge.export.config import ModelConfig
from llamaforge.export.exporter import graph_template, timed
from llamaforge.export.tensor_parallel import EXPERT_WEIGHTS, RankShard, ShardingError, check_shardable, vocab_shards
from llamaforge.export.tokenizer_files import copy_tokenizer
from llamaforge.graphs.quantization.calibrate import CalibrationText
from llamaforge.graphs.quantization.int4 import INT4_PRECISIONS, block_for
from llamaforge.graphs.quantization.recipes import (
    CalibrationStats,
    QuantConfig,
    ValueHeads,
    reads_attention_output,
    smoothquant_factors,
)
from llamaforge.plugins.all_reduce import trt_plugin as trt_all_reduce
from llamaforge.runtime.core.manifest import EngineManifest, TensorParallelInfo

RANK_DIR = "rank{rank}"


def check_tp_options(opts: BuildOptions, config: ModelConfig, quant: QuantConfig) -> None:
    """BuildError naming what a TP=N build cannot do with these options, before any work."""
    try:
        check_shardable(config, opts.tp)
    except ShardingError as e:
        raise BuildError(f"TP: {e}") from None
    if opts.backend == "trt":  # before any work: each rank's plan needs TensorRT-LLM's all-reduce plugin
        try:
            trt_all_reduce.find_plugin_library()
        except trt_all_reduce.PluginLibraryMissing as e:
            raise BuildError(f"TP={opts.tp} BACKEND=trt: {e}") from None
    if quant.precision == "int8-sq" and quant.int8_activation == "static":
        raise BuildError(f"TP={opts.tp} PRECISION=int8-sq --int8-activation static: SmoothQuant changes a row-parallel "
                         "input's per-tensor maximum in ways one rank cannot see; use the per-token activations")
    if quant.precision in INT4_PRECISIONS:
        check_int4_blocks(opts.tp, config, quant)


def check_int4_blocks(tp: int, config: ModelConfig, quant: QuantConfig) -> None:
    """A row-parallel INT4 weight's blocks run along its input channels: each rank must hold whole
    blocks of the block size TP=1 picks for the whole width (`int4.block_for`), or its blocks and
    scales would not be TP=1's. That covers MoE experts' down_proj (their blocks are per expert)."""
    widths = {"q heads per rank x head_dim (o_proj's input)": config.q_size}
    if len(config.moe_layer_indices()) < config.num_layers:  # some layer has a dense MLP
        widths["intermediate_size_mlp / TP (down_proj's input)"] = config.dense_intermediate_size
    if config.is_moe:
        widths["intermediate_size / TP (the experts' and the shared expert's down_proj input)"] = config.intermediate_size
    bad = []
    for what, width in widths.items():
        block = block_for(width, quant.int4_block_size)
        if block is not None and (width // tp) % block:  # None: TP=1 refuses it too, naming the weight
            bad.append(f"{what} = {width // tp} is not a multiple of the block {block}")
    if bad:
        raise BuildError(f"TP={tp} PRECISION={quant.precision} --int4-block-size {quant.int4_block_size}: "
                         f"{'; '.join(bad)}: a rank's row-parallel input must hold whole blocks")


def row_parallel_smoothed_amax(stats: CalibrationStats, ckpt: Checkpoint, config: ModelConfig,
                               quant: QuantConfig) -> dict[str, np.ndarray]:
    """For the precisions that smooth (int8-sq, int8-wo on the fast kernels): each row-parallel
    linear's per-output-channel max |W diag(s)| over ALL its input channels, as the unsharded
    model's quantization measures it after smoothing. A rank holds only some of those inputs, so it
    is computed here from the checkpoint (one weight at a time) and every rank's weight scales are
    the unsharded model's. Empty for the other precisions."""
    if quant.precision != "int8-sq" and not quant.smooths_int8_wo:
        return {}
    # o_proj and every dense down_proj (Llama 4: `feed_forward.down_proj`, `feed_forward.shared_expert.down_proj`);
    # the experts are never smoothed (graphs/passes/quantize_experts.py)
    linears = sorted(name for name in stats.act_amax
                     if name.endswith(("self_attn.o_proj", "down_proj")) and not name.endswith(EXPERT_WEIGHTS))
    out = {}
    for linear in tqdm(linears, desc="row-parallel scales", unit="weight", disable=os.environ.get("LLAMAFORGE_QUIET") == "1"):
        alpha = quant.smoothquant_alpha if quant.smoothquant_alpha is not None else stats.searched_alpha(linear)
        s = smoothquant_factors(stats.activation_amax(linear), stats.weight_amax_per_input(linear), alpha,
                                ValueHeads.of(config) if reads_attention_output(linear) else None)
        weight = ckpt.load(linear + ".weight").float().numpy()  # [out, in], as the fp32 graph holds it
        out[linear] = (np.abs(weight) * s[None, :]).max(axis=1)
    return out


def tp_info(shard: RankShard, rank: int | None) -> TensorParallelInfo:
    return TensorParallelInfo(size=shard.size, rank=rank, q_heads_per_rank=shard.q_heads,
                              kv_heads_per_rank=shard.kv_heads,
                              vocab_shards=[list(b) for b in vocab_shards(shard.config.vocab_size, shard.size)])


def rank_plan(rank_dir: Path, config: ModelConfig, shard: RankShard, opts: BuildOptions, out: Path) -> dict[str, Any]:
    """BACKEND=trt: rank `shard.rank`'s `engine.plan` from its graph (the all-reduce nodes already in
    TensorRT-LLM's plugin form, `lower-all-reduce-trt`), next to it in rank{i}/; what its manifest records.
    The engine being replaced carries each rank's timing cache in its own rank{i}/."""
    previous = out / rank_dir.name / TIMING_CACHE_FILE
    try:
        return build_rank_plan(rank_dir / MODEL_FILE, rank_dir / PLAN_FILE, config.num_layers, shard.kv_heads,
                               config.head_dim, trt_all_reduce.find_plugin_library(), opts.tensorrt,
                               previous if previous.exists() else None)
    except (TensorRTBuildError, trt_all_reduce.PluginLibraryMissing) as e:
        raise BuildError(f"rank {shard.rank}: {e}") from None


def build_tp_engine(opts: BuildOptions, config: ModelConfig, ckpt: Checkpoint | None, quant: QuantConfig,
                    calib_text: CalibrationText | None, source: dict[str, Any], out: Path) -> Path:
    with staged_dir(out) as tmp:
        stats = _calibrate(ckpt, calib_text, tmp, quant) if ckpt is not None and calib_text is not None else None
        if stats is not None and ckpt is not None:
            stats.smoothed_weight_out_amax = row_parallel_smoothed_amax(stats, ckpt, config, quant)
        tokenizer = copy_tokenizer(ckpt, tmp) if ckpt is not None else {"kind": "none"}
        top: EngineManifest | None = None
        templates: dict[int, onnx.ModelProto] = {}  # by logits width: the only shape that differs between ranks
        for rank in range(opts.tp):
            shard = RankShard(config, opts.tp, rank)
            rank_dir = tmp / RANK_DIR.format(rank=rank)
            rank_dir.mkdir()
            start, end = shard.vocab_rows()
            if end - start not in templates:
                done = timed(f"trace {config.name} for ranks with {end - start} vocabulary rows")
                templates[end - start] = graph_template(config, activation_precision(opts.precision), shard)
                done()
            graph, passes = write_graph(rank_dir, config, opts, ckpt, quant, stats, out, shard, templates[end - start])
            manifest = manifest_for(config, opts, graph, {"kind": "none"}, passes, source)  # tokenizer: top level
            manifest = replace(manifest, kv_cache=replace(manifest.kv_cache, num_kv_heads=shard.kv_heads),
                               tensor_parallel=tp_info(shard, rank))
            if stats is not None:
                manifest = quantized_manifest(manifest, quant, stats, opts.backend)
            if opts.backend == "trt":
                manifest = replace(manifest, tensorrt=rank_plan(rank_dir, config, shard, opts, out))
            manifest.write(rank_dir)
            if top is None:
                top = manifest
        assert top is not None and top.tensor_parallel is not None
        if stats is not None:
            stats.save(tmp / CALIBRATION_FILE)
        # The model's manifest: rank 0's (each rank's interface is the same but for its logits width),
        # with the tokenizer, and `model_file` naming the graph inside each rank{i}/.
        from llamaforge.runtime.core.manifest import TokenizerInfo

        top = replace(top, tokenizer=None if tokenizer.get("kind", "none") == "none" else
                      TokenizerInfo.from_json(tokenizer, "copy_tokenizer's entry"),
                      tensor_parallel=replace(top.tensor_parallel, rank=None))
        top.write(tmp)
    print(f"engine: {out} ({opts.tp} ranks)")
    return out
