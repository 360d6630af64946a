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
from llamaforge.runtime.serving.model_interface import TEXT_MODEL
from llamaforge.runtime.serving.protocol import decode_words, encode_bad_words, encode_prompt, split_rows, words_array

__all__ = ["preprocess", "postprocess", "flag"]

# llama's per-row outputs that postprocessing hands on unchanged (text_output is its own).
_PASSED_ON = tuple(name for name in TEXT_MODEL.output_names if name != "text_output")


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
    """text_input [B, 1] (+ bad_words [B, N]) -> input_ids [B, L] (each row's ids, padded with 0
    to the longest), input_lengths [B, 1], bad_words_list [B, 2, W] (TensorRT-LLM's word-list
    layout, padded), tokenized exactly as the standalone server does."""
    if "text_input" not in tensors:
        raise RequestError("text_input", "required input is missing")
    rows = split_rows({k: v for k, v in tensors.items() if k in ("text_input", "bad_words")}, TEXT_MODEL)
    ids_rows, words_rows = [], []
    for row in rows:
        _, ids = encode_prompt(tokenizer, _one("text_input", row))
        ids_rows.append(ids)
        words_rows.append(words_array(encode_bad_words(tokenizer, row["bad_words"]) if "bad_words" in row else ()))
    input_ids = np.zeros((len(rows), max(len(ids) for ids in ids_rows)), dtype=np.int32)
    bad_words = np.tile(np.array([[0], [-1]], dtype=np.int32), (len(rows), 1, max(w.shape[1] for w in words_rows)))
    for i, (ids, words) in enumerate(zip(ids_rows, words_rows)):
        input_ids[i, : len(ids)] = ids
        bad_words[i, :, : words.shape[1]] = words
    return {
        "input_ids": input_ids,
        "input_lengths": np.array([[len(ids)] for ids in ids_rows], dtype=np.int32),
        "bad_words_list": bad_words,
    }


def postprocess(tokenizer: Any, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One `llama` response (one row's, with that row's text_input, stop_words, stream,
    exclude_input_in_output) -> the ensemble's outputs, llama's per-row outputs handed on. Stateless: a stream piece is decoded after its `context_ids` window
    (runtime/core/detokenizer.py `decode_window`), so split UTF-8 characters, SentencePiece spaces and
    held-back stop-word prefixes come out as in the standalone server's streams. A response of
    several rows (a non-decoupled llama's stacked answer to a batch, or a row's n sequences) is made
    row by row; an input of one row (the row the n sequences continue) goes with each."""
    rows, beams = tensors["output_ids"].shape[:2]
    if beams > 1:  # a beam search's one response: each beam's text, best first (text_output [beam])
        made = [postprocess(tokenizer, {**tensors, "output_ids": tensors["output_ids"][:, b: b + 1],
                                        "sequence_length": tensors["sequence_length"][:, b: b + 1]})
                for b in range(beams)]
        return {**made[0], "text_output": np.concatenate([m["text_output"] for m in made])}
    if rows > 1:
        made = [postprocess(tokenizer, {name: arr[i:i + 1] if len(arr) == rows else arr for name, arr in tensors.items()})
                for i in range(rows)]
        return {name: np.concatenate([m[name] for m in made]) for name in made[0]}
    stream = flag(tensors, "stream")
    ids = tensors["output_ids"].reshape(-1).tolist()
    if "sequence_length" in tensors:  # a stacked batch's ids are padded past each row's length
        ids = ids[: int(_one("sequence_length", tensors))]
    if not stream and not flag(tensors, "exclude_input_in_output"):  # one response, the prompt first
        ids = ids[int(_one("num_input_tokens", tensors)):]
    stop_words = decode_words("stop_words", tensors["stop_words"]) if "stop_words" in tensors else ()
    text = decode_window(tokenizer, tensors["context_ids"].reshape(-1).tolist(), ids,
                         flag(tensors, "context_continues"), stop_words, final=flag(tensors, "is_final"))
    if not stream and not flag(tensors, "exclude_input_in_output"):
        text = _prompt_text(tensors) + text
    return {"text_output": np.array([text.encode("utf-8")], dtype=np.object_),
            **{name: tensors[name] for name in _PASSED_ON if name in tensors}}


def _prompt_text(tensors: Mapping[str, np.ndarray]) -> str:
    raw = _one("text_input", tensors)
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError("text_input", f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
