"""Llama 3.2 Vision image preprocessing (runtime/core/mllama_image.py) against transformers'
MllamaImageProcessor (its Pillow backend, configured as the published preprocessor_config.json) as
the oracle, and its refusals of bad input."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from llamaforge.runtime.core.mllama_image import (
    CLIP_MEAN,
    CLIP_STD,
    ImageInput,
    MllamaImageConfig,
    choose_tile_arrangement,
    decode_image,
    fit_to_canvas,
    preprocess_images,
    tile_arrangements,
)
from llamaforge.runtime.core.requests import RequestError

pil_mllama = pytest.importorskip("transformers.models.mllama.image_processing_pil_mllama")

# preprocessor_config.json of meta-llama/Llama-3.2-11B-Vision-Instruct (and both 90B releases).
PUBLISHED_PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_mean": list(CLIP_MEAN), "image_processor_type": "MllamaImageProcessor", "image_std": list(CLIP_STD),
    "max_image_tiles": 4, "resample": 2, "rescale_factor": 0.00392156862745098, "size": {"height": 560, "width": 560},
}
FIELD = "messages[0].content[1].image_url"


@pytest.fixture(scope="module")
def oracle() -> Any:
    keys = ("do_convert_rgb", "do_normalize", "do_pad", "do_rescale", "do_resize", "image_mean", "image_std",
            "max_image_tiles", "resample", "rescale_factor", "size")
    return pil_mllama.MllamaImageProcessorPil(**{k: PUBLISHED_PREPROCESSOR[k] for k in keys})


def encoded(image: Image.Image, fmt: str, **save_args: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save_args)
    return out.getvalue()


def random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    """Smooth gradients plus noise, so resampling has real structure to get wrong."""
    rng = np.random.default_rng(seed)
    bands = len(Image.new(mode, (1, 1)).getbands())
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 255 / max(width - 1, 1) + y * 255 / max(height - 1, 1)) / 2
    planes = [np.clip(base * (i + 1) / bands + rng.normal(0, 40, base.shape), 0, 255) for i in range(bands)]
    array = np.stack(planes, axis=-1).astype(np.uint8)
    return Image.fromarray(array[..., 0] if bands == 1 else array, mode=mode)


def palette_gif_with_transparency(width: int, height: int) -> bytes:
    image = random_image("RGB", width, height, seed=7).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encoded(image, "GIF", transparency=3)


# (label, encoded bytes): the modes and odd sizes (width x height) the brief names, as PNG and JPEG.
CASES = {
    "rgb-png-37x1013": encoded(random_image("RGB", 37, 1013, 1), "PNG"),
    "rgba-png-1000x300": encoded(random_image("RGBA", 1000, 300, 2), "PNG"),
    "gray-png-560x560": encoded(random_image("L", 560, 560, 3), "PNG"),
    "rgb-jpeg-2000x1500": encoded(random_image("RGB", 2000, 1500, 4), "JPEG", quality=90),
    "gray-jpeg-1x1": encoded(random_image("L", 1, 1, 5), "JPEG"),
    "rgba-png-1x1": encoded(random_image("RGBA", 1, 1, 6), "PNG"),
    "palette-gif-transparent-123x77": palette_gif_with_transparency(123, 77),
}


def assert_matches_oracle(prompts: list[list[bytes]], oracle: Any, config: MllamaImageConfig) -> None:
    ours = preprocess_images([[ImageInput(f"p{b}.i{j}", d) for j, d in enumerate(p)] for b, p in enumerate(prompts)],
                             config)
    expected = oracle(images=[[Image.open(io.BytesIO(d)) for d in p] for p in prompts], return_tensors="np")
    for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        got, want = getattr(ours, name), expected[name]
        assert (got.shape, got.dtype) == (want.shape, want.dtype), name
    np.testing.assert_allclose(ours.pixel_values, expected["pixel_values"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ours.aspect_ratio_ids, expected["aspect_ratio_ids"])
    np.testing.assert_array_equal(ours.aspect_ratio_mask, expected["aspect_ratio_mask"])
    assert ours.num_tiles == expected["num_tiles"]


@pytest.mark.parametrize("label", list(CASES))
def test_one_image_matches_transformers(label: str, oracle: Any) -> None:
    assert_matches_oracle([[CASES[label]]], oracle, MllamaImageConfig())


def test_batch_with_padded_image_slots_matches_transformers(oracle: Any) -> None:
    """Prompts with different image counts: missing images and tiles are zeros, their ids 0, and the
    first tile of an empty slot still marked, as transformers does."""
    prompts = [[CASES["rgb-png-37x1013"], CASES["rgba-png-1000x300"]], [CASES["gray-jpeg-1x1"]]]
    assert_matches_oracle(prompts, oracle, MllamaImageConfig(max_images=2))


def test_config_from_the_published_preprocessor_config() -> None:
    assert MllamaImageConfig.from_preprocessor_config(PUBLISHED_PREPROCESSOR) == MllamaImageConfig()
    base_11b = MllamaImageConfig.from_preprocessor_config(PUBLISHED_PREPROCESSOR | {"size": {"height": 448, "width": 448}})
    assert base_11b.tile_size == 448
    with pytest.raises(ValueError, match="resample"):
        MllamaImageConfig.from_preprocessor_config(PUBLISHED_PREPROCESSOR | {"resample": 3})
    with pytest.raises(ValueError, match="do_pad"):
        MllamaImageConfig.from_preprocessor_config(PUBLISHED_PREPROCESSOR | {"do_pad": False})


def test_tile_arrangement_and_resize_size_match_transformers() -> None:
    """Over many image sizes (including 1 pixel and past the 4-tile canvas), the arrangement and the
    size to resize to are transformers' own."""
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 3000), (3000, 1), (560, 560), (561, 559), (1120, 1120), (2240, 560)]
    sizes += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(300)]
    for max_tiles, tile in ((4, 560), (4, 448), (6, 224)):
        assert list(tile_arrangements(max_tiles)) == pil_mllama.get_all_supported_aspect_ratios(max_tiles)
        for h, w in sizes:
            canvas_h, canvas_w = (int(v) for v in pil_mllama.get_optimal_tiled_canvas(h, w, max_tiles, tile))
            assert choose_tile_arrangement(h, w, max_tiles, tile) == (canvas_h // tile, canvas_w // tile), (h, w)
            want = pil_mllama.get_image_size_fit_to_canvas(h, w, canvas_h, canvas_w, tile)
            assert fit_to_canvas(h, w, canvas_h, canvas_w, tile) == tuple(int(v) for v in want), (h, w)


# -- bad input ---------------------------------------------------------------------------------------


def refusal(data: bytes, **config: int) -> RequestError:
    with pytest.raises(RequestError) as ei:
        preprocess_images([[ImageInput(FIELD, data)]], MllamaImageConfig(**config))
    assert ei.value.field == FIELD and str(ei.value).startswith(FIELD + ": ")
    return ei.value


def png_header_claiming(width: int, height: int) -> bytes:
    """A real 8x8 PNG whose header claims another size: opening it reads only the header."""
    data = bytearray(encoded(random_image("L", 8, 8, 0), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def test_not_an_image() -> None:
    assert "not an image" in str(refusal(b"GIF89 is what this is not; plain text"))
    assert "empty" in str(refusal(b""))
    # Pillow reads TIFF, but a request may not carry it (only PNG, JPEG, WEBP, GIF, BMP).
    assert "not an image" in str(refusal(encoded(random_image("RGB", 4, 4, 0), "TIFF")))


@pytest.mark.parametrize("label", ["rgb-png-37x1013", "rgb-jpeg-2000x1500"])
def test_truncated_image(label: str) -> None:
    data = CASES[label]
    assert "truncated" in str(refusal(data[: len(data) // 2]))


def test_pixel_limit_is_checked_per_call_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit is the caller's, not Pillow's process-wide one (switched off here), and it holds on
    the header's size: the header-only bomb is refused for its size, not found truncated."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    error = refusal(png_header_claiming(8000, 8000), max_pixels=50_000_000)
    assert "8000x8000" in str(error) and "limit of 50000000" in str(error)
    square = encoded(random_image("RGB", 100, 100, 0), "PNG")
    assert "limit of 9999" in str(refusal(square, max_pixels=9_999))
    assert preprocess_images([[ImageInput(FIELD, square)]], MllamaImageConfig(max_pixels=10_000)).num_tiles == [[1]]
    assert decode_image(square, FIELD, max_pixels=10_000).size == (100, 100)


def test_pillow_bomb_error_is_a_request_error() -> None:
    """Past Pillow's own hard limit (twice MAX_IMAGE_PIXELS) Pillow refuses first; still a RequestError."""
    assert "pixels" in str(refusal(png_header_claiming(30_000, 30_000), max_pixels=10**12))


def test_too_many_images_names_the_first_extra_one() -> None:
    """Counted before anything is decoded: the images here are not even images."""
    images = [ImageInput(f"messages[0].content[{i}].image_url", b"not decoded") for i in range(3)]
    with pytest.raises(RequestError) as ei:
        preprocess_images([images[:1], images], MllamaImageConfig(max_images=1))
    assert ei.value.field == "messages[0].content[1].image_url" and "too many images" in str(ei.value)


def test_unsupported_mode() -> None:
    sixteen_bit = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    assert "unsupported image mode 'I;16'" in str(refusal(encoded(sixteen_bit, "PNG")))


def test_no_image_at_all_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="no prompt has an image"):
        preprocess_images([[], []])
