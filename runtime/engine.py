"""An engine directory opened for inference with ONNX Runtime.

Serving hosts need only this package's dependencies (onnxruntime, numpy, tokenizers...): nothing
here imports torch, `export/` or `graphs/`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
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


def check_runnable(manifest: dict[str, Any], engine_dir: Path) -> None:
    """How an engine is picked: the manifest's `backend` says what built it. "ort" engines run here
    under ONNX Runtime. "trt" engines (engine.plan) need a TensorRT runner in the engine core, which
    this runtime does not have yet, so they are refused with this message rather than failing
    somewhere inside ONNX Runtime."""
    backend = manifest.get("backend")
    if backend == "trt":
        raise EngineError(f"{engine_dir}: manifest.json field 'backend' is 'trt', but this runtime has no TensorRT "
                          "runner yet (its engine core runs ONNX Runtime engines only); serve an engine built with BACKEND=ort")
    if backend != "ort":
        raise EngineError(f"{engine_dir}: manifest.json field 'backend' is {backend!r}, which cannot run under "
                          "ONNX Runtime (expected 'ort')")


def ort_providers(device: str, device_id: int = 0) -> list[Any]:
    """ONNX Runtime execution providers for a device: "cpu", or "gpu" on CUDA device `device_id`
    (which needs the onnxruntime-gpu build; the CPU-only wheel is refused with a message saying so)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "gpu":
        raise EngineError(f"device {device!r} is not 'cpu' or 'gpu'")
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise EngineError(f"a GPU instance needs ONNX Runtime's CUDAExecutionProvider, but this onnxruntime "
                          f"{ort.__version__} has only {available}: install onnxruntime-gpu (built for the "
                          "container's CUDA major version) instead of onnxruntime")
    return [("CUDAExecutionProvider", {"device_id": int(device_id)}), "CPUExecutionProvider"]


class Engine:
    """One ONNX Runtime session over an engine directory, plus its tokenizer and KV-cache spec."""

    def __init__(self, engine_dir: str | os.PathLike[str], threads: int | None = None,
                 providers: Sequence[Any] | None = None) -> None:
        """`providers`: ONNX Runtime execution providers (default CPU; see `ort_providers`)."""
        import onnxruntime as ort

        self.dir = Path(engine_dir)
        self.manifest = read_manifest(self.dir)
        check_runnable(self.manifest, self.dir)
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
        # Quantized engines name the session settings their Q/DQ graph needs to run as written (e.g.
        # no approximate int8 MatMulNBits); see graphs/quantization.py `ort_session_config`.
        self.session_config: dict[str, str] = dict(self.manifest.get("ort_session_config", {}))
        for key, value in self.session_config.items():
            options.add_session_config_entry(str(key), str(value))
        self.session = ort.InferenceSession(str(self.dir / self.manifest["model_file"]), options,
                                            providers=list(providers or ["CPUExecutionProvider"]))
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
