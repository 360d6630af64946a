"""The image inputs of the text model (Llama 3.2 Vision engines), under TensorRT-LLM's multimodal
Triton names (tensorrtllm_backend all_models/multimodal/ensemble/config.pbtxt and its preprocessing
model, which hands them to transformers' processor):

    image_url_input    BYTES [-1]           one URL per image, in prompt order. Here only base64
                                            `data:` URLs (data:image/png;base64,...): the server
                                            fetches nothing, so http(s) URLs are refused.
    image_bytes_input  UINT8 [-1, -1, -1, -1]  decoded pixels, [images, height, width, 3] or
                                            [images, 3, height, width] (RGB), as TRT-LLM takes them.

A request gives at most one of them (TRT-LLM: "You may populate only one of these image inputs").
Each image becomes an `ImageInput` naming its tensor and index (`image_url_input[1]`), which the
engine core preprocesses at submit: a bad image is INVALID_ARGUMENT naming that tensor.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from PIL import Image

from llamaforge.runtime.core.mllama_image import ImageInput
from llamaforge.runtime.core.requests import RequestError
from llamaforge.runtime.serving.openai_protocol import data_url_bytes

__all__ = ["IMAGE_INPUTS", "image_inputs"]

IMAGE_INPUTS = ("image_url_input", "image_bytes_input")


def image_inputs(arrays: Mapping[str, np.ndarray]) -> tuple[ImageInput, ...]:
    """The row's images from its image input tensors (none: ())."""
    given = [name for name in IMAGE_INPUTS if name in arrays]
    if len(given) > 1:
        raise RequestError(given[1], f"give one image input per request, not both {given[0]} and {given[1]}")
    if not given:
        return ()
    name = given[0]
    arr = arrays[name]
    if name == "image_url_input":
        urls = arr.reshape(-1)
        out = []
        for i, url in enumerate(urls):
            field = f"{name}[{i}]"
            raw = url if isinstance(url, bytes) else str(url).encode()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(field, "not UTF-8 text (expected a data: URL)") from None
            out.append(ImageInput(field, data_url_bytes(text, field)))
        return tuple(out)
    return tuple(_pixels(f"{name}[{i}]", image) for i, image in enumerate(_images(name, arr)))


def _images(name: str, arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3:  # one image without the images axis
        arr = arr[None]
    if arr.ndim != 4 or 0 in arr.shape:
        raise RequestError(name, f"expected [images, height, width, 3] or [images, 3, height, width], got {list(arr.shape)}")
    if arr.shape[-1] != 3 and arr.shape[1] == 3:
        arr = arr.transpose(0, 2, 3, 1)  # CHW -> HWC
    if arr.shape[-1] != 3:
        raise RequestError(name, f"expected 3 (RGB) channels first or last, got shape {list(arr.shape)}")
    if arr.dtype != np.uint8 and (arr.min() < 0 or arr.max() > 255):  # another integer type: in range
        raise RequestError(name, "pixel values must be in [0, 255]")
    return arr


def _pixels(field: str, image: np.ndarray) -> ImageInput:
    """Decoded pixels as the PNG the preprocessing decodes (lossless), so every image takes one path."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(out, format="PNG", compress_level=0)
    return ImageInput(field, out.getvalue())
