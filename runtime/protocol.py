"""KServe v2 / Triton gRPC protocol for llama-forge: the tensor codec, the two model interfaces
(text and token level, compatible with TensorRT-LLM's Triton models so their clients work
unchanged), request parsing and validation, and response building. No gRPC server code here
(that is `runtime/server.py`); messages are `tritonclient.grpc.service_pb2`'s, and request parsing
itself (`parse_inputs`) works on name -> NumPy tensors, so the Triton Python-backend models
(`runtime/triton_models/`) validate requests with the same code.

Tensor codec
------------
* BYTES tensors are Triton's serialisation: each element a 4-byte little-endian length then the
  bytes, in `raw_input_contents`; in `contents.bytes_contents` each element is one entry (no prefix).
* Numeric tensors come from `raw_input_contents` (little-endian, C order) or from the typed
  `contents` field (`int_contents` for INT8/16/32, `uint64_contents` for UINT64, ...). If a request
  uses `raw_input_contents` it must use it for every input (as in Triton).
* Outputs are always written to `raw_output_contents` (what Triton does; tritonclient reads both).

Models (max_batch_size 0: the declared dims are the whole shape; a leading batch dimension of 1 is
also accepted, which is what TensorRT-LLM clients send: `[[prompt]]`, `[[64]]`, `[[ids...]]`)

text model, served as "ensemble" (and "tensorrt_llm_bls" and the engine's variant name):

    input                    dtype   dims  default / meaning
    text_input               BYTES   [1]   required; UTF-8 prompt
    max_tokens               INT32   [1]   required; > 0 new tokens
    stream                   BOOL    [1]   false; true: one response per new piece of text
    exclude_input_in_output  BOOL    [1]   false (TRT-LLM default): text_output = prompt + generated text
    temperature              FP32    [1]   1.0 (see "Sampling")
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
* Prompt text is tokenized with a BOS and with special-token text recognised ("<|eot_id|>" is the
  special token), as TRT-LLM's preprocessing (HF `encode`) does.
* Request parameters: "priority" and "timeout" are accepted and ignored, "sequence_id" only as 0 /
  "" (no sequence batching), "triton_enable_empty_final_response" is honoured; any other parameter
  (and any input, output or tensor parameter not listed above) is refused with the field named.

Every refusal is a `RequestError(field, message)`: the server answers INVALID_ARGUMENT (unary) or a
stream error message, naming the field.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from .requests import GenerationOutput, GenerationRequest, RequestError
from .sampling import SamplingParams

__all__ = [
    "TEXT_MODEL", "TOKEN_MODEL", "ModelSpec", "TensorSpec", "ModelContext", "ParsedRequest",
    "serialize_bytes", "deserialize_bytes", "decode_inputs", "encode_output", "parse_request", "parse_inputs",
    "encode_prompt", "encode_bad_words", "decode_words", "words_array", "output_tensors",
    "model_config", "model_metadata", "ResponseBuilder", "FINAL_PARAM", "EMPTY_FINAL_PARAM",
]

FINAL_PARAM = "triton_final_response"
EMPTY_FINAL_PARAM = "triton_enable_empty_final_response"

# -- datatypes -----------------------------------------------------------------------------------

_NP: dict[str, Any] = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
_CONFIG_TYPE = {
    "BOOL": mc.TYPE_BOOL, "INT8": mc.TYPE_INT8, "INT16": mc.TYPE_INT16, "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64, "UINT8": mc.TYPE_UINT8, "UINT16": mc.TYPE_UINT16, "UINT32": mc.TYPE_UINT32,
    "UINT64": mc.TYPE_UINT64, "FP16": mc.TYPE_FP16, "FP32": mc.TYPE_FP32, "FP64": mc.TYPE_FP64,
    "BYTES": mc.TYPE_STRING,
}
_INTS = ("INT32", "INT64", "INT16", "INT8", "UINT32", "UINT64", "UINT16", "UINT8")
_FLOATS = ("FP32", "FP64", "FP16")


def serialize_bytes(elements: Iterable[bytes]) -> bytes:
    """Triton's BYTES serialisation: each element as a 4-byte little-endian length + the bytes."""
    out = bytearray()
    for e in elements:
        out += struct.pack("<I", len(e))
        out += e
    return bytes(out)


