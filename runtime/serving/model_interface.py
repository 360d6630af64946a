"""The two model interfaces the server and the Triton repository expose: text and token level,
compatible with TensorRT-LLM's Triton models so their clients work unchanged. Their tensors
(`TensorSpec`) are the one source of truth for config.pbtxt, metadata and request parsing.

Models (max_batch_size 0: the declared dims are the whole shape; a leading batch dimension of 1 is
also accepted, which is what TensorRT-LLM clients send: `[[prompt]]`, `[[64]]`, `[[ids...]]`)

text model, served as "ensemble" (and "tensorrt_llm_bls" and the engine's variant name):

    input                    dtype   dims  default / meaning
    text_input               BYTES   [1]   required; UTF-8 prompt
    max_tokens               INT32   [1]   required; > 0 new tokens
    stream                   BOOL    [1]   false; true: one response per new piece of text
    exclude_input_in_output  BOOL    [1]   false (TRT-LLM default): text_output = prompt + generated text
    temperature              FP32    [1]   1.0 (see "Semantics" in runtime/serving/protocol.py)
    top_k                    INT32   [1]   0 = off
    top_p                    FP32    [1]   0 = off
    repetition_penalty       FP32    [1]   1.0
    min_tokens               INT32   [1]   0 (alias min_length)
    seed                     UINT64  [1]   none (alias random_seed)
    end_id                   INT32   [1]   the model's EOS ids
    pad_id                   INT32   [1]   accepted, unused (outputs are never padded)
    stop_words               BYTES   [-1]  generation ends before the first one; it is not returned
    bad_words                BYTES   [-1]  token sequences (as tokenized) never generated
    return_log_probs         BOOL    [1]   false; true adds the log-prob outputs to the default set
    beam_width, num_return_sequences (must be 1), length_penalty (no effect without beam search),
    presence_penalty, frequency_penalty (must be 0), return_context_logits,
    return_generation_logits (must be false): accepted for TRT-LLM clients, which send them.

    output            dtype  shape      meaning
    text_output       BYTES  [1]        the text (streams: only the new text of this response)
    cum_log_probs     FP32   [1, 1]     sum of the generated tokens' log probs so far
    output_log_probs  FP32   [1, 1, N]  per generated token (streams: this response's tokens)
    num_input_tokens  INT32  [1]        prompt tokens (BOS included)
    num_output_tokens INT32  [1]        generated tokens so far (EOS not counted)

token model, served as "tensorrt_llm" (TRT-LLM's own model name and tensor names):

    input_ids INT32 [-1] (required), input_lengths INT32 [1] (optional; must equal the ids' count),
    request_output_len INT32 [1] (required; alias max_tokens), streaming BOOL [1] (alias stream),
    runtime_top_k INT32 (alias top_k), runtime_top_p FP32 (alias top_p), temperature,
    repetition_penalty, min_tokens, seed, end_id, pad_id, exclude_input_in_output, return_log_probs,
    stop_words_list / bad_words_list INT32 [2, -1] in TRT-LLM's layout (row 0: the sequences'
    ids concatenated, row 1: each sequence's end offset, -1 padded; a leading batch dim allowed),
    plus the same accepted-at-neutral-value inputs (length_penalty is named len_penalty here).
    Stop sequences of the token model must be single tokens (they are added to the end ids).

    output_ids INT32 [1, 1, N] (non-streaming with exclude_input_in_output false: prompt ids then
    generated ids, as TRT-LLM), sequence_length INT32 [1, 1], cum_log_probs FP32 [1, 1],
    output_log_probs FP32 [1, 1, N], num_input_tokens / num_output_tokens INT32 [1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from llamaforge.runtime.serving.tensor_codec import FLOAT_TYPES, INT_TYPES

__all__ = ["TensorSpec", "ModelSpec", "TEXT_MODEL", "TOKEN_MODEL", "declare_tensors", "model_config", "model_metadata"]

_CONFIG_TYPE = {
    "BOOL": mc.TYPE_BOOL, "INT8": mc.TYPE_INT8, "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16, "UINT32": mc.TYPE_UINT32,
    "UINT64": mc.TYPE_UINT64, "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64,
    "BYTES": mc.TYPE_STRING,
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = True
    kind: str = "scalar"  # scalar: one element; list: [N] or [1, N]; words: [2, N] or [1, 2, N]
    neutral: Any = None  # for accepted-only inputs: the one value we can honour (None: anything)
    doc: str = ""

    def accepts(self, datatype: str) -> bool:
        if datatype == self.datatype:
            return True
        if self.datatype in INT_TYPES:
            return datatype in INT_TYPES  # old TRT-LLM ensembles declared UINT32; any integer type will do
        if self.datatype in FLOAT_TYPES:
            return datatype in FLOAT_TYPES
        return False


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "text" | "tokens"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    aliases: dict[str, str] = field(default_factory=dict)  # legacy input name -> input name
    default_outputs: tuple[str, ...] = ()
    log_prob_outputs: tuple[str, ...] = ("cum_log_probs", "output_log_probs")

    def input(self, name: str) -> TensorSpec | None:
        name = self.aliases.get(name, name)
        return next((t for t in self.inputs if t.name == name), None)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


def _s(name: str, dtype: str, **kw: Any) -> TensorSpec:
    return TensorSpec(name, dtype, (1,), **kw)


_SAMPLING = (
    _s("temperature", "FP32", doc="1.0; 0 = greedy"),
    _s("repetition_penalty", "FP32", doc="1.0 = off"),
    _s("min_tokens", "INT32", doc="0"),
    _s("seed", "UINT64", doc="per-request RNG seed"),
    _s("end_id", "INT32", doc="end token (default: the model's EOS ids)"),
    _s("pad_id", "INT32", doc="accepted, unused"),
    _s("exclude_input_in_output", "BOOL", doc="false: non-streaming outputs start with the prompt"),
    _s("return_log_probs", "BOOL", doc="false"),
    _s("beam_width", "INT32", neutral=1),
    _s("num_return_sequences", "INT32", neutral=1),
    _s("presence_penalty", "FP32", neutral=0.0),
    _s("frequency_penalty", "FP32", neutral=0.0),
    _s("return_context_logits", "BOOL", neutral=False),
    _s("return_generation_logits", "BOOL", neutral=False),
)

TEXT_MODEL = ModelSpec(
    name="ensemble",
    kind="text",
    inputs=(
        _s("text_input", "BYTES", optional=False, doc="UTF-8 prompt"),
        _s("max_tokens", "INT32", optional=False, doc="new tokens, > 0"),
        _s("stream", "BOOL", doc="false"),
        _s("top_k", "INT32", doc="0 = off"),
        _s("top_p", "FP32", doc="0 = off"),
        *_SAMPLING,
        _s("length_penalty", "FP32"),
        TensorSpec("stop_words", "BYTES", (-1,), kind="list"),
        TensorSpec("bad_words", "BYTES", (-1,), kind="list"),
    ),
    outputs=(
        TensorSpec("text_output", "BYTES", (-1,)),
        TensorSpec("cum_log_probs", "FP32", (-1, -1)),
        TensorSpec("output_log_probs", "FP32", (-1, -1, -1)),
        TensorSpec("num_input_tokens", "INT32", (1,)),
        TensorSpec("num_output_tokens", "INT32", (1,)),
    ),
    aliases={"min_length": "min_tokens", "random_seed": "seed"},
    default_outputs=("text_output", "num_input_tokens", "num_output_tokens"),
)

TOKEN_MODEL = ModelSpec(
    name="tensorrt_llm",
    kind="tokens",
    inputs=(
        TensorSpec("input_ids", "INT32", (-1,), optional=False, kind="list"),
        _s("input_lengths", "INT32", doc="must equal the number of input_ids"),
        _s("request_output_len", "INT32", optional=False, doc="new tokens, > 0"),
        _s("streaming", "BOOL", doc="false"),
        _s("runtime_top_k", "INT32", doc="0 = off"),
        _s("runtime_top_p", "FP32", doc="0 = off"),
        *_SAMPLING,
        _s("len_penalty", "FP32"),
        TensorSpec("stop_words_list", "INT32", (2, -1), kind="words"),
        TensorSpec("bad_words_list", "INT32", (2, -1), kind="words"),
    ),
    outputs=(
        TensorSpec("output_ids", "INT32", (-1, -1, -1)),
        TensorSpec("sequence_length", "INT32", (-1, -1)),
        TensorSpec("cum_log_probs", "FP32", (-1, -1)),
        TensorSpec("output_log_probs", "FP32", (-1, -1, -1)),
        TensorSpec("num_input_tokens", "INT32", (1,)),
        TensorSpec("num_output_tokens", "INT32", (1,)),
    ),
    aliases={"max_tokens": "request_output_len", "stream": "streaming", "top_k": "runtime_top_k",
             "top_p": "runtime_top_p", "min_length": "min_tokens", "random_seed": "seed"},
    default_outputs=("output_ids", "sequence_length", "num_input_tokens", "num_output_tokens"),
)


def declare_tensors(cfg: mc.ModelConfig, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
    """Add the tensor declarations (config.pbtxt `input` / `output`: name, data_type, dims, and
    `optional` for optional inputs) to `cfg`. The one builder of them: the gRPC server's ModelConfig
    answer (`model_config`) and the generated Triton repository (triton_repo/repository.py) both
    call it."""
    for t in inputs:
        tensor = cfg.input.add(name=t.name, data_type=_CONFIG_TYPE[t.datatype], dims=list(t.dims))
        if t.optional:
            tensor.optional = True
    for t in outputs:
        cfg.output.add(name=t.name, data_type=_CONFIG_TYPE[t.datatype], dims=list(t.dims))


def model_config(spec: ModelSpec, served_name: str | None = None, decoupled: bool = True) -> mc.ModelConfig:
    """The Triton `ModelConfig` of a model: max_batch_size 0; `model_transaction_policy.decoupled`
    as deployed (decoupled: it streams; not: one response per request)."""
    cfg = mc.ModelConfig(name=served_name or spec.name, backend="llama-forge", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = decoupled
    declare_tensors(cfg, spec.inputs, spec.outputs)
    cfg.parameters["model_kind"].string_value = spec.kind
    return cfg


def model_metadata(spec: ModelSpec, served_name: str | None = None) -> pb.ModelMetadataResponse:
    md = pb.ModelMetadataResponse(name=served_name or spec.name, versions=["1"], platform="llama-forge")
    for t in spec.inputs:
        md.inputs.add(name=t.name, datatype=t.datatype, shape=list(t.dims))
    for t in spec.outputs:
        md.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.dims))
    return md
