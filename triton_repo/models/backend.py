"""Helpers shared by the Python-backend models: config parameters, tensors, errors.

Imported only inside Triton's Python backend (or with the tests' stand-in installed as
`triton_python_backend_utils`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from llamaforge.runtime.core.engine import EngineError, read_manifest
from llamaforge.runtime.core.requests import QueueFullError, RequestError
from llamaforge.runtime.core.tokenizer import Tokenizer, load_tokenizer
from llamaforge.triton_repo.models.interfaces import LLAMA_TO_ENSEMBLE

__all__ = ["parameters", "engine_dir", "repository_path", "load_engine_tokenizer", "input_tensors", "output_tensors", "error_response",
           "request_parameters", "decoupled", "FINAL"]

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def parameters(args: Mapping[str, str]) -> dict[str, str]:
    """The config.pbtxt `parameters` of the model being initialised (key -> string_value)."""
    config = json.loads(args["model_config"])
    return {k: str(v.get("string_value", "")) for k, v in (config.get("parameters") or {}).items()}


def decoupled(args: Mapping[str, str]) -> bool:
    """Whether the model being initialised is deployed decoupled (config.pbtxt
    `model_transaction_policy.decoupled`; absent: false, as in Triton)."""
    config = json.loads(args["model_config"])
    return bool((config.get("model_transaction_policy") or {}).get("decoupled", False))


def engine_dir(params: Mapping[str, str], args: Mapping[str, str]) -> Path:
    """The `engine_dir` parameter; a relative path is relative to the model repository's root."""
    value = params.get("engine_dir", "").strip()
    if not value:
        raise EngineError(f"model '{args.get('model_name')}': config.pbtxt parameter 'engine_dir' is missing or empty")
    return repository_path(value, args)


def repository_path(value: str, args: Mapping[str, str]) -> Path:
    """A path from a config.pbtxt parameter: absolute, or relative to the model repository's root."""
    path = Path(value)
    return path if path.is_absolute() else Path(args["model_repository"]).parent / path


def load_engine_tokenizer(path: Path) -> Tokenizer:
    """The engine's tokenizer, without loading the model (for preprocessing/postprocessing/bls)."""
    info = read_manifest(path).tokenizer
    if info is None:
        raise EngineError(f"{path}: the engine has no tokenizer (manifest.json 'tokenizer.kind' is 'none'); the text "
                          "models need one: build the engine from a checkpoint with its tokenizer")
    return load_tokenizer(path, info.to_json())


def input_tensors(request: Any) -> dict[str, np.ndarray]:
    return {t.name(): t.as_numpy() for t in request.inputs()}


def output_tensors(tensors: Mapping[str, np.ndarray]) -> list[Any]:
    return [pb_utils.Tensor(name, np.ascontiguousarray(arr)) for name, arr in tensors.items()]


def request_parameters(request: Any) -> dict[str, Any]:
    raw = request.parameters()
    return json.loads(raw) if raw else {}


def error_response(error: BaseException) -> Any:
    """An error response with the Triton code that matches the exception; request-field errors of
    the llama model also name the ensemble input the field comes from."""
    if isinstance(error, RequestError):
        message = str(error)
        if error.field in LLAMA_TO_ENSEMBLE:
            message = f"{error.field} (ensemble input {LLAMA_TO_ENSEMBLE[error.field]}){message[len(error.field):]}"
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))
    if isinstance(error, QueueFullError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"queue full: {error}",
                                                                     pb_utils.TritonError.UNAVAILABLE))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {error!r}",
                                                                 pb_utils.TritonError.INTERNAL))


class TokenizerModel:
    """preprocessing and postprocessing: stateless, one response per request, computed from the
    request's tensors by `transform(tokenizer, tensors)` with the engine's tokenizer."""

    transform: Any  # staticmethod(tokenizer, dict[str, np.ndarray]) -> dict[str, np.ndarray]

    def initialize(self, args: dict[str, str]) -> None:
        self.tokenizer = load_engine_tokenizer(engine_dir(parameters(args), args))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                outputs = self.transform(self.tokenizer, input_tensors(request))
                responses.append(pb_utils.InferenceResponse(output_tensors=output_tensors(outputs)))
            except Exception as e:  # noqa: BLE001 - one bad request must not fail the others
                responses.append(error_response(e))
        return responses
