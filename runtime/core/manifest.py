"""The engine manifest (`manifest.json` in an engine directory): one versioned dataclass that the
build stage writes (`llamaforge/build/builder.py` `manifest_for`) and every reader loads.

Contract:
  * `EngineManifest.read(engine_dir)` / `from_json(data, source)` check every field against its
    declared type; a missing or wrong-typed field raises `ManifestError` naming the file and the
    field's dotted path ("kv_cache.num_layers"). Keys this version does not know are ignored.
  * `manifest_version` is the schema version of this file (`MANIFEST_VERSION`). A manifest
    without it was written before the key existed and is read as version 1; a newer version is
    refused, since its fields may mean something this reader does not know.
  * `format_version` is the engine directory's own format (its files), unchanged by this module.
  * `to_json()` gives the JSON object the engine directory has always held (same keys, same order)
    plus `manifest_version`: an optional field whose value is None is left out, the way the build
    wrote it before the manifest was typed.

No import outside the standard library: serving hosts read manifests without the build stage.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "MANIFEST_FILE", "MANIFEST_FORMAT", "MANIFEST_VERSION", "ManifestError", "EngineManifest", "TensorInfo",
    "KVCacheInfo", "KVQuantization", "SpecialTokens", "TokenizerInfo", "QuantizationInfo", "VisionInfo",
    "TensorParallelInfo",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "llama-forge-engine"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file and the offending field."""


@dataclass(frozen=True)
class TensorInfo:
    """One input or output of the engine's graph; `shape` holds ints and symbolic dim names."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class KVQuantization:
    """How KV values are rounded (KV_CACHE=fp8); `simulated`: stored in `KVCacheInfo.dtype`."""

    dtype: str
    simulated: bool


@dataclass(frozen=True)
class KVCacheInfo:
    layout: str
    dtype: str  # what the runtime allocates
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_capacity: int
    past_inputs: list[str]
    present_outputs: list[str]
    lengths_input: str
    decode_in_place: bool = False  # every layer's decode update is ORT's in-place GQA kernel
    # Whether one call may hold several rows that continue after a past (batch > 1, seq > 1, a past
    # length > 0). False where attention is ORT's GQA kernel alone, which refuses that call: the
    # runtime then runs it one row at a time (runtime/core/engine.py `Engine.step_with`). Absent
    # (None) means true, as in every engine built before the field.
    batched_continuation: bool | None = None
    quantization: KVQuantization | None = None


@dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: int | None
    eos_token_id: list[int]
    pad_token_id: int | None


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer entry `export/tokenizer_files.py copy_tokenizer` makes and
    `runtime/core/tokenizer.py load_tokenizer` reads (`to_json()` gives that dict). An engine
    without a tokenizer has `EngineManifest.tokenizer` None, written as {"kind": "none"}."""

    kind: str  # hf | sentencepiece | tiktoken
    file: str
    bos_id: int | None  # present even when None: None means "no BOS", absent would mean "look it up"
    eos_ids: list[int]
    sha256: str | None = None
    config_file: str | None = None  # tokenizer_config.json (BOS/EOS rules, special tokens, chat_template)
    chat_template_file: str | None = None  # chat_template.jinja, where the checkpoint has one
    pattern: str | None = None  # tiktoken
    num_base_tokens: int | None = None  # tiktoken
    special_tokens: dict[str, int] | None = None  # tiktoken

    @classmethod
    def from_json(cls, data: Any, source: str = "tokenizer") -> TokenizerInfo:
        """A tokenizer entry as copy_tokenizer makes it; a bad field raises ManifestError naming it."""
        return _load(cls, data, source, "tokenizer")

    def to_json(self) -> dict[str, Any]:
        # copy_tokenizer's key order: kind, file, sha256, bos_id, eos_ids, then the kind's extras.
        order = ("kind", "file", "sha256", "bos_id", "eos_ids", "config_file", "chat_template_file", "pattern",
                 "num_base_tokens", "special_tokens")
        data = _to_json(self)
        return {key: data[key] for key in order if key in data}


