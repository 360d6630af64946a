"""A Llama 3.2 Vision engine directory run with ONNX Runtime: the vision graph, the text decoder, and
a greedy loop over one prompt.

The request's images (`mllama_image.preprocess` output) go through `vision.onnx` once; the prefill
call hands the projected states to the text model, whose cross-attention layers write their keys
and values into the sequence's cross KV cache (`past_cross_*` / `present_cross_*`, one per
cross-attention layer, `image tokens` long); every later call passes no image states and reads
that cache. A text-only prompt has a cross cache of one tile of zeros that no token sees, which makes
the cross-attention layers change nothing (transformers skips them).

This is the static, one-prompt path (like `generate.py` for text engines), not the serving engine
core: the scheduler, paged KV cache and front ends do not carry images yet (docs/vision.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llamaforge.runtime.core.engine import EngineError, check_runnable, engine_tokenizer, read_manifest
from llamaforge.runtime.core.manifest import VisionInfo
from llamaforge.runtime.core.mllama_image import MllamaImageBatch
from llamaforge.runtime.core.mllama_prompt import cross_attention_mask


class MllamaEngine:
    """The two ONNX Runtime sessions of a Llama 3.2 Vision engine directory."""

    def __init__(self, engine_dir: str | os.PathLike[str], threads: int | None = None) -> None:
        import onnxruntime as ort

        self.dir = Path(engine_dir)
        self.manifest = read_manifest(self.dir)
        check_runnable(self.manifest, self.dir)
        if self.manifest.weights == "none":
            raise EngineError(f"{self.dir}: built with WEIGHTS=none (graph only); it has no weights to run")
        if self.manifest.vision is None:
            raise EngineError(f"{self.dir}: not a Llama 3.2 Vision engine (its manifest has no 'vision' entry)")
        if self.manifest.kv_cache.dtype != "float32":
            raise EngineError(f"{self.dir}: KV dtype {self.manifest.kv_cache.dtype!r}: this runner takes float32 engines")
        self.vision: VisionInfo = self.manifest.vision
        self.tokenizer, self.eos_ids = engine_tokenizer(self.manifest, self.dir)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self.text = ort.InferenceSession(str(self.dir / self.manifest.model_file), options, providers=providers)
        self.encoder = ort.InferenceSession(str(self.dir / self.vision.model_file), options, providers=providers)
        kv = self.manifest.kv_cache
        self.num_layers, self.num_kv_heads, self.head_dim = kv.num_layers, kv.num_kv_heads, kv.head_dim
        self.hidden_size = int(self.manifest.config["hidden_size"])
        self.output_names = [o.name for o in self.text.get_outputs()]

    def encode_images(self, images: MllamaImageBatch) -> np.ndarray:
        """The projected image states [batch, max_images * max_num_tiles * tokens_per_tile, hidden]."""
        (states,) = self.encoder.run(None, {"pixel_values": images.pixel_values,
                                            "aspect_ratio_ids": images.aspect_ratio_ids,
                                            "aspect_ratio_mask": images.aspect_ratio_mask})
        return np.asarray(states)

    def _caches(self, capacity: int, image_tokens: int) -> dict[str, np.ndarray]:
        caches = {}
        for layer in range(self.num_layers):
            cross = layer in self.vision.cross_attention_layers
            kind = "past_cross" if cross else "past"
            shape = (1, self.num_kv_heads, image_tokens if cross else capacity, self.head_dim)
            caches[f"{kind}_key.{layer}"] = np.zeros(shape, np.float32)
            caches[f"{kind}_value.{layer}"] = np.zeros(shape, np.float32)
        return caches

    def _run(self, ids: Sequence[int], past_length: int, states: np.ndarray, mask: np.ndarray,
             caches: dict[str, np.ndarray]) -> np.ndarray:
        """One call for one row: the logits of its last token; `caches` is updated with the presents."""
        feeds = {"input_ids": np.array([ids], np.int64), "past_lengths": np.array([past_length], np.int32),
                 "logits_index": np.array([[len(ids) - 1]], np.int64), "cross_attention_states": states,
                 "cross_attention_mask": mask, **caches}
        outputs = self.text.run(self.output_names, feeds)
        for name, value in zip(self.output_names[1:], outputs[1:]):
            caches[name.replace("present", "past", 1)] = value
        return np.asarray(outputs[0])[0, -1]

    def prefill_logits(self, prompt: Sequence[int], images: MllamaImageBatch | None = None) -> np.ndarray:
        """Every prompt position's logits [len(prompt), vocab] (for parity checks and scoring)."""
        states, mask = self._image_inputs(prompt, images)
        feeds = {"input_ids": np.array([prompt], np.int64), "past_lengths": np.zeros(1, np.int32),
                 "logits_index": np.arange(len(prompt), dtype=np.int64)[None], "cross_attention_states": states,
                 "cross_attention_mask": mask, **self._caches(len(prompt), states.shape[1])}
        return np.asarray(self.text.run(["logits"], feeds)[0])[0]

    def _image_inputs(self, prompt: Sequence[int], images: MllamaImageBatch | None) -> tuple[np.ndarray, np.ndarray]:
        """(image states [1, tokens, hidden], cross-attention mask [1, len(prompt), tiles]) of one prompt."""
        if images is None:
            # One tile of zero keys and values that no token sees: the attention's output is then exactly 0
            # (a mean of zero values) and the MLP's is masked out, so the cross-attention layers change nothing.
            # (No tile at all would do the same, but ONNX Runtime's buffer reuse fails on the empty tensors.)
            states = np.zeros((1, self.vision.tokens_per_tile, self.hidden_size), np.float32)
            return states, np.zeros((1, len(prompt), 1), np.int64)
        if images.pixel_values.shape[0] != 1:
            raise EngineError(f"one prompt takes one batch row of images, got {images.pixel_values.shape[0]}")
        max_images, tiles = images.pixel_values.shape[1], images.pixel_values.shape[2]
        mask = cross_attention_mask(prompt, self.vision.image_token_id, [int(n) for n in images.num_tiles[0]],
                                    max_images, tiles)
        return self.encode_images(images), mask.reshape(1, len(prompt), max_images * tiles)

    def generate_greedy(self, prompt: Sequence[int], images: MllamaImageBatch | None = None, max_new_tokens: int = 32,
                        stop_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of `prompt` (token ids, `<|image|>` where each image goes)."""
        if not prompt:
            raise EngineError("the prompt is empty")
        states, mask = self._image_inputs(prompt, images)
        caches = self._caches(len(prompt) + max_new_tokens, states.shape[1])
        logits = self._run(prompt, 0, states, mask, caches)
        no_states = np.zeros((1, 0, self.hidden_size), np.float32)
        step_mask = mask[:, -1:]  # generated tokens see what the prompt's last token sees
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = int(np.argmax(logits))
            out.append(token)
            if token in stop_ids or len(out) == max_new_tokens:
                break
            logits = self._run([token], len(prompt) + len(out) - 1, no_states, step_mask, caches)
        return out
