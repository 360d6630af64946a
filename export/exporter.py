"""Trace `LlamaDecoder` to ONNX and bind checkpoint tensors to its initializers, in bounded memory.

The model is traced on PyTorch's meta device, so tracing a 405B graph allocates no weights. Each
initializer then gets a lazy tensor that reads its one checkpoint tensor when the model is saved;
onnx-ir's saver streams them to external data one at a time, so peak memory is about the largest
single tensor whatever the model size.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import ml_dtypes
import onnx
import onnx_ir as ir
import torch
from tqdm import tqdm

from llamaforge.export.checkpoint import open_checkpoint
from llamaforge.export.checkpoint_base import Checkpoint
from llamaforge.export.config import ModelConfig
from llamaforge.export.mllama_checkpoint import MllamaCheckpoint
from llamaforge.export.model import LlamaDecoder, input_names, output_names
from llamaforge.export.tensor_parallel import RankShard
from llamaforge.export.variants import get_variant, require_exportable
from llamaforge.plugins.all_reduce.torch_op import TRANSLATION_TABLE as ALL_REDUCE_TRANSLATION_TABLE
from llamaforge.plugins.attention.torch_op import TRANSLATION_TABLE
from llamaforge.plugins.moe.torch_op import TRANSLATION_TABLE as MOE_TRANSLATION_TABLE

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPSET = 23  # RMSNormalization is standard from 23; ORT 1.31 runs it on CPU


class ExportError(RuntimeError):
    pass


class WeightSource(Protocol):
    """What the exporter needs from a checkpoint (see `export.checkpoint.Checkpoint`)."""

    def load(self, name: str) -> torch.Tensor: ...


def torch_to_ir(t: torch.Tensor, name: str) -> ir.Tensor:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return ir.Tensor(t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16), name=name)
    return ir.Tensor(t.numpy(), name=name)


def trace(config: ModelConfig, precision: str = "fp32", shard: RankShard | None = None) -> ir.Model:
    """The decoder graph with every weight a (data-less) initializer. Shapes are symbolic in
    batch, sequence and cache capacity. With `shard`, the graph of that tensor-parallel rank."""
    if precision not in PRECISIONS:
        raise ExportError(f"PRECISION={precision!r} is not one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    kv_heads = shard.kv_heads if shard else config.num_kv_heads
    vocab = (lambda rows: rows[1] - rows[0])(shard.vocab_rows()) if shard else config.vocab_size
    with torch.device("meta"):
        model = LlamaDecoder(config, shard).to(dtype).eval()
        batch, seq, num_logits, capacity = 2, 5, 3, 8  # distinct sizes: no dims unified by accident
        args: list[torch.Tensor] = [
            torch.zeros(batch, seq, dtype=torch.int64),
            torch.zeros(batch, dtype=torch.int32),
            torch.zeros(batch, num_logits, dtype=torch.int64),
        ]
        for _ in range(2 * config.num_layers):
            args.append(torch.zeros(batch, kv_heads, capacity, config.head_dim, dtype=dtype))
    b, s, c = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("capacity")
    n = torch.export.Dim("num_logits")
    kv_dims = {0: b, 2: c}
    # `forward(input_ids, past_lengths, logits_index, *past)`: torch.export sees the varargs as one tuple.
    dynamic_shapes = ({0: b, 1: s}, {0: b}, {0: b, 1: n}, tuple([kv_dims] * (2 * config.num_layers)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # torch.onnx logs its own step banners; keep the user's console to our progress lines.
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            model,
            tuple(args),
            dynamo=True,
            optimize=False,
            opset_version=OPSET,
            input_names=input_names(config),
            output_names=output_names(config),
            dynamic_shapes=dynamic_shapes,
            custom_translation_table={**TRANSLATION_TABLE, **MOE_TRANSLATION_TABLE, **ALL_REDUCE_TRANSLATION_TABLE},
            verbose=False,
        )
    assert program is not None
    ir_model = program.model
    ir_model.producer_name = "llama-forge"
    # Backend lowerings size position tables (RoPE caches) from this.
    ir_model.metadata_props["llamaforge.max_positions"] = str(config.max_position_embeddings)
    # Give symbolic dims stable, documented names regardless of what torch.export called them.
    graph = ir_model.graph
    kv_shape = ir.Shape(["batch", kv_heads, "capacity", config.head_dim])
    graph.inputs[0].shape = ir.Shape(["batch", "seq"])
    graph.inputs[1].shape = ir.Shape(["batch"])
    graph.inputs[2].shape = ir.Shape(["batch", "num_logits"])
    for v in list(graph.inputs[3:]) + list(graph.outputs[1:]):
        v.shape = kv_shape
    graph.outputs[0].shape = ir.Shape(["batch", "num_logits", vocab])
    return ir_model


def model_source(model: str | None, checkpoint: Path | None) -> tuple[Checkpoint | None, ModelConfig]:
    """What to export: the checkpoint at `checkpoint` (opened and validated; `model` names it after a
    registry variant) and its config, or without a checkpoint the registry variant `model`'s config
    and None. UnknownVariantError, VariantNotExportableError (a variant the exporter cannot build, before
    any checkpoint is read), CheckpointError, or ValueError when neither is given."""
    if model and checkpoint is None:  # a checkpoint says what it is (an mllama one is refused by export_model)
        require_exportable(get_variant(model))
    if checkpoint is not None:
        ckpt = open_checkpoint(checkpoint, model)
        return ckpt, ckpt.config
    if model:
        return None, get_variant(model).config
    raise ValueError("--model or --checkpoint is required")


def graph_template(config: ModelConfig, precision: str, shard: RankShard | None = None) -> onnx.ModelProto:
    """The traced graph with its initializers unbound (external references to no file), to be
    copied by `export_model(..., traced=)`: the ranks of a tensor-parallel engine have the same graph
    (only their weights differ), and copying it costs about a second where tracing a 405B rank
    costs minutes."""
    model = trace(config, precision, shard)
    offset = 0
    for name, value in model.graph.initializers.items():
        const = value.const_value
        assert const is not None
        length = int(const.dtype.itemsize * math.prod(const.shape.numpy()))
        value.const_value = ir.ExternalTensor("unbound.data", offset, length, const.dtype,
                                              shape=ir.Shape(const.shape.numpy()), name=name)
        offset += length
    return ir.serde.serialize_model(model)


def export_model(config: ModelConfig, precision: str, checkpoint: Checkpoint | None,
                 shard: RankShard | None = None, traced: onnx.ModelProto | None = None) -> ir.Model:
    """The traced graph; with a checkpoint every initializer is bound to its tensor (read when the
    model is saved), without one the initializers hold no data (see `bind_placeholder_weights`).
    With `shard`, the graph of that tensor-parallel rank, each initializer bound to its slice;
    `traced` (a `graph_template` of a rank with the same shapes) is used instead of tracing again.
    ValueError for a Llama 3.2 Vision checkpoint: its two graphs are made by `llamaforge/build/mllama.py`."""
    if isinstance(checkpoint, MllamaCheckpoint):
        raise ValueError(f"{checkpoint.path}: a Llama 3.2 Vision checkpoint makes two graphs (model.onnx and "
                         "vision.onnx); build its engine directory with `llamaforge build` (`make engine CHECKPOINT=`)")
    model = ir.serde.deserialize_model(traced) if traced is not None else trace(config, precision, shard)
    if checkpoint is not None:
        bind_weights(model, checkpoint, PRECISIONS[precision], tied=config.tie_word_embeddings, shard=shard)
    return model


# Tied embeddings: torch.export names the one shared parameter after the module it meets last.
TIED_ALIASES = {"lm_head.weight": "model.embed_tokens.weight"}


def bind_weights(model: ir.Model, source: WeightSource, dtype: torch.dtype, tied: bool = False,
                 shard: RankShard | None = None) -> None:
    """Point every initializer at its checkpoint tensor (with `shard`: at the rank's slice of it,
    cut as the one whole tensor is read); nothing is read until the model is saved."""
    for name, value in model.graph.initializers.items():
        const = value.const_value
        assert const is not None, name
        source_name = TIED_ALIASES.get(name, name) if tied else name

        def load(name: str = name, source_name: str = source_name) -> ir.Tensor:
            tensor = source.load(source_name)
            if shard is not None:
                tensor = shard.shard_tensor(name, tensor)
            return torch_to_ir(tensor.to(dtype), name)

        value.const_value = ir.LazyTensor(load, dtype=const.dtype, shape=ir.Shape(const.shape.numpy()), name=name)


def bind_placeholder_weights(model: ir.Model, data_path: Path) -> None:
    """WEIGHTS=none: reference a sparse external-data file of the right size that holds no data.

    The graph is complete and valid (every initializer has a location, offset and length), but no
    weight bytes are read or written, so the graph of any model size can be built and checked.
    """
    offset = 0
    for name, value in model.graph.initializers.items():
        const = value.const_value
        assert const is not None
        length = int(const.dtype.itemsize * math.prod(const.shape.numpy()))
        value.const_value = ir.ExternalTensor(
            data_path.name, offset, length, const.dtype, shape=ir.Shape(const.shape.numpy()), name=name,
            base_dir=str(data_path.parent)
        )
        offset += length
    with open(data_path, "wb") as f:
        f.truncate(offset)


def save_streaming(model: ir.Model, path: Path, progress: Callable[[int, int, str], None] | None = None) -> None:
    """Write `path` and `<path>.data`, materialising one tensor at a time."""

    def callback(tensor: ir.TensorProtocol, info: ir.external_data.CallbackInfo) -> None:
        if progress:
            progress(info.index + 1, info.total, tensor.name or "")

    ir.save(model, path, external_data=path.name + ".data", callback=callback, size_threshold_bytes=1024)


def tqdm_progress(desc: str) -> Callable[[int, int, str], None]:
    bar: dict[str, tqdm] = {}

    def update(done: int, total: int, name: str) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, unit="tensor", disable=os.environ.get("LLAMAFORGE_QUIET") == "1")
        bar["bar"].set_postfix_str(name[-40:], refresh=False)
        bar["bar"].update(1)
        if done == total:
            bar["bar"].close()

    return update


def timed(msg: str) -> Callable[[], None]:
    start = time.perf_counter()
    print(f"{msg} ...", flush=True)

    def done() -> None:
        print(f"{msg}: {time.perf_counter() - start:.1f}s", flush=True)

    return done
