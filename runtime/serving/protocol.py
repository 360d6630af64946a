"""KServe v2 / Triton gRPC requests of the two model interfaces
(`runtime/serving/model_interface.py`): parsing and validation; the responses are built by
`runtime/serving/responses.py`. Tensors are decoded and encoded by `runtime/serving/tensor_codec.py`;
the gRPC server itself is `runtime/serving/server.py`.
Messages are `tritonclient.grpc.service_pb2`'s, and request parsing itself (`parse_inputs`) works
on name -> NumPy tensors, so the Triton Python-backend models (`triton_repo/models/`) validate
requests with the same code. The checks the engine core repeats on every request it is given (prompt,
max_tokens, context length) are `runtime/core/validation.py`'s, called from here and from the core.

Semantics
---------
* Sampling follows TensorRT-LLM, whose clients these are: greedy unless the request asks for
  sampling with top_k > 1 or top_p > 0 (0 meaning off, as in TRT-LLM; top_p 1.0 = the full
  distribution) and an effective temperature > 0 (absent = 1.0). temperature 0 or top_k 1 is always
  greedy. So temperature alone (e.g. 0.8) stays greedy as in TRT-LLM; to sample the whole
  distribution the vLLM way send top_p = 1.0 too.
* Streams never include the prompt (TRT-LLM: exclude_input_in_output only applies to non-streaming
  responses), so concatenating a stream's text_output gives the unary text_output of the same
  request with exclude_input_in_output = true, byte for byte.
* Prompt text is tokenized by the checkpoint's own rules (its BOS only where its tokenizer adds
  one, never a second one before a BOS the text starts with) and with special-token text
  recognised ("<|eot_id|>" is the special token), as TRT-LLM's preprocessing (HF `encode`) does.
* Batches (max_batch_size > 0, as TensorRT-LLM's models): every input's first dimension is the
  batch; `parse_batch` splits a request into its rows (`split_rows`) and parses each as its own
  request (`parse_inputs`), so each row is its own sequence in flight, and answers carry the
  row's `batch_index`. A bad row refuses the whole request, naming the field.
* Logits (TensorRT-LLM's return_context_logits / return_generation_logits, FP32, the raw logits:
  before repetition penalty, bans and temperature; computed only for a request whose flag is true,
  and then in its default outputs): `context_logits` [1, prompt tokens, vocab], in every response
  of the request (TensorRT-LLM's executor puts them in every result, stream pieces included);
  `generation_logits` one row per returned token (output_ids after the prompt, num_output_tokens;
  an end id is never returned, nor its row), [1, 1, N, vocab] ([batch, beam, tokens, vocab]) in a
  whole response and [1, N, 1, vocab] in a stream piece (only the piece's tokens), the layouts
  TensorRT-LLM's executor gives. A unary batch pads rows to the longest with 0, as output_ids; a
  row whose flag was false is all 0 (the flags are per row).
* Request parameters: "priority", "timeout" and "Streaming" (TRT-LLM's client) are accepted and ignored, "sequence_id" only as 0 /
  "" (no sequence batching), "triton_enable_empty_final_response" is honoured; any other parameter
  (and any input, output or tensor parameter not listed above) is refused with the field named.

Every refusal is a `RequestError(field, message)`: the server answers INVALID_ARGUMENT (unary) or a
stream error message, naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from llamaforge.runtime.core.guided import GuidedSpec
from llamaforge.runtime.core.requests import GenerationRequest, RequestError
from llamaforge.runtime.core.sampling import SamplingParams
from llamaforge.runtime.core.validation import RequestLimits, check_context, check_max_tokens, check_prompt_ids
from llamaforge.runtime.serving.engine_client import EngineClient
from llamaforge.runtime.serving.image_inputs import image_inputs
from llamaforge.runtime.serving.model_interface import MAX_BATCH_SIZE, ModelSpec
from llamaforge.runtime.serving.tensor_codec import FLOAT_TYPES, INT_TYPES, NP_TYPES, decode_inputs

__all__ = [
    "ModelContext", "ParsedRequest", "parse_request", "parse_batch", "split_rows", "parse_inputs", "encode_prompt",
    "encode_bad_words", "decode_words", "words_array", "EMPTY_FINAL_PARAM",
]

EMPTY_FINAL_PARAM = "triton_enable_empty_final_response"

# -- parsing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelContext:
    """What validation needs to know about the served engine."""

    tokenizer: Any  # runtime.tokenizer.Tokenizer, or None (then only the token model is served)
    context_length: int
    vocab_size: int
    eos_ids: tuple[int, ...]
    image_token_id: int | None = None  # a Llama 3.2 Vision engine's `<|image|>`: a prompt id past the vocabulary

    @classmethod
    def from_core(cls, core: EngineClient) -> ModelContext:
        vision = core.manifest.vision
        return cls(core.tokenizer, core.context_length, core.manifest.vocab_size, tuple(core.eos_ids),
                   vision.image_token_id if vision is not None else None)


@dataclass
class ParsedRequest:
    spec: ModelSpec
    generation: GenerationRequest
    client_id: str  # the request's `id`, echoed in every response
    stream: bool
    exclude_input: bool
    prompt_text: str | None
    outputs: tuple[str, ...]  # the outputs to return
    empty_final: bool  # triton_enable_empty_final_response
    batch_index: int = 0  # the request's row this is (its responses' batch_index)


# "Streaming": TensorRT-LLM's inflight_batcher_llm_client sends it on unary calls; the
# `streaming` input is what decides.
_IGNORED_PARAMS = {"priority", "timeout", "sequence_start", "sequence_end", "Streaming"}


_BY_NP = {np.dtype(v): k for k, v in NP_TYPES.items()}
_LOGITS = ("context_logits", "generation_logits")


def _datatype(arr: np.ndarray) -> str:
    return _BY_NP[arr.dtype]


def _param_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _scalar(name: str, arr: np.ndarray) -> Any:
    if arr.ndim > 2 or arr.size != 1:
        raise RequestError(name, f"expected one value (shape [1] or [1, 1]), got shape {list(arr.shape)}")
    v = arr.reshape(-1)[0]
    return v.item() if hasattr(v, "item") else v


def _list(name: str, arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2 and arr.shape[0] == 1:
        return arr[0]
    if arr.ndim != 1:
        raise RequestError(name, f"expected shape [N] or [1, N], got {list(arr.shape)}")
    return arr


def _words(name: str, arr: np.ndarray) -> list[tuple[int, ...]]:
    """TRT-LLM's [2, L] word list: flattened ids and end offsets (-1 padded)."""
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[0] != 2:
        raise RequestError(name, f"expected shape [2, L] or [1, 2, L] (ids row, offsets row), got {list(arr.shape)}")
    ids, offsets = arr[0].tolist(), arr[1].tolist()
    out: list[tuple[int, ...]] = []
    start = 0
    for end in offsets:
        if end < 0:
            break
        if end < start or end > len(ids):
            raise RequestError(name, f"offset {end} is out of order or past the {len(ids)} ids")
        if end > start:
            out.append(tuple(int(i) for i in ids[start:end]))
        start = end
    return out


