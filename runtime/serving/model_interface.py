"""The two model interfaces the server and the Triton repository expose: text and token level,
compatible with TensorRT-LLM's Triton models so their clients work unchanged. Their tensors
(`TensorSpec`) are the one source of truth for config.pbtxt, metadata and request parsing.

Batching (as TensorRT-LLM's models): `max_batch_size` is MAX_BATCH_SIZE (> 0), so every tensor has
a leading batch dimension before its declared dims: a request sends `text_input` [B, 1],
`max_tokens` [B, 1], `stop_words` [B, N], `input_ids` [B, L] (rows padded, `input_lengths` [B, 1]
gives each row's length), `stop_words_list` [B, 2, L]. Every input of a request has the same B.
Each row is its own sequence in flight; every response of a row carries `batch_index` [[row]]
(streams and the decoupled models send one response per row's piece; a unary call's one
response stacks the rows, outputs of different lengths padded with 0). The standalone server also
accepts an input without the batch dimension (the declared dims alone) as one row.

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
    min_tokens               INT32   [1]   0
    seed                     UINT64  [1]   none
    min_length, random_seed  INT32, UINT64 [1]  TensorRT-LLM's names of min_tokens and seed, declared as
                                       optional inputs of both models (a request gives either name)
    end_id                   INT32   [1]   the model's EOS ids
    pad_id                   INT32   [1]   accepted, unused (outputs are never padded)
    stop_words               BYTES   [-1]  generation ends before the first one; it is not returned
    bad_words                BYTES   [-1]  token sequences (as tokenized) never generated
    return_log_probs         BOOL    [1]   false; true adds the log-prob outputs to the default set
    return_perf_metrics      BOOL    [1]   false; true adds the perf-metric outputs to the default set
    return_context_logits    BOOL    [1]   false; true computes context_logits (and adds it to the default set)
    return_generation_logits BOOL    [1]   false; true computes generation_logits (likewise)
    return_num_input_tokens, return_num_output_tokens  BOOL [1]  accepted (the counts are default outputs)
    presence_penalty         FP32    [1]   0.0; OpenAI's formula, in [-2, 2], over the generated tokens only
    frequency_penalty        FP32    [1]   0.0; (TensorRT-LLM counts the prompt's tokens too: see docs/serving.md)
    guided_decoding_guide_type BYTES [1] json | json_schema | regex | ebnf_grammar (TRT-LLM's guide types)
    guided_decoding_guide    BYTES   [1]   the JSON schema, regex or grammar (GBNF or Lark); none for json
    num_return_sequences     INT32   [1]   1; n > 1 sequences from the prompt (computed once), each sent
                                           as its own responses, tagged by sequence_index
    beam_width               INT32   [1]   1; > 1: beam search (transformers' algorithm), the best
                                           num_return_sequences (default: beam_width) beams, one
                                           response each; not streamed
    length_penalty, early_stopping  FP32, BOOL [1]  beam search's (1.0, false)
    image_url_input          BYTES   [-1]  Llama 3.2 Vision engines: one base64 data: URL per <|image|>
                                           token of the prompt (TensorRT-LLM's multimodal name; no http)
    image_bytes_input        UINT8   [-1, -1, -1, -1]  or the images' RGB pixels, [images, H, W, 3] or
                                           [images, 3, H, W] (runtime/serving/image_inputs.py)

    output (dims after the batch dim)  dtype  shape of one row's response
    text_output       BYTES  [-1]      [1]  the text (streams: only the new text of this response)
    cum_log_probs     FP32   [-1]      [1, 1]  sum of the generated tokens' log probs so far
    output_log_probs  FP32   [-1, -1]  [1, 1, N]  per generated token (streams: this response's tokens)
    context_logits    FP32   [-1, -1]  [1, P, V]  raw logits of the P prompt positions (every response)
    generation_logits FP32   [-1,-1,-1] [1, 1, N, V] the raw logits each returned token was sampled
                                       from; a stream piece: [1, N, 1, V], its own tokens only
                                       (runtime/serving/protocol.py "Logits"; CoreConfig.max_logits_bytes)
    batch_index       INT32  [1]       [1, 1]  the row of the request this response belongs to
    sequence_index    INT32  [1]       [1, 1]  which of the request's sequences (or beams, best first)
    num_input_tokens  INT32  [1]       [1, 1]  prompt tokens (BOS included)
    num_output_tokens INT32  [1]       [1, 1]  generated tokens so far (EOS not counted)
    perf metrics (TRT-LLM's return_perf_metrics), each [1] -> [1, 1]:
      kv_cache_alloc_new_blocks, kv_cache_reused_blocks, kv_cache_alloc_total_blocks  INT32
          KV blocks the sequence holds (so far; at the end: when it finished); reused: those its
          admission found in the prefix cache; new = total - reused
      arrival_time_ns, first_scheduled_time_ns, first_token_time_ns, last_token_time_ns  INT64
          monotonic-clock ns (CLOCK_MONOTONIC, as TRT-LLM's steady clock); 0 before the event
      acceptance_rate FP32, total_accepted_draft_tokens, total_draft_tokens INT32: speculative
          decoding's draft tokens verified and accepted so far (0 without speculation)

token model, served as "tensorrt_llm" (TRT-LLM's own model name and tensor names):

    input_ids INT32 [-1] (required), input_lengths INT32 [1] (optional; at most the ids' count: the
    row's first input_lengths ids are its prompt, the rest padding), request_output_len INT32 [1]
    (required; alias max_tokens), streaming BOOL [1] (alias stream),
    runtime_top_k INT32 (alias top_k), runtime_top_p FP32 (alias top_p), temperature,
    repetition_penalty, min_tokens, seed (and their declared aliases min_length, random_seed, as in
    the text model), end_id, pad_id, exclude_input_in_output, return_log_probs, return_perf_metrics,
    return_context_logits, return_generation_logits, stop_words_list / bad_words_list INT32 [2, -1]
    in TRT-LLM's layout (row 0: the sequences' ids concatenated, row 1: each sequence's end offset,
    -1 padded), plus the same num_return_sequences, beam_width, early_stopping and presence /
    frequency penalties (length_penalty is named len_penalty here).
    Stop sequences of the token model must be single tokens (they are added to the end ids).

    output_ids INT32 [-1, -1] -> [1, 1, N] (non-streaming with exclude_input_in_output false: prompt
    ids then generated ids, as TRT-LLM), sequence_length INT32 [-1] -> [1, 1], cum_log_probs,
    output_log_probs, context_logits, generation_logits, batch_index, sequence_index, the perf
    metrics, num_input_tokens / num_output_tokens as the text model's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from llamaforge.runtime.serving.tensor_codec import FLOAT_TYPES, INT_TYPES

__all__ = ["TensorSpec", "ModelSpec", "TEXT_MODEL", "TOKEN_MODEL", "MAX_BATCH_SIZE", "PERF_METRIC_OUTPUTS",
           "declare_tensors", "model_config", "model_metadata"]

# config.pbtxt `max_batch_size` of every model (TensorRT-LLM's models declare one > 0, and
# perf_analyzer's `-b N` needs it): the most rows one request may carry. Rows beyond the running
# batch (the core's max_num_seqs) wait in its queue like any request.
MAX_BATCH_SIZE = 64

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
    # legacy input name -> input name. An alias that is also in `inputs` is declared (config, metadata)
    # and parsed as its target; one that is not is accepted but not declared.
    aliases: dict[str, str] = field(default_factory=dict)
    default_outputs: tuple[str, ...] = ()
    log_prob_outputs: tuple[str, ...] = ("cum_log_probs", "output_log_probs")
    perf_metric_outputs: tuple[str, ...] = ()

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
    # TensorRT-LLM's names of min_tokens and seed, which its ensemble and tensorrt_llm configs declare:
    # declared here too, or a client that checks the model config before sending (perf_analyzer, so
    # genai-perf's --output-tokens-mean-deterministic, which sends min_length) refuses to run. A
    # request names each at most once, by either name (ModelSpec.input resolves the alias).
    _s("min_length", "INT32", doc="alias of min_tokens"),
    _s("random_seed", "UINT64", doc="alias of seed"),
    _s("end_id", "INT32", doc="end token (default: the model's EOS ids)"),
    _s("pad_id", "INT32", doc="accepted, unused"),
    _s("exclude_input_in_output", "BOOL", doc="false: non-streaming outputs start with the prompt"),
    _s("return_log_probs", "BOOL", doc="false"),
    _s("return_perf_metrics", "BOOL", doc="false"),
    _s("return_num_input_tokens", "BOOL", doc="accepted: num_input_tokens is a default output anyway"),
    _s("return_num_output_tokens", "BOOL", doc="accepted: num_output_tokens is a default output anyway"),
    _s("beam_width", "INT32", doc="1; > 1: beam search (greedy scoring, not streamed)"),
    _s("num_return_sequences", "INT32", doc="1; sequences per prompt (beam search: the best beams)"),
    _s("early_stopping", "BOOL", doc="false; beam search: stop once beam_width beams have finished"),
    # OpenAI's formula over the generated tokens (runtime/core/sampling.py), in [-2, 2]; TensorRT-LLM
    # also counts the prompt's tokens unless prompt_ignore_length says otherwise.
    _s("presence_penalty", "FP32", doc="0.0; minus this from the logit of every token generated so far"),
    _s("frequency_penalty", "FP32", doc="0.0; minus this times each token's count among the generated tokens"),
    _s("return_context_logits", "BOOL", doc="false; true returns context_logits"),
    _s("return_generation_logits", "BOOL", doc="false; true returns generation_logits"),
    # TensorRT-LLM's guided decoding inputs (runtime/core/guided.py).
    _s("guided_decoding_guide_type", "BYTES", doc="json, json_schema, regex or ebnf_grammar"),
    _s("guided_decoding_guide", "BYTES", doc="the schema, regex or grammar (json: none)"),
)

PERF_METRIC_OUTPUTS = (
    TensorSpec("kv_cache_alloc_new_blocks", "INT32", (1,)),
    TensorSpec("kv_cache_reused_blocks", "INT32", (1,)),
    TensorSpec("kv_cache_alloc_total_blocks", "INT32", (1,)),
    TensorSpec("arrival_time_ns", "INT64", (1,)),
    TensorSpec("first_scheduled_time_ns", "INT64", (1,)),
    TensorSpec("first_token_time_ns", "INT64", (1,)),
    TensorSpec("last_token_time_ns", "INT64", (1,)),
    TensorSpec("acceptance_rate", "FP32", (1,)),
    TensorSpec("total_accepted_draft_tokens", "INT32", (1,)),
    TensorSpec("total_draft_tokens", "INT32", (1,)),
)
# The outputs after the model's own, the same in both (and in TensorRT-LLM's ensemble and
# tensorrt_llm models): the logits (returned when their return_* flag asks), the row indices, the
# perf metrics and the token counts.
_COMMON_OUTPUTS = (
    TensorSpec("context_logits", "FP32", (-1, -1)),
    TensorSpec("generation_logits", "FP32", (-1, -1, -1)),
    TensorSpec("batch_index", "INT32", (1,)),
    TensorSpec("sequence_index", "INT32", (1,)),
    *PERF_METRIC_OUTPUTS,
    TensorSpec("num_input_tokens", "INT32", (1,)),
    TensorSpec("num_output_tokens", "INT32", (1,)),
)
_PERF_NAMES = tuple(t.name for t in PERF_METRIC_OUTPUTS)

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
        # Llama 3.2 Vision engines: TensorRT-LLM's multimodal ensemble's image inputs (image_inputs.py).
        TensorSpec("image_url_input", "BYTES", (-1,), kind="list", doc="data: URLs, one per <|image|>"),
        TensorSpec("image_bytes_input", "UINT8", (-1, -1, -1, -1), kind="list", doc="RGB pixels, one image per <|image|>"),
    ),
    outputs=(
        TensorSpec("text_output", "BYTES", (-1,)),
        TensorSpec("cum_log_probs", "FP32", (-1,)),
        TensorSpec("output_log_probs", "FP32", (-1, -1)),
        *_COMMON_OUTPUTS,
    ),
    aliases={"min_length": "min_tokens", "random_seed": "seed"},
    default_outputs=("text_output", "batch_index", "num_input_tokens", "num_output_tokens"),
    perf_metric_outputs=_PERF_NAMES,
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
        TensorSpec("output_ids", "INT32", (-1, -1)),
        TensorSpec("sequence_length", "INT32", (-1,)),
        TensorSpec("cum_log_probs", "FP32", (-1,)),
        TensorSpec("output_log_probs", "FP32", (-1, -1)),
        *_COMMON_OUTPUTS,
    ),
    aliases={"max_tokens": "request_output_len", "stream": "streaming", "top_k": "runtime_top_k",
             "top_p": "runtime_top_p", "min_length": "min_tokens", "random_seed": "seed"},
    default_outputs=("output_ids", "sequence_length", "batch_index", "num_input_tokens", "num_output_tokens"),
    perf_metric_outputs=_PERF_NAMES,
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
    """The Triton `ModelConfig` of a model: max_batch_size MAX_BATCH_SIZE (the declared dims follow
    the batch dimension); `model_transaction_policy.decoupled` as deployed (decoupled: it streams;
    not: one response per request)."""
    cfg = mc.ModelConfig(name=served_name or spec.name, backend="llama-forge", max_batch_size=MAX_BATCH_SIZE)
    cfg.model_transaction_policy.decoupled = decoupled
    declare_tensors(cfg, spec.inputs, spec.outputs)
    cfg.parameters["model_kind"].string_value = spec.kind
    return cfg


def model_metadata(spec: ModelSpec, served_name: str | None = None) -> pb.ModelMetadataResponse:
    """Metadata as Triton reports a batching model's: each shape with the batch dimension (-1) first."""
    md = pb.ModelMetadataResponse(name=served_name or spec.name, versions=["1"], platform="llama-forge")
    for t in spec.inputs:
        md.inputs.add(name=t.name, datatype=t.datatype, shape=[-1, *t.dims])
    for t in spec.outputs:
        md.outputs.add(name=t.name, datatype=t.datatype, shape=[-1, *t.dims])
    return md