def deserialize_bytes(buf: bytes, field_name: str) -> list[bytes]:
    """Inverse of `serialize_bytes`; a truncated buffer is a `RequestError` naming `field_name`."""
    out: list[bytes] = []
    pos, n = 0, len(buf)
    while pos < n:
        if pos + 4 > n:
            raise RequestError(field_name, f"BYTES data is truncated: {n - pos} byte(s) left where a 4-byte "
                                           "length prefix was expected")
        (length,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + length > n:
            raise RequestError(field_name, f"BYTES element of length {length} runs past the end of the data "
                                           f"({n - pos} byte(s) left)")
        out.append(bytes(buf[pos:pos + length]))
        pos += length
    return out


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Every input tensor of `request` as a NumPy array of its declared shape (BYTES: object array of
    `bytes`), checking datatypes, shapes against the data, and the use of `raw_input_contents`."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestError("raw_input_contents", f"{len(raw)} raw input buffer(s) for {len(request.inputs)} "
                                                 "input(s): when raw_input_contents is used it must hold every input")
    tensors: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        name = t.name
        if not name:
            raise RequestError("inputs", f"input #{i} has no name")
        if name in tensors:
            raise RequestError(name, "input given more than once")
        for key in t.parameters:
            if key != "binary_data_size":
                raise RequestError(f"{name}.parameters.{key}", "tensor parameter not supported by this server "
                                                               "(no shared memory)")
        dtype = t.datatype
        if dtype not in _NP:
            raise RequestError(name, f"unknown datatype {dtype!r}")
        shape = tuple(int(d) for d in t.shape)
        if any(d < 0 for d in shape):
            raise RequestError(name, f"shape {list(shape)} has a negative dimension")
        count = math.prod(shape)
        if raw:
            data = raw[i]
            if dtype == "BYTES":
                elems = deserialize_bytes(data, name)
                if len(elems) != count:
                    raise RequestError(name, f"shape {list(shape)} has {count} element(s) but the data holds {len(elems)}")
                arr = np.empty(count, dtype=np.object_)
                arr[:] = elems
            else:
                itemsize = np.dtype(_NP[dtype]).itemsize
                if len(data) != count * itemsize:
                    raise RequestError(name, f"shape {list(shape)} of {dtype} needs {count * itemsize} bytes, "
                                             f"got {len(data)}")
                arr = np.frombuffer(data, dtype=np.dtype(_NP[dtype]).newbyteorder("<")).astype(_NP[dtype])
        else:
            if dtype not in _CONTENTS:
                raise RequestError(name, f"{dtype} data must be sent in raw_input_contents")
            values = list(getattr(t.contents, _CONTENTS[dtype]))
            if len(values) != count:
                raise RequestError(name, f"shape {list(shape)} has {count} element(s) but contents hold {len(values)}")
            if dtype == "BYTES":
                arr = np.empty(count, dtype=np.object_)
                arr[:] = [bytes(v) for v in values]
            else:
                try:
                    arr = np.array(values, dtype=_NP[dtype])
                except OverflowError:
                    raise RequestError(name, f"a value does not fit {dtype}") from None
        tensors[name] = arr.reshape(shape)
    return tensors


def encode_output(name: str, datatype: str, array: Any) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """One output tensor and its raw contents."""
    if datatype == "BYTES":
        arr = np.asarray(array, dtype=np.object_)
        data = serialize_bytes(e if isinstance(e, bytes) else str(e).encode("utf-8") for e in arr.reshape(-1))
    else:
        arr = np.ascontiguousarray(array, dtype=np.dtype(_NP[datatype]).newbyteorder("<"))
        data = arr.tobytes()
    tensor = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=list(arr.shape))
    return tensor, data


# -- model interfaces --------------------------------------------------------------------------------


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
        if self.datatype in _INTS:
            return datatype in _INTS  # old TRT-LLM ensembles declared UINT32; any integer type will do
        if self.datatype in _FLOATS:
            return datatype in _FLOATS
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