def _utf8(name: str, b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(name, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None


def parse_request(request: pb.ModelInferRequest, spec: ModelSpec, ctx: ModelContext, request_id: str,
                  streaming_rpc: bool) -> list[ParsedRequest]:
    """Validate a ModelInferRequest for `spec` and turn each of its rows into a `GenerationRequest`
    (`parse_batch`; engine-side ids from `request_id`; the client's own `id` is echoed separately)."""
    params = {key: _param_value(p) for key, p in request.parameters.items()}
    _check_params(params)  # before decoding: a bad parameter is reported before any tensor problem
    tensors = decode_inputs(request)
    requested: list[str] = []
    for o in request.outputs:
        for key in o.parameters:
            if key != "binary_data":
                raise RequestError(f"outputs.{o.name}.parameters.{key}", "output parameter not supported")
        requested.append(o.name)
    return parse_batch(tensors, spec, ctx, request_id, params=params, requested_outputs=requested,
                       client_id=request.id, streaming_rpc=streaming_rpc)


def split_rows(tensors: Mapping[str, np.ndarray], spec: ModelSpec) -> list[dict[str, np.ndarray]]:
    """A request's tensors as one name -> array mapping per batch row. An input with one dimension
    more than its declared dims is batched (its first dimension is the batch); one with exactly its
    declared dims is a single row (the standalone server's batch-less form). Every batched input
    must have the same batch size, 1 to MAX_BATCH_SIZE. Unknown inputs go to every row unsplit
    (`parse_inputs` names them)."""
    sizes: dict[str, int] = {}
    for name, arr in tensors.items():
        t = spec.input(name)
        if t is None:
            continue
        if arr.ndim == len(t.dims) + 1:
            sizes[name] = arr.shape[0]
        elif arr.ndim != len(t.dims):
            dims = ", ".join(str(d) for d in t.dims)
            raise RequestError(name, f"expected shape [batch, {dims}], got {list(arr.shape)}")
    first = next(iter(sizes), None)
    batch = sizes[first] if first is not None else 1
    for name, n in sizes.items():
        if n != batch:
            raise RequestError(name, f"batch size {n}, but {first} has batch size {batch} (every input of a "
                                     "request has the same batch size)")
    if not 1 <= batch <= MAX_BATCH_SIZE:
        raise RequestError(str(first), f"batch size must be in [1, {MAX_BATCH_SIZE}] (max_batch_size), got {batch}")
    return [{name: (arr[row] if name in sizes else arr) for name, arr in tensors.items()} for row in range(batch)]


def parse_batch(tensors: Mapping[str, np.ndarray], spec: ModelSpec, ctx: ModelContext, request_id: str, *,
                params: Mapping[str, Any] | None = None, requested_outputs: Sequence[str] | None = None,
                client_id: str = "", streaming_rpc: bool = True) -> list[ParsedRequest]:
    """A batched request (`split_rows`) as one `ParsedRequest` per row, in row order, each with its
    `batch_index`; engine-side ids are `request_id` for a single row, `request_id:row` otherwise.
    Any bad row refuses the whole request (nothing is submitted)."""
    rows = split_rows(tensors, spec)
    parsed = []
    for row, row_tensors in enumerate(rows):
        rid = request_id if len(rows) == 1 else f"{request_id}:{row}"
        p = parse_inputs(row_tensors, spec, ctx, rid, params=params, requested_outputs=requested_outputs,
                         client_id=client_id, streaming_rpc=streaming_rpc)
        p.batch_index = row
        parsed.append(p)
    return parsed


def _check_params(params: Mapping[str, Any]) -> bool:
    """Request parameters; returns whether `triton_enable_empty_final_response` is set."""
    empty_final = False
    for key, value in params.items():
        if key == EMPTY_FINAL_PARAM:
            empty_final = bool(value)
        elif key == "sequence_id":
            if value not in (0, "", None):
                raise RequestError("parameters.sequence_id", "sequence batching is not supported (this model is "
                                                             "stateless per request)")
        elif key not in _IGNORED_PARAMS:
            raise RequestError(f"parameters.{key}", "unknown request parameter")
    return empty_final


def parse_inputs(tensors: Mapping[str, np.ndarray], spec: ModelSpec, ctx: ModelContext, request_id: str, *,
                 params: Mapping[str, Any] | None = None, requested_outputs: Sequence[str] | None = None,
                 client_id: str = "", streaming_rpc: bool = True) -> ParsedRequest:
    """Validate the input tensors of one row (name -> NumPy array, BYTES as object arrays of `bytes`;
    a scalar [1] or [1, 1], a list [N] or [1, N]) for `spec` and turn them into a
    `GenerationRequest` with id `request_id`. Shared by the gRPC server and the Triton
    Python-backend models, through `parse_batch`.
    `requested_outputs`: the outputs the client asked for (None or empty: the model's defaults)."""
    empty_final = _check_params(params or {})
    raw = tensors
    values: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for name, arr in raw.items():
        t = spec.input(name)
        if t is None:
            raise RequestError(name, f"unexpected input for model '{spec.name}' (inputs: "
                                     f"{', '.join(x.name for x in spec.inputs)})")
        if t.name in values or t.name in arrays:
            raise RequestError(name, f"given twice (as '{t.name}' and an alias)")
        dtype = _datatype(arr)
        if not t.accepts(dtype):
            raise RequestError(name, f"datatype {dtype} given, {t.datatype} expected")
        if t.kind == "scalar":
            v = _scalar(name, arr)
            if t.datatype in INT_TYPES:
                v = int(v)
            elif t.datatype in FLOAT_TYPES:
                v = float(v)
                if not math.isfinite(v):
                    raise RequestError(name, f"must be finite, got {v}")
            elif t.datatype == "BOOL":
                v = bool(v)
            if t.neutral is not None and v != t.neutral:
                raise RequestError(name, f"only {t.neutral!r} is supported, got {v!r}")
            values[t.name] = v
        else:
            arrays[t.name] = arr

    missing = [t.name for t in spec.inputs if not t.optional and t.name not in values and t.name not in arrays]
    if missing:
        raise RequestError(missing[0], "required input is missing")

    if spec.kind == "text":
        max_field, stream_field, k_field, p_field = "max_tokens", "stream", "top_k", "top_p"
    else:
        max_field, stream_field, k_field, p_field = "request_output_len", "streaming", "runtime_top_k", "runtime_top_p"

    stream = bool(values.get(stream_field, False))
    if stream and not streaming_rpc:
        raise RequestError(stream_field, "a unary ModelInfer call cannot stream; use ModelStreamInfer "
                                         f"(gRPC streaming) or {stream_field}=false")

    max_tokens = values[max_field]
    check_max_tokens(max_tokens, max_field)

    prompt_text: str | None = None
    if spec.kind == "text":
        if ctx.tokenizer is None:
            raise RequestError("text_input", "this engine has no tokenizer; use the token model 'tensorrt_llm'")
        prompt_text, prompt_ids = encode_prompt(ctx.tokenizer, values["text_input"])
        prompt_field = "text_input"
    else:
        ids = _list("input_ids", arrays["input_ids"])
        prompt_ids = [int(i) for i in ids.tolist()]
        if "input_lengths" in values:  # a batch pads its rows' ids: the length says where each one ends
            length = values["input_lengths"]
            if not 0 < length <= len(prompt_ids):
                raise RequestError("input_lengths", f"is {length} but {len(prompt_ids)} input_ids were sent "
                                                    "(must be in [1, the number of input_ids])")
            prompt_ids = prompt_ids[:length]
        check_prompt_ids(prompt_ids, ctx.vocab_size, "input_ids", ctx.image_token_id)
        prompt_field = "input_ids"

    check_context(len(prompt_ids), max_tokens, RequestLimits(ctx.context_length, ctx.vocab_size), prompt_field, max_field)

    min_tokens = values.get("min_tokens", 0)
    if not 0 <= min_tokens <= max_tokens:
        raise RequestError("min_tokens", f"must be in [0, {max_field}={max_tokens}], got {min_tokens}")

    sampling = _sampling(values, k_field, p_field)

    end_ids: tuple[int, ...] | None = None
    if "end_id" in values:
        e = values["end_id"]
        if not 0 <= e < ctx.vocab_size:
            raise RequestError("end_id", f"{e} is outside the vocabulary [0, {ctx.vocab_size})")
        end_ids = (e,)

    stop_words: tuple[str, ...] = ()
    bad_words: tuple[tuple[int, ...], ...] = ()
    if "stop_words" in arrays:  # text stop words (the token model of a Triton repository takes them too)
        if ctx.tokenizer is None:
            raise RequestError("stop_words", "this engine has no tokenizer, so text stop words cannot be matched")
        stop_words = decode_words("stop_words", arrays["stop_words"])
    if spec.kind == "text":
        if "bad_words" in arrays:
            bad_words = encode_bad_words(ctx.tokenizer, arrays["bad_words"])
    else:
        if "bad_words_list" in arrays:
            bad_words = tuple(_words("bad_words_list", arrays["bad_words_list"]))
            _check_ids("bad_words_list", bad_words, ctx.vocab_size)
        if "stop_words_list" in arrays:
            stops = _words("stop_words_list", arrays["stop_words_list"])
            _check_ids("stop_words_list", stops, ctx.vocab_size)
            if any(len(s) != 1 for s in stops):
                raise RequestError("stop_words_list", "only single-token stop sequences are supported by the token "
                                                      "model (use the text model's stop_words for text)")
            if stops:
                end_ids = tuple(dict.fromkeys((*(end_ids or ctx.eos_ids), *(s[0] for s in stops))))

    guided = _guided(values)
    context_logits = bool(values.get("return_context_logits", False))
    generation_logits = bool(values.get("return_generation_logits", False))
    outputs = _select_outputs(spec, requested_outputs, bool(values.get("return_log_probs", False)),
                              bool(values.get("return_perf_metrics", False)))
    sequences = _sequences(values, spec)
    gen = GenerationRequest(
        **sequences, request_id=request_id, prompt_ids=list(prompt_ids), max_tokens=int(max_tokens), sampling=sampling,
        min_tokens=int(min_tokens), end_ids=end_ids, stop_words=stop_words, bad_words=bad_words, stream=stream,
        # The core computes log probs only for requests that return them (asked by flag or by name).
        return_log_probs=any(name in spec.log_prob_outputs for name in outputs),
        detokenize=spec.kind == "text" or bool(stop_words),
        # Computed only when the flag asks, as TensorRT-LLM (naming the output alone returns nothing).
        return_context_logits=context_logits, return_generation_logits=generation_logits, guided=guided,
        images=image_inputs(arrays),  # only the text model (and a Triton repository's llama) declares them
    )
    return ParsedRequest(spec, gen, client_id, stream, bool(values.get("exclude_input_in_output", False)),
                         prompt_text, outputs, empty_final)


def encode_prompt(tokenizer: Any, prompt: Any) -> tuple[str, list[int]]:
    """`text_input` (UTF-8 bytes) -> (text, ids): the special tokens the tokenizer's own rules add
    (`Tokenizer.encode`: BOS only where the checkpoint's tokenizer adds one, and not before a BOS
    the text already starts with) and special-token text recognised, as TensorRT-LLM's
    preprocessing (HF `encode`) does."""
    if not isinstance(prompt, (bytes, bytearray)):
        raise RequestError("text_input", "expected BYTES")
    text = _utf8("text_input", bytes(prompt))
    ids = tokenizer.encode(text, add_bos=True, allow_special=True)
    if not ids:
        raise RequestError("text_input", "the prompt is empty (and the tokenizer adds no BOS)")
    return text, ids


def decode_words(name: str, words: np.ndarray) -> tuple[str, ...]:
    """A BYTES word list ([N] or [1, N], e.g. `stop_words`) as its non-empty UTF-8 strings."""
    return tuple(w for w in (_utf8(name, bytes(b)) for b in _list(name, words)) if w)


def encode_bad_words(tokenizer: Any, words: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """`bad_words` (BYTES [N] or [1, N]) -> one token sequence per non-empty word."""
    texts = [_utf8("bad_words", bytes(b)) for b in _list("bad_words", words)]
    return tuple(tuple(tokenizer.encode(w, add_bos=False)) for w in texts if w)


def words_array(seqs: Sequence[Sequence[int]]) -> np.ndarray:
    """Token sequences in TensorRT-LLM's [2, L] word-list layout (row 0: the ids concatenated, row 1:
    each sequence's end offset, -1 padded); no sequences is [[0], [-1]]. Inverse of `_words`."""
    ids = [int(i) for s in seqs for i in s]
    offsets = np.cumsum([len(s) for s in seqs]).tolist() if seqs else []
    width = max(1, len(ids))
    out = np.full((2, width), -1, dtype=np.int32)
    out[0, :] = 0
    out[0, : len(ids)] = ids
    out[1, : len(offsets)] = offsets
    return out


def _check_ids(name: str, seqs: Sequence[tuple[int, ...]], vocab: int) -> None:
    for s in seqs:
        for i in s:
            if not 0 <= i < vocab:
                raise RequestError(name, f"token id {i} is outside the vocabulary [0, {vocab})")


def _sampling(values: dict[str, Any], k_field: str, p_field: str) -> SamplingParams:
    temperature = values.get("temperature", 1.0)
    if temperature < 0:
        raise RequestError("temperature", f"must be >= 0, got {temperature}")
    top_k = values.get(k_field, 0)
    if top_k < 0:
        raise RequestError(k_field, f"must be >= 0 (0 = off), got {top_k}")
    top_p = values.get(p_field, 0.0)
    if not 0.0 <= top_p <= 1.0:
        raise RequestError(p_field, f"must be in [0, 1] (0 = off), got {top_p}")
    penalty = values.get("repetition_penalty", 1.0)
    if penalty <= 0:
        raise RequestError("repetition_penalty", f"must be > 0, got {penalty}")
    penalties = {}
    for name in ("presence_penalty", "frequency_penalty"):
        value = values.get(name, 0.0)
        if not -2.0 <= value <= 2.0:
            raise RequestError(name, f"must be in [-2, 2] (OpenAI's range), got {value}")
        penalties[name] = value
    seed = values.get("seed")
    sample = temperature > 0 and (top_k > 1 or top_p > 0)
    if not sample:
        return SamplingParams(temperature=0.0, repetition_penalty=penalty, seed=seed, **penalties)
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p if top_p > 0 else 1.0,
                          repetition_penalty=penalty, seed=seed, **penalties)


def _guided(values: dict[str, Any]) -> GuidedSpec | None:
    """TensorRT-LLM's guided_decoding_guide_type / guided_decoding_guide; compiled at submit (a guide
    that does not compile is refused then, naming guided_decoding_guide)."""
    kind, guide = values.get("guided_decoding_guide_type"), values.get("guided_decoding_guide")
    if kind is None:
        if guide is not None:
            raise RequestError("guided_decoding_guide", "needs guided_decoding_guide_type")
        return None
    kind = _utf8("guided_decoding_guide_type", bytes(kind))
    text = "" if guide is None else _utf8("guided_decoding_guide", bytes(guide))
    return GuidedSpec(kind, text, field="guided_decoding_guide")


def _sequences(values: dict[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """num_return_sequences, beam_width and beam search's length_penalty / early_stopping as
    GenerationRequest fields. Beam search returns beam_width beams unless num_return_sequences says
    how many (TensorRT-LLM's default); the engine core checks the rest."""
    width = int(values.get("beam_width", 1))
    if width < 1:
        raise RequestError("beam_width", f"must be >= 1, got {width}")
    n = values.get("num_return_sequences")
    if n is not None and n < 1:
        raise RequestError("num_return_sequences", f"must be >= 1, got {n}")
    penalty = "len_penalty" if spec.kind == "tokens" else "length_penalty"
    return {"beam_width": width, "n": int(n if n is not None else width),
            "length_penalty": float(values.get(penalty, values.get("length_penalty", 1.0))),
            "early_stopping": bool(values.get("early_stopping", False))}


def _select_outputs(spec: ModelSpec, requested: Sequence[str] | None, log_probs: bool,
                    perf_metrics: bool) -> tuple[str, ...]:
    if not requested:
        # The logits are in every default set: only a row whose return_*_logits flag computed them
        # has them (`output_tensors`), and a unary batch answers with its first row's selection.
        return (spec.default_outputs + (spec.log_prob_outputs if log_probs else ()) + _LOGITS
                + (spec.perf_metric_outputs if perf_metrics else ()))
    names: list[str] = []
    for name in requested:
        if name not in spec.output_names:
            raise RequestError("outputs", f"unexpected output '{name}' for model '{spec.name}' (outputs: "
                                          f"{', '.join(spec.output_names)})")
        if name not in names:
            names.append(name)
    return tuple(names)
