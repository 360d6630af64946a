"""runtime/core/manifest.py: the typed, versioned engine manifest. Round trip (JSON and file), the
version key, manifests written before the key existed, and errors that name the field and the file."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from llamaforge.runtime.core.engine import EngineError, read_manifest
from llamaforge.runtime.core.manifest import MANIFEST_VERSION, EngineManifest, ManifestError

# A manifest as the build wrote it before `manifest_version` existed (an fp8-KV int8-sq engine, so
# every optional part is there), in the build's key order.
OLD: dict[str, Any] = {
    "format": "llama-forge-engine",
    "format_version": 1,
    "variant": "hf",
    "config": {"hidden_size": 64, "num_layers": 2, "vocab_size": 640, "architecture": "llama"},
    "precision": "int8-sq",
    "backend": "ort",
    "weights": "checkpoint",
    "model_file": "model.onnx",
    "external_data": "model.onnx.data",
    "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
               {"name": "past_key.0", "dtype": "float32", "shape": ["batch", 2, "capacity", 16]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "num_logits", 640]}],
    "kv_cache": {"layout": "bhcd-slots", "dtype": "float32", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16,
                 "max_capacity": 512, "past_inputs": ["past_key.{layer}", "past_value.{layer}"],
                 "present_outputs": ["present_key.{layer}", "present_value.{layer}"], "lengths_input": "past_lengths",
                 "decode_in_place": True, "quantization": {"dtype": "float8e4m3fn", "simulated": True}},
    "special_tokens": {"bos_token_id": 1, "eos_token_id": [2], "pad_token_id": None},
    "tokenizer": {"kind": "hf", "file": "tokenizer.json", "sha256": "ab12", "bos_id": None, "eos_ids": [2],
                  "config_file": "tokenizer_config.json"},
    "passes": ["clean", "fuse-qkv"],
    "source": {"checkpoint": "/ckpt", "layout": "hf", "warnings": []},
    "tools": {"python": "3.11.7"},
    "quantization": {"precision": "int8-sq", "kv_cache": "fp8", "quantize_lm_head": False, "quantize_router": False,
                     "smoothquant_alpha": 0.5, "calibration": {"kind": "file", "tokens": 4096},
                     "statistics": "calibration.safetensors"},
    "ort_session_config": {"session.x64quantprecision": "1"},
}


def with_version(data: dict[str, Any], version: int) -> dict[str, Any]:
    """`data` with manifest_version where the build writes it: after format_version."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        out[key] = value
        if key == "format_version":
            out["manifest_version"] = version
    return out


def test_old_manifest_without_version_loads_as_version_1() -> None:
    m = EngineManifest.from_json(copy.deepcopy(OLD))
    assert m.manifest_version == 1 == MANIFEST_VERSION
    assert m.vocab_size == 640 and m.kv_cache.num_layers == 2 and m.kv_cache.decode_in_place
    assert m.kv_cache.quantization is not None and m.kv_cache.quantization.dtype == "float8e4m3fn"
    assert m.tokenizer is not None and m.tokenizer.bos_id is None and m.tokenizer.config_file == "tokenizer_config.json"
    assert m.quantization is not None and m.quantization.smoothquant_alpha == 0.5
    assert m.inputs[1].shape == ["batch", 2, "capacity", 16]


def test_round_trip_keeps_the_directory_format_and_adds_the_version_key(tmp_path: Path) -> None:
    m = EngineManifest.from_json(copy.deepcopy(OLD))
    written = m.to_json()
    # The same JSON, key order included, plus the version key: old readers see what they saw.
    assert json.dumps(written) == json.dumps(with_version(OLD, MANIFEST_VERSION))
    # A present-but-null bos_id stays present (load_tokenizer reads absent as "look it up").
    assert "bos_id" in written["tokenizer"] and written["tokenizer"]["bos_id"] is None
    m.write(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["manifest_version"] == MANIFEST_VERSION
    assert EngineManifest.read(tmp_path) == m == read_manifest(tmp_path)


def test_optional_parts_stay_out_when_absent() -> None:
    data = copy.deepcopy(OLD)
    for key in ("quantization", "ort_session_config"):
        del data[key]
    del data["kv_cache"]["quantization"], data["kv_cache"]["decode_in_place"]  # decode_in_place came later
    data["tokenizer"] = {"kind": "none"}
    m = EngineManifest.from_json(data)
    assert m.tokenizer is None and m.quantization is None and not m.kv_cache.decode_in_place
    written = m.to_json()
    assert written["tokenizer"] == {"kind": "none"}
    assert "quantization" not in written and "ort_session_config" not in written and "tensorrt" not in written
    assert "quantization" not in written["kv_cache"]


@pytest.mark.parametrize("edit, field, problem", [
    (lambda d: d["kv_cache"].update(num_layers="2"), "kv_cache.num_layers", "expected int, got str"),
    (lambda d: d["kv_cache"].pop("head_dim"), "kv_cache.head_dim", "missing"),
    (lambda d: d.pop("special_tokens"), "special_tokens", "missing"),
    (lambda d: d["special_tokens"].update(eos_token_id=[2, "3"]), "special_tokens.eos_token_id[1]", "expected int"),
    (lambda d: d["inputs"][1].update(shape=["batch", 2.5]), "inputs[1].shape[1]", "expected int or str, got float"),
    (lambda d: d["tokenizer"].pop("eos_ids"), "tokenizer.eos_ids", "missing"),
    (lambda d: d["quantization"].update(quantize_lm_head=0), "quantization.quantize_lm_head", "expected bool, got int"),
    (lambda d: d["config"].pop("vocab_size"), "config.vocab_size", "expected int, got null"),
    (lambda d: d.update(manifest_version="1"), "manifest_version", "expected int, got str"),
])
def test_a_bad_field_is_named_with_the_file(tmp_path: Path, edit: Any, field: str, problem: str) -> None:
    data = copy.deepcopy(OLD)
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError) as info:
        EngineManifest.read(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'manifest.json'}: field '{field}': "), message
    assert problem in message, message
    with pytest.raises(EngineError, match=re.escape(f"field '{field}'")):  # what the runtime and `make repo` catch
        read_manifest(tmp_path)


def test_a_newer_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps(with_version(OLD, MANIFEST_VERSION + 1)))
    with pytest.raises(ManifestError, match=r"manifest\.json: field 'manifest_version' is 2, newer than"):
        EngineManifest.read(tmp_path)


def test_not_an_engine_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        EngineManifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        EngineManifest.read(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({**OLD, "format": "onnx"}))
    with pytest.raises(ManifestError, match="field 'format' is 'onnx'"):
        EngineManifest.read(tmp_path)
