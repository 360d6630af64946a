"""An engine directory opened for inference with ONNX Runtime.

Serving hosts need only this package's dependencies (onnxruntime, numpy, tokenizers...): nothing
here imports torch, `export/` or `graphs/`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .tokenizer import load_tokenizer

NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class EngineError(RuntimeError):
    pass


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: np.dtype
    max_capacity: int

    def empty(self, batch: int, capacity: int) -> list[np.ndarray]:
        """Zeroed past caches for every layer, in input order (key.0, value.0, key.1, ...)."""
        shape = (batch, self.num_kv_heads, capacity, self.head_dim)
        return [np.zeros(shape, self.dtype) for _ in range(2 * self.num_layers)]


def read_manifest(engine_dir: Path) -> dict[str, Any]:
    path = Path(engine_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{path}: not found; is {engine_dir} an engine directory (made by `make engine`)?") from None
    except json.JSONDecodeError as e:
        raise EngineError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != "llama-forge-engine":
        raise EngineError(f"{path}: field 'format' is {manifest.get('format')!r}, expected 'llama-forge-engine'")
    return manifest


class Engine:
    """One ONNX Runtime session over an engine directory, plus its tokenizer and KV-cache spec."""

    def __init__(self, engine_dir: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        self.dir = Path(engine_dir)
        self.manifest = read_manifest(self.dir)
        if self.manifest["backend"] != "ort":
            raise EngineError(f"{self.dir}: backend {self.manifest['backend']!r} cannot run under ONNX Runtime")
        if self.manifest["weights"] == "none":
            raise EngineError(f"{self.dir}: built with WEIGHTS=none (graph only); it has no weights to run")
        kv = self.manifest["kv_cache"]
        if kv["dtype"] not in NP_DTYPES:
            raise EngineError(f"{self.dir}: KV dtype {kv['dtype']!r} has no NumPy type for ONNX Runtime on this host")
        self.kv = KVSpec(kv["num_layers"], kv["num_kv_heads"], kv["head_dim"], np.dtype(NP_DTYPES[kv["dtype"]]),
                         kv["max_capacity"])
        self.config = self.manifest["config"]
        self.vocab_size = int(self.config["vocab_size"])
        self.eos_ids = tuple(self.manifest["special_tokens"]["eos_token_id"])
        tok = self.manifest.get("tokenizer", {"kind": "none"})
        self.tokenizer = load_tokenizer(self.dir, tok) if tok.get("kind") != "none" else None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(self.dir / self.manifest["model_file"]), options,
                                            providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def step(self, input_ids: np.ndarray, past_lengths: np.ndarray,
             past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward call: logits [B, S, V] and the updated caches."""
        feeds: dict[str, np.ndarray] = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "past_lengths": np.ascontiguousarray(past_lengths, dtype=np.int32),
        }
        for layer in range(self.kv.num_layers):
            feeds[f"past_key.{layer}"] = past[2 * layer]
            feeds[f"past_value.{layer}"] = past[2 * layer + 1]
        outputs = self.session.run(self.output_names, feeds)
        return outputs[0], outputs[1:]
