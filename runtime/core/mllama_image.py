"""Image preprocessing for Llama 3.2 Vision (mllama), with Pillow and NumPy only.

It does what transformers' `MllamaImageProcessor` does with the published `preprocessor_config.json`
(bilinear resampling through Pillow, CLIP mean and std), so that a served model sees the pixels it
would see under transformers (tests/runtime/test_mllama_image.py compares the two; the oracle is
transformers 5's Pillow backend, `MllamaImageProcessorPil`; its torchvision backend resizes with
torch instead and is not compared):

1. decode the image bytes (a few formats only; a pixel limit checked before anything is decoded);
2. convert to RGB, compositing any transparency onto white;
3. choose the tile arrangement (rows x columns of `tile_size` tiles, at most `max_image_tiles`) whose
   canvas needs the least upscaling, or else the least downscaling (`choose_tile_arrangement`);
4. resize, keeping the aspect ratio, to fit that canvas (`fit_to_canvas`), and pad it with zeros at
   the bottom and right;
5. rescale by 1/255, normalize, and cut the canvas into tiles, row by row.

A batch is `pixel_values` [batch, max_images, max_image_tiles, 3, tile, tile] (float32; tiles and
images that do not exist are zeros), `aspect_ratio_ids` [batch, max_images] (int64; 1 + the index of
the arrangement in `tile_arrangements`, 0 for no image), `aspect_ratio_mask` [batch, max_images,
max_image_tiles] (int64; 1 for each tile used, and for the first tile of every slot, as transformers
marks it), and `num_tiles` (per prompt, the tile count of each image).

Bad input (not an image, a truncated or corrupt one, too many pixels, too many images, a pixel mode
with no RGB meaning) raises `RequestError` naming the request field the image came in.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from llamaforge.runtime.core.requests import RequestError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_FORMATS",
    "ImageInput",
    "MllamaImageBatch",
    "MllamaImageConfig",
    "TiledImage",
    "choose_tile_arrangement",
    "decode_image",
    "fit_to_canvas",
    "preprocess_images",
    "tile_arrangements",
    "tile_image",
    "to_rgb",
]

# `image_mean` / `image_std` of the four releases' preprocessor_config.json: OpenAI CLIP's.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The formats a request may carry. Pillow would open many more, some through external programs
# (EPS runs Ghostscript); a request has no need for them.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

# Pillow modes whose conversion to RGB means something. 16-bit and float grayscale ("I;16", "I",
# "F") would be clipped at 255 by Pillow's conversion, which only looks like an image.
SUPPORTED_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})

# A decompression-bomb guard: a 48-megapixel phone photo (8000 x 6000) passes; decoded RGB of this
# many pixels is 150 MB, and whatever the size the model sees at most max_image_tiles tiles of it.
DEFAULT_MAX_PIXELS = 50_000_000

# Errors Pillow's decoders raise on data that is not a well-formed image of the claimed format.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


@dataclass(frozen=True)
class MllamaImageConfig:
    """The published preprocessing (size 560 but 448 for the base Llama-3.2-11B-Vision, 4 tiles,
    bilinear, rescale 1/255, CLIP mean and std) plus the request limits."""

    tile_size: int = 560
    max_image_tiles: int = 4
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    # Meta's prompt-format notes for Llama 3.2 Vision: "We recommend using a single image in one prompt"
    # (meta-llama/llama-models: models/llama3_2/vision_prompt_format.md).
    max_images: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        for name in ("tile_size", "max_image_tiles", "max_images", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"MllamaImageConfig.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("MllamaImageConfig: image_mean and image_std need 3 values, std > 0")

    @classmethod
    def from_preprocessor_config(cls, d: dict[str, Any], *, max_images: int = 1,
                                 max_pixels: int = DEFAULT_MAX_PIXELS) -> MllamaImageConfig:
        """From a checkpoint's `preprocessor_config.json`; anything other than what this module does
        (another processor, resampling, a step switched off) is a ValueError."""
        kind = d.get("image_processor_type", "MllamaImageProcessor")
        if kind not in ("MllamaImageProcessor", "MllamaImageProcessorFast", "MllamaImageProcessorPil"):
            raise ValueError(f"preprocessor_config.json: image_processor_type {kind!r} is not an mllama processor")
        off = [k for k in ("do_convert_rgb", "do_resize", "do_pad", "do_rescale", "do_normalize") if d.get(k, True) is not True]
        if off:
            raise ValueError(f"preprocessor_config.json: {', '.join(off)} off is not supported")
        if d.get("resample", 2) != 2:  # PIL's BILINEAR
            raise ValueError(f"preprocessor_config.json: resample={d['resample']} is not supported (only 2, bilinear)")
        size = d.get("size", {})
        if not isinstance(size, dict) or size.get("height") != size.get("width") or not size.get("height"):
            raise ValueError(f"preprocessor_config.json: size must be square {{'height': n, 'width': n}}, got {size}")
        mean, std = tuple(d.get("image_mean", CLIP_MEAN)), tuple(d.get("image_std", CLIP_STD))
        return cls(tile_size=int(size["height"]), max_image_tiles=int(d.get("max_image_tiles", 4)),
                   image_mean=(float(mean[0]), float(mean[1]), float(mean[2])),
                   image_std=(float(std[0]), float(std[1]), float(std[2])),
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)), max_images=max_images, max_pixels=max_pixels)


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt as the request carries it: its encoded bytes, and the request field
    that holds them (e.g. "messages[0].content[1].image_url"), which errors name."""

    field: str
    data: bytes


