"""A Llama 3.2 Vision engine directory, one prompt at a time: a thin facade over the serving engine
core (`EngineCore`), which runs the vision graph, the cross-attention cache and the text model
(runtime/core/cross_attention.py). `llamaforge generate --image` and the parity tests use it; the
server uses the same core directly, so there is one runner for both.

    engine = MllamaEngine("engines/llama3.2-11b-vision-instruct")
    ids = engine.tokenizer.encode("<|image|>Describe this image.", allow_special=True)
    out = engine.generate(ids, [ImageInput("photo.jpg", data)], max_new_tokens=64)
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import numpy as np

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
from llamaforge.runtime.core.engine import EngineError, read_manifest
from llamaforge.runtime.core.engine_core import EngineCore, run_to_completion
from llamaforge.runtime.core.manifest import VisionInfo
from llamaforge.runtime.core.mllama_image import ImageInput
from llamaforge.runtime.core.requests import GenerationOutput, GenerationRequest
from llamaforge.runtime.core.sampling import SamplingParams

DEFAULT_KV_TOKENS = 8192  # one prompt plus its continuation; KV pages stay untouched until written


class MllamaEngine:
    """One prompt (token ids, `<|image|>` where each image goes) with its images, through an engine core
    of one sequence."""

    def __init__(self, engine_dir: str | os.PathLike[str], threads: int | None = None,
                 kv_tokens: int = DEFAULT_KV_TOKENS, max_images: int = CoreConfig.max_images) -> None:
        manifest = read_manifest(engine_dir)
        if manifest.vision is None:
            raise EngineError(f"{engine_dir}: not a Llama 3.2 Vision engine (its manifest has no 'vision' entry)")
        budget = min(kv_tokens, manifest.kv_cache.max_capacity)
        self.core = EngineCore(engine_dir, CoreConfig(KVCacheConfig(budget_tokens=budget), SchedulerConfig(max_num_seqs=1),
                                                      threads=threads, max_images=max_images))
        self.vision: VisionInfo = manifest.vision
        self.tokenizer = self.core.tokenizer
        self.eos_ids = self.core.eos_ids
        self._ids = itertools.count()

    def close(self) -> None:
        self.core.stop()

    def _run(self, request: GenerationRequest) -> GenerationOutput:
        (out,) = run_to_completion(self.core, [request])
        if out.finish_reason == "error":
            raise EngineError(f"generation failed: {out.error}")
        return out

    def generate(self, prompt: Sequence[int], images: Sequence[ImageInput] = (), max_new_tokens: int = 32,
                 sampling: SamplingParams | None = None, stop_ids: Sequence[int] = ()) -> list[int]:
        """The continuation of `prompt` (greedy unless `sampling` says otherwise), stopping at
        `stop_ids` (not returned) or after `max_new_tokens`. Bad images raise RequestError naming
        their field."""
        request = GenerationRequest(f"generate-{next(self._ids)}", list(prompt), max_new_tokens,
                                    sampling or SamplingParams(temperature=0.0), end_ids=tuple(stop_ids),
                                    images=tuple(images), detokenize=False)
        return self._run(request).token_ids

    def prefill_logits(self, prompt: Sequence[int], images: Sequence[ImageInput] = ()) -> np.ndarray:
        """Every prompt position's logits [len(prompt), vocab] (for parity checks and scoring)."""
        request = GenerationRequest(f"prefill-{next(self._ids)}", list(prompt), 1, SamplingParams(temperature=0.0),
                                    images=tuple(images), detokenize=False, return_context_logits=True)
        logits = self._run(request).context_logits
        assert logits is not None
        return logits
