"""Run a Llama 3.2 Vision engine directory's two graphs under ONNX Runtime at whatever precision it
was built in (a helper module, not a test file): the vision graph on an image batch, then one
prefill of the text graph, with the manifest's ONNX Runtime session settings (quantized engines need
them) and caches in the manifest's KV dtype: the precision tests' direct run of the two graphs, which
tests/build/test_mllama_precisions.py also compares with the serving engine core's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from llamaforge.runtime.core.engine import session_config_for_cpu


def session(path: Path, config: dict[str, str]) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def prefill_logits(engine_dir: Path, ids: list[int], images: dict[str, np.ndarray], mask: np.ndarray) -> np.ndarray:
    """Every position's logits [len(ids), vocab] as float32; `images` the vision graph's inputs for one
    prompt (pixel values float32), `mask` the cross-attention mask [1, len(ids), tiles]."""
    manifest: dict[str, Any] = json.loads((engine_dir / "manifest.json").read_text())
    config = session_config_for_cpu(dict(manifest.get("ort_session_config") or {}))
    (states,) = session(engine_dir / "vision.onnx", {}).run(None, images)
    text = session(engine_dir / "model.onnx", config)
    kv = manifest["kv_cache"]
    dtype = {"float32": np.float32, "float16": np.float16}[kv["dtype"]]
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.array([ids], np.int64), "past_lengths": np.zeros(1, np.int32),
        "logits_index": np.arange(len(ids), dtype=np.int64)[None], "cross_attention_states": states,
        "cross_attention_mask": mask}
    cross = manifest["vision"]["cross_attention_layers"]
    for layer in range(kv["num_layers"]):
        kind, length = ("past_cross", states.shape[1]) if layer in cross else ("past", len(ids))
        for part in ("key", "value"):
            feeds[f"{kind}_{part}.{layer}"] = np.zeros((1, kv["num_kv_heads"], length, kv["head_dim"]), dtype)
    return np.asarray(text.run(["logits"], feeds)[0][0], np.float32)
