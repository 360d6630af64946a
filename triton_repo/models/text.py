"""The text steps around the `llama` model, as functions of name -> NumPy tensors (no Triton
import): `preprocess` (the `preprocessing` model) and `postprocess` (the `postprocessing` model).
The `bls` model runs the same two functions around its call to `llama`, so both paths give the
same text."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from llamaforge.runtime.core.detokenizer import decode_window
from llamaforge.runtime.core.requests import RequestError
from llamaforge.runtime.serving.protocol import decode_words, encode_bad_words, encode_prompt, words_array

__all__ = ["preprocess", "postprocess", "flag"]


def _one(name: str, tensors: Mapping[str, np.ndarray]) -> Any:
    arr = tensors[name]
    if arr.size != 1:
        raise RequestError(name, f"expected one value, got shape {list(arr.shape)}")
    v = arr.reshape(-1)[0]
    return v.item() if hasattr(v, "item") else v


def flag(tensors: Mapping[str, np.ndarray], name: str, default: bool = False) -> bool:
    """An optional BOOL scalar input."""
    return bool(_one(name, tensors)) if name in tensors else default


def preprocess(tokenizer: Any, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """text_input (+ bad_words) -> input_ids [1, N], input_lengths [1, 1], bad_words_list [1, 2, L]
    (TensorRT-LLM's word-list layout), tokenized exactly as the standalone server does."""
    if "text_input" not in tensors:
        raise RequestError("text_input", "required input is missing")
    _, ids = encode_prompt(tokenizer, _one("text_input", tensors))
    bad = encode_bad_words(tokenizer, tensors["bad_words"]) if "bad_words" in tensors else ()
    return {
        "input_ids": np.array([ids], dtype=np.int32),
        "input_lengths": np.array([[len(ids)]], dtype=np.int32),
        "bad_words_list": words_array(bad)[None],
    }


def postprocess(tokenizer: Any, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One `llama` response (+ the request's text_input, stop_words, stream, exclude_input_in_output)
    -> the ensemble's outputs. Stateless: a stream piece is decoded after its `context_ids` window
    (runtime/core/detokenizer.py `decode_window`), so split UTF-8 characters, SentencePiece spaces and
    held-back stop-word prefixes come out as in the standalone server's streams."""
    stream = flag(tensors, "stream")
    ids = tensors["output_ids"].reshape(-1).tolist()
    if not stream:  # one response; output_ids may start with the prompt (exclude_input_in_output false)
        n_generated = int(_one("num_output_tokens", tensors))
        ids = ids[len(ids) - n_generated:] if n_generated else []
    stop_words = decode_words("stop_words", tensors["stop_words"]) if "stop_words" in tensors else ()
    text = decode_window(tokenizer, tensors["context_ids"].reshape(-1).tolist(), ids,
                         flag(tensors, "context_continues"), stop_words, final=flag(tensors, "is_final"))
    if not stream and not flag(tensors, "exclude_input_in_output"):
        text = _prompt_text(tensors) + text
    return {
        "text_output": np.array([text.encode("utf-8")], dtype=np.object_),
        "cum_log_probs": tensors["cum_log_probs"],
        "output_log_probs": tensors["output_log_probs"],
        "num_input_tokens": tensors["num_input_tokens"],
        "num_output_tokens": tensors["num_output_tokens"],
    }


def _prompt_text(tensors: Mapping[str, np.ndarray]) -> str:
    raw = _one("text_input", tensors)
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError("text_input", f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