def model_config(spec: ModelSpec, served_name: str | None = None) -> mc.ModelConfig:
    """The Triton `ModelConfig` of a model: max_batch_size 0, decoupled (it streams)."""
    cfg = mc.ModelConfig(name=served_name or spec.name, backend="llama-forge", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = True
    for t in spec.inputs:
        cfg.input.add(name=t.name, data_type=_CONFIG_TYPE[t.datatype], dims=list(t.dims), optional=t.optional)
    for t in spec.outputs:
        cfg.output.add(name=t.name, data_type=_CONFIG_TYPE[t.datatype], dims=list(t.dims))
    cfg.parameters["model_kind"].string_value = spec.kind
    return cfg


def model_metadata(spec: ModelSpec, served_name: str | None = None) -> pb.ModelMetadataResponse:
    md = pb.ModelMetadataResponse(name=served_name or spec.name, versions=["1"], platform="llama-forge")
    for t in spec.inputs:
        md.inputs.add(name=t.name, datatype=t.datatype, shape=list(t.dims))
    for t in spec.outputs:
        md.outputs.add(name=t.name, datatype=t.datatype, shape=list(t.dims))
    return md


# -- parsing -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelContext:
    """What validation needs to know about the served engine."""

    tokenizer: Any  # runtime.tokenizer.Tokenizer, or None (then only the token model is served)
    context_length: int
    vocab_size: int
    eos_ids: tuple[int, ...]

    @classmethod
    def from_core(cls, core: Any) -> "ModelContext":
        vocab = None
        manifest = getattr(core, "manifest", None) or {}
        if isinstance(manifest.get("config"), dict):
            vocab = manifest["config"].get("vocab_size")
        if vocab is None and core.tokenizer is not None:
            vocab = core.tokenizer.vocab_size
        return cls(core.tokenizer, int(core.context_length), int(vocab or 0), tuple(core.eos_ids))


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


_IGNORED_PARAMS = {"priority", "timeout", "sequence_start", "sequence_end"}


_BY_NP = {np.dtype(v): k for k, v in _NP.items()}


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
                  streaming_rpc: bool) -> ParsedRequest:
    """Validate a ModelInferRequest for `spec` and turn it into a `GenerationRequest` with id
    `request_id` (the engine-side id; the client's own `id` is echoed separately)."""
    params = {key: _param_value(p) for key, p in request.parameters.items()}
    _check_params(params)  # before decoding: a bad parameter is reported before any tensor problem
    tensors = decode_inputs(request)
    requested: list[str] = []
    for o in request.outputs:
        for key in o.parameters:
            if key != "binary_data":
                raise RequestError(f"outputs.{o.name}.parameters.{key}", "output parameter not supported")
        requested.append(o.name)
    return parse_inputs(tensors, spec, ctx, request_id, params=params, requested_outputs=requested,
                        client_id=request.id, streaming_rpc=streaming_rpc)


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
    """Validate input tensors (name -> NumPy array, BYTES as object arrays of `bytes`) for `spec` and
    turn them into a `GenerationRequest` with id `request_id`. Shared by the gRPC server (after
    `decode_inputs`) and the Triton Python-backend models (from `pb_utils` tensors).
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
            if t.datatype in _INTS:
                v = int(v)
            elif t.datatype in _FLOATS:
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
    if max_tokens <= 0:
        raise RequestError(max_field, f"must be > 0, got {max_tokens}")

    prompt_text: str | None = None
    if spec.kind == "text":
        if ctx.tokenizer is None:
            raise RequestError("text_input", "this engine has no tokenizer; use the token model 'tensorrt_llm'")
        prompt_text, prompt_ids = encode_prompt(ctx.tokenizer, values["text_input"])
        prompt_field = "text_input"
    else:
        ids = _list("input_ids", arrays["input_ids"])
        prompt_ids = [int(i) for i in ids.tolist()]
        if not prompt_ids:
            raise RequestError("input_ids", "the prompt is empty")
        bad = [i for i in prompt_ids if not 0 <= i < ctx.vocab_size]
        if bad:
            raise RequestError("input_ids", f"token id {bad[0]} is outside the vocabulary [0, {ctx.vocab_size})")
        if "input_lengths" in values and values["input_lengths"] != len(prompt_ids):
            raise RequestError("input_lengths", f"is {values['input_lengths']} but {len(prompt_ids)} input_ids were sent")
        prompt_field = "input_ids"

    n = len(prompt_ids)
    if n >= ctx.context_length:
        raise RequestError(prompt_field, f"the prompt is {n} tokens; the context length is {ctx.context_length}, "
                                         "which leaves no room for a generated token")
    if n + max_tokens > ctx.context_length:
        raise RequestError(max_field, f"prompt ({n} tokens) + {max_field} ({max_tokens}) = {n + max_tokens} exceeds "
                                      f"the context length {ctx.context_length}; at most {ctx.context_length - n}")

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

    outputs = _select_outputs(spec, requested_outputs, bool(values.get("return_log_probs", False)))
    gen = GenerationRequest(
        request_id=request_id, prompt_ids=list(prompt_ids), max_tokens=int(max_tokens), sampling=sampling,
        min_tokens=int(min_tokens), end_ids=end_ids, stop_words=stop_words, bad_words=bad_words, stream=stream,
        # The core computes log probs only for requests that return them (asked by flag or by name).
        return_log_probs=any(name in spec.log_prob_outputs for name in outputs),
        detokenize=spec.kind == "text" or bool(stop_words),
    )
    return ParsedRequest(spec, gen, client_id, stream, bool(values.get("exclude_input_in_output", False)),
                         prompt_text, outputs, empty_final)


def encode_prompt(tokenizer: Any, prompt: Any) -> tuple[str, list[int]]:
    """`text_input` (UTF-8 bytes) -> (text, ids): BOS added and special-token text recognised, as
    TensorRT-LLM's preprocessing (HF `encode`) does."""
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
    seed = values.get("seed")
    sample = temperature > 0 and (top_k > 1 or top_p > 0)
    if not sample:
        return SamplingParams(temperature=0.0, repetition_penalty=penalty, seed=seed)
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p if top_p > 0 else 1.0,
                          repetition_penalty=penalty, seed=seed)