@dataclass(frozen=True)
class QuantizationInfo:
    """What a quantized build quantized (graphs/quantization/recipes.py `QuantConfig.describe`),
    on which calibration data, and the file its statistics are in."""

    precision: str | None
    kv_cache: str | None
    quantize_lm_head: bool
    quantize_router: bool
    calibration: dict[str, Any]
    statistics: str
    smoothquant_alpha: float | None = None  # int8-sq with a forced alpha (searched: per layer in calibration)
    scales: dict[str, str] | None = None  # fp8 / int8-sq: how weight and activation scales are made, in words
    int4_block_size: int | None = None  # int4-awq / int4-rtn only
    ort_kernels: str | None = None  # int8-wo / int4-*: fast (MatMulNBits) | exact (the Q/DQ graph)

    @classmethod
    def from_json(cls, data: Any, source: str = "quantization") -> QuantizationInfo:
        return _load(cls, data, source, "quantization")

    def to_json(self) -> dict[str, Any]:
        order = ("precision", "kv_cache", "quantize_lm_head", "quantize_router", "smoothquant_alpha", "scales", "int4_block_size",
                 "ort_kernels", "calibration", "statistics")
        data = _to_json(self)
        return {key: data[key] for key in order if key in data}


@dataclass(frozen=True)
class VisionInfo:
    """A Llama 3.2 Vision engine's image side (docs/vision.md): the vision graph beside the text model
    (pixel values in, the projected image states out), and what the runtime needs to feed the text
    model's cross-attention layers: their caches are `past_cross_key.{layer}` / `past_cross_value.{layer}`
    (in place of the self-attention caches of those layers), `tokens_per_tile` image tokens per tile."""

    model_file: str
    external_data: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    config: dict[str, Any]  # transformers' vision_config fields (export's VisionConfig.to_hf())
    cross_attention_layers: list[int]
    image_token_id: int
    image_size: int
    max_num_tiles: int
    tokens_per_tile: int
    past_inputs: list[str]
    present_outputs: list[str]


@dataclass(frozen=True)
class TensorParallelInfo:
    """A tensor-parallel engine's split (docs/tensor_parallel.md): `size` ranks; `rank` is this rank's
    number in a rank's manifest (rank{i}/manifest.json) and None in the engine's top-level one."""

    size: int
    rank: int | None
    kv_heads_per_rank: int
    q_heads_per_rank: int
    vocab_shards: list[list[int]]  # [start, end) of each rank's LM-head rows, in rank order