@dataclass(frozen=True)
class TiledImage:
    tiles: np.ndarray  # float32 [rows * cols, 3, tile, tile], row by row
    arrangement: tuple[int, int]  # (rows, cols) of tiles


@dataclass(frozen=True)
class MllamaImageBatch:
    pixel_values: np.ndarray  # float32 [batch, max_images, max_image_tiles, 3, tile, tile]
    aspect_ratio_ids: np.ndarray  # int64 [batch, max_images]
    aspect_ratio_mask: np.ndarray  # int64 [batch, max_images, max_image_tiles]
    num_tiles: list[list[int]]  # per prompt, per image


# -- the tile arrangement ------------------------------------------------------------------------


@cache
def tile_arrangements(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (rows, cols) with rows * cols <= max_tiles, rows-major: the order aspect ratio ids follow
    (the model's tile-position embeddings are indexed by them). For 4: (1, 1), (1, 2), (1, 3), (1, 4),
    (2, 1), (2, 2), (3, 1), (4, 1)."""
    return tuple((r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles)


def choose_tile_arrangement(height: int, width: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """The (rows, cols) whose canvas the image fits best. The image's scale to fit a canvas is the
    smaller of the two axis ratios. If some canvas needs no downscaling, take the smallest such
    scale (the least upscaling); otherwise the largest (the least downscaling). Ties go to the
    smallest canvas, then to the first arrangement."""
    arrangements = tile_arrangements(max_tiles)
    scales = [min(r * tile_size / height, c * tile_size / width) for r, c in arrangements]
    upscales = [s for s in scales if s >= 1]
    chosen = min(upscales) if upscales else max(scales)
    candidates = [a for a, s in zip(arrangements, scales) if s == chosen]
    return min(candidates, key=lambda a: a[0] * a[1])  # min() keeps the first of equal areas


def fit_to_canvas(height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int) -> tuple[int, int]:
    """The (height, width) to resize to: each side aimed at its own length clamped to [tile_size,
    canvas side], then the axis that needs the smaller scale sets it and the other follows the aspect
    ratio (at least 1 pixel, at most its target)."""
    target_h = min(max(height, tile_size), canvas_height)
    target_w = min(max(width, tile_size), canvas_width)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


# -- one image -------------------------------------------------------------------------------------


def decode_image(data: bytes, field: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The decoded image, or RequestError(field, ...). The pixel limit is checked on the header's
    size, before any pixel is decoded; Pillow's own global bomb check stays as a looser backstop."""
    if not data:
        raise RequestError(field, "the image is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise RequestError(field, f"not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError as e:  # past Pillow's process-wide limit, whatever ours is
        raise RequestError(field, f"the image has too many pixels ({e})") from None
    except _DECODE_ERRORS as e:
        raise RequestError(field, f"unreadable image ({e})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(field, f"the image is {width}x{height} = {width * height} pixels, more than the limit "
                                  f"of {max_pixels}")
    if image.mode not in SUPPORTED_MODES:
        raise RequestError(field, f"unsupported image mode {image.mode!r} ({image.format}); supported: "
                                  f"{', '.join(sorted(SUPPORTED_MODES))}")
    try:
        image.load()  # a truncated or corrupt file fails here, not later in the resize
    except _DECODE_ERRORS as e:
        raise RequestError(field, f"truncated or corrupt {image.format} image ({e})") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency (an alpha band, or a palette's or grayscale's transparent colour)
    composited onto white, as transformers does; other modes are converted by Pillow."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def tile_image(image: Image.Image, config: MllamaImageConfig) -> TiledImage:
    """Steps 2-5 of the module docstring for one decoded image."""
    rgb = to_rgb(image)
    width, height = rgb.size
    tile = config.tile_size
    rows, cols = choose_tile_arrangement(height, width, config.max_image_tiles, tile)
    new_h, new_w = fit_to_canvas(height, width, rows * tile, cols * tile, tile)
    resized = np.asarray(rgb.resize((new_w, new_h), resample=Image.Resampling.BILINEAR))
    canvas = np.zeros((rows * tile, cols * tile, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = resized
    # The same dtypes as transformers (product in float64, stored as float32, normalized in float32),
    # so that the values agree to float32 rounding; the zero padding is normalized like any pixel.
    rescaled = (canvas.astype(np.float64) * config.rescale_factor).astype(np.float32)
    mean, std = np.asarray(config.image_mean, dtype=np.float32), np.asarray(config.image_std, dtype=np.float32)
    values = (rescaled - mean) / std
    tiles = values.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, tile, tile)
    return TiledImage(np.ascontiguousarray(tiles), (rows, cols))


# -- a batch -----------------------------------------------------------------------------------------


def preprocess_images(prompts: Sequence[Sequence[ImageInput]],
                      config: MllamaImageConfig = MllamaImageConfig()) -> MllamaImageBatch:
    """The model's image inputs for a batch of prompts, each with its images in prompt order. Counts
    are checked before anything is decoded. ValueError if no prompt has an image (a caller's error)."""
    for images in prompts:
        if len(images) > config.max_images:
            raise RequestError(images[config.max_images].field,
                               f"too many images: at most {config.max_images} per prompt, got {len(images)}")
    max_images = max((len(images) for images in prompts), default=0)
    if max_images == 0:
        raise ValueError("preprocess_images: no prompt has an image")
    tiled = [[tile_image(decode_image(i.data, i.field, config.max_pixels), config) for i in images]
             for images in prompts]
    num_tiles = [[len(t.tiles) for t in prompt_tiles] for prompt_tiles in tiled]

    t, m = config.tile_size, config.max_image_tiles
    pixel_values = np.zeros((len(prompts), max_images, m, 3, t, t), dtype=np.float32)
    aspect_ratio_ids = np.zeros((len(prompts), max_images), dtype=np.int64)
    aspect_ratio_mask = np.zeros((len(prompts), max_images, m), dtype=np.int64)
    # transformers marks the first tile of every image slot, an empty one too: Meta's reference code
    # pads the aspect ratios of missing images with (1, 1).
    aspect_ratio_mask[:, :, 0] = 1
    ids = {a: i + 1 for i, a in enumerate(tile_arrangements(m))}
    for b, prompt_tiles in enumerate(tiled):
        for j, tiled_image in enumerate(prompt_tiles):
            n = len(tiled_image.tiles)
            pixel_values[b, j, :n] = tiled_image.tiles
            aspect_ratio_ids[b, j] = ids[tiled_image.arrangement]
            aspect_ratio_mask[b, j, :n] = 1
    return MllamaImageBatch(pixel_values, aspect_ratio_ids, aspect_ratio_mask, num_tiles)