def _select_outputs(spec: ModelSpec, requested: Sequence[str] | None, log_probs: bool) -> tuple[str, ...]:
    if not requested:
        return spec.default_outputs + (spec.log_prob_outputs if log_probs else ())
    names: list[str] = []
    for name in requested:
        if name not in spec.output_names:
            raise RequestError("outputs", f"unexpected output '{name}' for model '{spec.name}' (outputs: "
                                          f"{', '.join(spec.output_names)})")
        if name not in names:
            names.append(name)
    return tuple(names)


# -- responses ---------------------------------------------------------------------------------------


class ResponseBuilder:
    """Turns a request's `GenerationOutput`s into ModelInferResponses.

    Streams: `piece(out)` per core output (None when it brings nothing new). Unary: `add(out)` for
    each output, then `whole()`."""

    def __init__(self, parsed: ParsedRequest, model_name: str) -> None:
        self.parsed = parsed
        self.model_name = model_name
        self._ids: list[int] = []
        self._text: list[str] = []
        self._log_probs: list[float] = []
        self.last: GenerationOutput | None = None

    def add(self, out: GenerationOutput) -> None:
        self._ids.extend(out.token_ids)
        self._text.append(out.text)
        self._log_probs.extend(out.log_probs)
        self.last = out

    def whole(self) -> pb.ModelInferResponse:
        """The unary response: everything generated (after the prompt unless excluded)."""
        return self._encode(self.whole_tensors())

    def whole_tensors(self) -> dict[str, tuple[str, np.ndarray]]:
        """`whole()`'s tensors, every output of either model: name -> (datatype, array)."""
        p, last = self.parsed, self.last
        assert last is not None
        text, ids = "".join(self._text), list(self._ids)
        if not p.exclude_input:
            if p.spec.kind == "text":
                text = (p.prompt_text or "") + text
            else:
                ids = list(p.generation.prompt_ids) + ids
        return output_tensors(text, ids, self._log_probs, last)

    def piece(self, out: GenerationOutput, final: bool | None) -> pb.ModelInferResponse | None:
        """A stream response with only what `out` brings; None if nothing new and not final.
        `final`: the value of triton_final_response to set (None: do not set it)."""
        self.last = out
        if not out.text and not out.token_ids and not final:
            return None
        resp = self._encode(output_tensors(out.text, list(out.token_ids), list(out.log_probs), out))
        if final is not None:
            resp.parameters[FINAL_PARAM].bool_param = final
        return resp

    def empty_final(self) -> pb.ModelInferResponse:
        resp = pb.ModelInferResponse(model_name=self.model_name, model_version="1", id=self.parsed.client_id)
        resp.parameters[FINAL_PARAM].bool_param = True
        return resp

    def _encode(self, tensors: dict[str, tuple[str, np.ndarray]]) -> pb.ModelInferResponse:
        resp = pb.ModelInferResponse(model_name=self.model_name, model_version="1", id=self.parsed.client_id)
        for name in self.parsed.outputs:
            dtype, arr = tensors[name]
            tensor, data = encode_output(name, dtype, arr)
            resp.outputs.append(tensor)
            resp.raw_output_contents.append(data)
        return resp


def output_tensors(text: str, ids: list[int], log_probs: list[float],
                   out: GenerationOutput) -> dict[str, tuple[str, np.ndarray]]:
    """Every output tensor of the text and token models for one response: name -> (datatype, array)."""
    return {
        "text_output": ("BYTES", np.array([text.encode("utf-8")], dtype=np.object_)),
        "output_ids": ("INT32", np.array(ids, dtype=np.int32).reshape(1, 1, -1)),
        "sequence_length": ("INT32", np.array([[len(ids)]], dtype=np.int32)),
        "cum_log_probs": ("FP32", np.array([[out.cum_log_prob]], dtype=np.float32)),
        "output_log_probs": ("FP32", np.array(log_probs, dtype=np.float32).reshape(1, 1, -1)),
        "num_input_tokens": ("INT32", np.array([out.num_input_tokens], dtype=np.int32)),
        "num_output_tokens": ("INT32", np.array([out.num_output_tokens], dtype=np.int32)),
    }