@dataclass(frozen=True)
class EngineManifest:
    variant: str
    config: dict[str, Any]  # export's ModelConfig.to_dict(); the runtime reads `vocab_size` from it
    precision: str
    backend: str  # ort | trt: what built the engine, and so what may run it
    weights: str  # checkpoint | none (graph only)
    model_file: str
    external_data: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    kv_cache: KVCacheInfo
    special_tokens: SpecialTokens
    tokenizer: TokenizerInfo | None  # None: the engine has no tokenizer ({"kind": "none"})
    passes: list[str]
    source: dict[str, Any]  # the checkpoint (or registry variant) it was built from
    tools: dict[str, str]  # versions of the tools that built it
    quantization: QuantizationInfo | None = None
    ort_session_config: dict[str, str] | None = None  # session settings a quantized graph needs
    tensorrt: dict[str, Any] | None = None  # BACKEND=trt: the plan's profiles and timing cache
    vision: VisionInfo | None = None  # Llama 3.2 Vision: the vision graph and the cross-attention caches
    tensor_parallel: TensorParallelInfo | None = None  # TP=N engines: the ranks (docs/tensor_parallel.md)
    format: str = MANIFEST_FORMAT
    format_version: int = 1
    manifest_version: int = MANIFEST_VERSION

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    # -- JSON -----------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        data = _to_json(self)  # nested entries through their own to_json
        if self.tokenizer is None:
            data["tokenizer"] = {"kind": "none"}
        head = {key: data.pop(key) for key in ("format", "format_version", "manifest_version")}
        io = {key: data.pop(key) for key in ("inputs", "outputs")}
        out: dict[str, Any] = dict(head)
        for key, value in data.items():  # the build's key order: ..., external_data, inputs, outputs, kv_cache, ...
            out[key] = value
            if key == "external_data":
                out.update(io)
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = MANIFEST_FILE) -> EngineManifest:
        """Check `data` (a parsed manifest.json) and build the manifest; `source` names the file in errors."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"{source}: expected a JSON object, got {_json_type(data)}")
        if data.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{source}: field 'format' is {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        version = data.get("manifest_version", 1)  # written before the key existed: version 1
        if type(version) is not int:
            raise ManifestError(f"{source}: field 'manifest_version': expected int, got {_json_type(version)}")
        if version > MANIFEST_VERSION:
            raise ManifestError(f"{source}: field 'manifest_version' is {version}, newer than this llama-forge reads "
                                f"({MANIFEST_VERSION}); upgrade llama-forge or rebuild the engine")
        fields = dict(data)
        fields["manifest_version"] = version
        tokenizer = fields.get("tokenizer")
        if isinstance(tokenizer, Mapping) and tokenizer.get("kind", "none") == "none":
            fields["tokenizer"] = None
        try:
            manifest = _from_json(cls, fields, "")
            if type(manifest.config.get("vocab_size")) is not int:
                raise _FieldError("config.vocab_size", f"expected int, got {_json_type(manifest.config.get('vocab_size'))}")
        except _FieldError as e:
            raise ManifestError(f"{source}: field '{e.path}': {e.problem}") from None
        return manifest

    @classmethod
    def read(cls, engine_dir: str | Path) -> EngineManifest:
        path = Path(engine_dir) / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path}: not found; is {engine_dir} an engine directory (made by `make engine`)?") from None
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(data, str(path))

    def write(self, engine_dir: str | Path) -> Path:
        path = Path(engine_dir) / MANIFEST_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


# -- typed JSON conversion ---------------------------------------------------------------------------

_T = TypeVar("_T")


class _FieldError(Exception):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def _load(cls: type[_T], data: Any, source: str, path: str) -> _T:
    try:
        return _from_json(cls, data, path)
    except _FieldError as e:
        raise ManifestError(f"{source}: field '{e.path}': {e.problem}") from None


def _json_type(value: Any) -> str:
    names = {type(None): "null", bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "object"}
    return names.get(type(value), type(value).__name__)


def _to_json(obj: Any) -> dict[str, Any]:
    """A dataclass as JSON: fields in declaration order, nested dataclasses converted, an optional
    field (one with a default of None) left out while it is None."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None and f.default is None:
            continue
        out[f.name] = _value_to_json(value)
    return out


def _value_to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.to_json() if hasattr(value, "to_json") else _to_json(value)
    if isinstance(value, list):
        return [_value_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _value_to_json(v) for k, v in value.items()}
    return value


def _from_json(cls: type[_T], data: Any, path: str) -> _T:
    if not isinstance(data, Mapping):
        raise _FieldError(path or "<root>", f"expected an object, got {_json_type(data)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # cls is a dataclass
        where = f"{path}.{f.name}" if path else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _FieldError(where, "missing")
            continue
        kwargs[f.name] = _check(data[f.name], hints[f.name], where)
    return cls(**kwargs)


def _check(value: Any, tp: Any, path: str) -> Any:
    """`value` as type `tp` (JSON types: int, float, str, bool, None, list[X], dict[str, X], Any,
    unions, dataclasses); a mismatch raises _FieldError naming `path`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check(value, option, path)
            except _FieldError as e:
                errors.append(e)
        if len(errors) == 1 and errors[0].path != path:
            raise errors[0]  # the one possible type failed deeper inside: report where
        names = " or ".join(_type_name(o) for o in options)
        raise _FieldError(path, f"expected {names}, got {_json_type(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise _FieldError(path, f"expected a list, got {_json_type(value)}")
        (item,) = typing.get_args(tp)
        return [_check(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _FieldError(path, f"expected an object, got {_json_type(value)}")
        _, item = typing.get_args(tp)
        return {str(k): _check(v, item, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _from_json(tp, value, path)
    if tp is float:
        if type(value) not in (int, float):
            raise _FieldError(path, f"expected float, got {_json_type(value)}")
        return float(value)
    if tp in (int, str, bool, type(None)):
        if type(value) is not tp:  # exact: JSON true is not an int
            raise _FieldError(path, f"expected {_type_name(tp)}, got {_json_type(value)}")
        return value
    raise TypeError(f"manifest field {path}: unsupported type {tp!r}")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list"
    if origin is dict:
        return "an object"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return getattr(tp, "__name__", str(tp))
