"""BACKEND=trt for Llama 3.2 Vision: two TensorRT plans in the engine directory.

    engine.plan   the text decoder (model.onnx): both plugin ops, `llamaforge::LlamaAttention` and
                  `llamaforge::CrossAttention` (plugins/cross_attention/trt_plugin.py), two profiles
    vision.plan   the vision encoder + projector (vision.onnx): standard ops only, one profile

The text plan's profiles are the text model's (`trt_backend.optimization_profiles`: "context" for
prefill, "generation" for decode) with the cross-attention inputs added. At prefill the image states
of up to MAX_IMAGES images arrive (`cross_attention_states` [b, new, hidden], new from one tile's
tokens, a text-only prompt's single zero tile, to every tile of MAX_IMAGES images) and the cross
caches are that size; a decode step passes no new states (new = 0) and the cached ones. The tile
count of `cross_attention_mask` follows. MAX_IMAGES is 1, Meta's recommendation for these models
(the runtime's default `max_images` too).

Both plans share the engine's timing cache: the vision build starts from the one the text build
wrote. Needs the real TensorRT (checked by the caller, `builder.build_engine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llamaforge.build.errors import BuildError
from llamaforge.build.trt_backend import (
    CONTEXT_PROFILE,
    PLAN_FILE,
    TIMING_CACHE_FILE,
    Profile,
    Shape,
    TensorRTBuildError,
    TensorRTOptions,
    build_plan_with_profiles,
    optimization_profiles,
)
from llamaforge.export.config import ModelConfig
from llamaforge.export.vision_config import VisionConfig
from llamaforge.plugins.attention import trt_plugin
from llamaforge.plugins.cross_attention import trt_plugin as cross_trt_plugin

VISION_PLAN_FILE = "vision.plan"
VISION_PROFILE = "vision"
MAX_IMAGES = 1

Range = tuple[Shape, Shape, Shape]


def _ranged(*dims: Sequence[int]) -> Range:
    """(min, opt, max) shapes from one (min, opt, max) triple per dimension."""
    lo, opt, hi = (tuple(dim[i] for dim in dims) for i in range(3))
    return lo, opt, hi


def text_profiles(config: ModelConfig, vision: VisionConfig, options: TensorRTOptions,
                  max_images: int = MAX_IMAGES) -> list[Profile]:
    """The text decoder's "context" and "generation" profiles: the text model's, the cross-attention
    layers' caches renamed and sized in image tokens, plus the image states and the mask."""
    tpt, tiles = vision.num_patches, vision.max_num_tiles
    kvh, d, hidden = config.num_kv_heads, config.head_dim, config.hidden_size
    tokens = (tpt, tiles * tpt, max_images * tiles * tpt)  # one tile (text only) / one image / every image
    profiles = []
    for base in optimization_profiles(config.num_layers, kvh, d, options.limits):
        shapes = dict(base.shapes)
        batch = tuple(s[0] for s in shapes["input_ids"])
        seq = tuple(s[1] for s in shapes["input_ids"])
        new = tokens if base.name == CONTEXT_PROFILE else (0, 0, 0)  # decode: no new image states
        for layer in vision.cross_attention_layers:
            del shapes[f"past_key.{layer}"], shapes[f"past_value.{layer}"]
            cache = _ranged(batch, (kvh,) * 3, tokens, (d,) * 3)
            shapes[f"past_cross_key.{layer}"] = shapes[f"past_cross_value.{layer}"] = cache
        shapes["cross_attention_states"] = _ranged(batch, new, (hidden,) * 3)
        shapes["cross_attention_mask"] = _ranged(batch, seq, (1, tiles, max_images * tiles))
        profiles.append(Profile(base.name, shapes))
    return profiles


def vision_profiles(vision: VisionConfig, options: TensorRTOptions, max_images: int = MAX_IMAGES) -> list[Profile]:
    """One profile: 1..MAX_BATCH prompts of 1..MAX_IMAGES images (opt: one image), every tile."""
    b, tiles, size, channels = options.limits.max_batch, vision.max_num_tiles, vision.image_size, vision.num_channels
    batch, images = (1, 1, b), (1, 1, max_images)
    return [Profile(VISION_PROFILE, {
        "pixel_values": _ranged(batch, images, *[(n,) * 3 for n in (tiles, channels, size, size)]),
        "aspect_ratio_ids": _ranged(batch, images), "aspect_ratio_mask": _ranged(batch, images, (tiles,) * 3)})]


def build_mllama_plans(tmp: Path, config: ModelConfig, vision: VisionConfig, options: TensorRTOptions,
                       out: Path) -> dict[str, Any]:
    """Both plans into the staged engine directory `tmp`; the manifest's `tensorrt` entry (the text
    plan's, with the vision plan's under `vision`)."""
    from llamaforge.build.builder import MODEL_FILE
    from llamaforge.build.mllama import VISION_FILE

    previous = out / TIMING_CACHE_FILE  # the engine being replaced carries the last build's timings
    try:
        text = build_plan_with_profiles(tmp / MODEL_FILE, tmp / PLAN_FILE, text_profiles(config, vision, options),
                                        [trt_plugin.PLUGIN_ID, cross_trt_plugin.PLUGIN_ID], options,
                                        previous if previous.exists() else None)
        image = build_plan_with_profiles(tmp / VISION_FILE, tmp / VISION_PLAN_FILE, vision_profiles(vision, options),
                                         [], options, tmp / TIMING_CACHE_FILE)
    except TensorRTBuildError as e:
        raise BuildError(str(e)) from None
    return {**text, "vision": image}
