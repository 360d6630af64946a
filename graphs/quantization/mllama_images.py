"""The image side of calibrating a Llama 3.2 Vision text decoder: what its cross-attention layers read.

Calibration must run the text decoder as it runs: its cross-attention layers' k_proj/v_proj read the
projected image states, and their outputs (gated) change every later layer's activations. So each
calibration sequence is paired with an image, encoded by the checkpoint's own vision encoder +
projector (`export/mllama_vision.py`'s module, run in PyTorch with the checkpoint's tensors, one image
at a time), and every token of the sequence sees all of that image's tiles.

The images are generated (`calibration_images`: smooth gradients with rectangles and noise, one per
tile arrangement the model supports, so every aspect ratio id and tile count is seen), then
preprocessed exactly as the serving runtime does (`runtime/core/mllama_image.py`). They are not
photographs: activation ranges measured on them bound what synthetic pictures produce, not what a
deployment's images will; that is the limit of the default (there is no CALIB for images yet).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from llamaforge.export.vision_config import VisionConfig
from llamaforge.graphs.quantization.calibrate import ImageStates, TensorSource
from llamaforge.runtime.core.mllama_image import ImageInput, MllamaImageBatch, MllamaImageConfig, preprocess_images

VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


def calibration_images(vision: VisionConfig, seed: int = 0) -> MllamaImageBatch:
    """One generated PNG per supported tile arrangement, preprocessed as the runtime does: a batch
    of len(supported_aspect_ratios) prompts of one image each."""
    rng = np.random.default_rng(seed)
    prompts = []
    for k, (rows, cols) in enumerate(vision.supported_aspect_ratios):
        height, width = rows * vision.image_size, cols * vision.image_size
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        pixels = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), (x + y) / max(width + height - 2, 1)], -1)
        for _ in range(4):  # rectangles of random colour
            top, left = rng.integers(0, height), rng.integers(0, width)
            pixels[top:top + rng.integers(1, height + 1), left:left + rng.integers(1, width + 1)] = rng.random(3)
        pixels = np.clip(pixels + rng.normal(0, 0.05, pixels.shape), 0, 1)
        buffer = io.BytesIO()
        Image.fromarray((pixels * 255).astype(np.uint8), "RGB").save(buffer, format="PNG")
        prompts.append([ImageInput(f"calibration image {k}", buffer.getvalue())])
    config = MllamaImageConfig(tile_size=vision.image_size, max_image_tiles=vision.max_num_tiles)
    return preprocess_images(prompts, config)


@torch.inference_mode()
def calibration_image_states(ckpt: TensorSource, vision: VisionConfig, text_hidden_size: int,
                             tokens: torch.Tensor) -> ImageStates:
    """The image states and cross-attention mask of each calibration sequence in `tokens` [n, seq]:
    sequence i sees generated image i mod (number of tile arrangements), all of its tiles."""
    from llamaforge.export.mllama_vision import VisionGraph  # torch module; imported where used

    batch = calibration_images(vision)
    with torch.device("meta"):
        encoder = VisionGraph(vision, text_hidden_size).eval()
    weights = {name: ckpt.load(name).float() for name in ckpt.tensor_names() if name.startswith(VISION_PREFIXES)}
    encoded = []
    for k in range(batch.pixel_values.shape[0]):  # one image at a time: the local encoder's scores are large
        inputs = (torch.from_numpy(batch.pixel_values[k:k + 1]), torch.from_numpy(batch.aspect_ratio_ids[k:k + 1]),
                  torch.from_numpy(batch.aspect_ratio_mask[k:k + 1]))
        encoded.append(torch.func.functional_call(encoder, weights, inputs)[0])
    del weights
    n, seq = tokens.shape
    pick = [i % len(encoded) for i in range(n)]
    states = torch.stack([encoded[k] for k in pick])  # [n, max_num_tiles * tokens_per_tile, hidden]
    mask = torch.zeros(n, seq, vision.max_num_tiles, dtype=torch.int64)
    for i, k in enumerate(pick):
        mask[i, :, :batch.num_tiles[k][0]] = 1
    return ImageStates(vision, states, mask)
