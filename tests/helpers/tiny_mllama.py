"""Tiny Llama 3.2 Vision checkpoints for tests (a helper module, not a test file).

    vision, text = tiny_mllama_configs()            # tile 28 (2x2 patches of 14: 5 positions, 8 padded)
    ckpt = make_mllama_checkpoint(tmp / "mllama")   # random MllamaForConditionalGeneration, save_pretrained
    model = load_mllama_oracle(ckpt)                # transformers, fp32, eager attention, eval()

The text decoder is the tiny Llama of `tiny_models` (vocab 640, the tiny byte-level tokenizer) with
layers 1 and 3 of 4 cross-attention layers; `<|image|>` is id 640, the first of the 8 extra
embedding rows, as in the published models (128256). Every gate is drawn at random (transformers
initialises the text gates to 0, which would hide the cross-attention layers entirely).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tiny_models import TINY_VOCAB, _randomized, tiny_config, train_tiny_tokenizer

from llamaforge.export.config import ModelConfig
from llamaforge.export.vision_config import VisionConfig

# All 8 arrangements of at most 4 tiles, in the published order: aspect ratio id = index + 1.
ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


def tiny_mllama_configs() -> tuple[VisionConfig, ModelConfig]:
    vision = VisionConfig(
        image_size=28, patch_size=14, hidden_size=32, num_layers=3, num_global_layers=2, num_heads=4,
        intermediate_size=64, vision_output_dim=32 * 3, max_num_tiles=4, intermediate_layers_indices=(0, 2),
        supported_aspect_ratios=ASPECT_RATIOS, cross_attention_layers=(1, 3), image_token_index=TINY_VOCAB,
    )
    text = tiny_config(num_layers=4, name="tiny-mllama", pad_token_id=0)
    return vision, text


def _hf_config(vision: VisionConfig, text: ModelConfig) -> Any:
    from transformers import MllamaConfig

    text_hf = text.to_hf() | {"cross_attention_layers": list(vision.cross_attention_layers)}
    return MllamaConfig(vision_config=vision.to_hf(), text_config=text_hf,
                        image_token_index=vision.image_token_index)


def make_mllama_checkpoint(dest: str | Path, seed: int = 0, init_std: float = 0.1,
                           chat_template: str | None = None) -> Path:
    """Random-weight `MllamaForConditionalGeneration` (fp32) saved with `save_pretrained` in 2+ shards,
    plus the tiny tokenizer with `<|image|>` added. Weights as `tiny_models.make_hf_checkpoint` draws them (1-D ones, gates
    included, ~ 1 + N(0, 0.1))."""
    from transformers import MllamaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    vision, text = tiny_mllama_configs()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    hf_logging.set_verbosity_error()
    model = _randomized(MllamaForConditionalGeneration(_hf_config(vision, text)), seed, init_std)
    sizes = [t.numel() * t.element_size() for t in model.state_dict().values()]
    model.save_pretrained(dest, max_shard_size=max(max(sizes), sum(sizes) // 3))
    tokenizer = train_tiny_tokenizer(text.vocab_size)
    tokenizer.add_special_tokens(["<|image|>"])  # id 640 = vocab_size, as 128256 in the published tokenizer
    assert tokenizer.token_to_id("<|image|>") == vision.image_token_index
    tokenizer.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": text.max_position_embeddings}
        | ({"chat_template": chat_template} if chat_template is not None else {}), indent=2))
    return dest


def load_mllama_oracle(dest: str | Path) -> Any:
    from transformers import MllamaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = MllamaForConditionalGeneration.from_pretrained(str(dest), dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def image_inputs(tiles: list[list[int]], vision: VisionConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """pixel_values, aspect_ratio_ids, aspect_ratio_mask for a batch whose prompt b has images with
    `tiles[b]` tiles each (padded to the batch's most images), as the processor lays them out: random
    pixels in real tiles, zeros in padding tiles and images, id 0 for a padding image (whose first tile the mask
    still marks, as the processor's does). The tile
    arrangement is the first supported one with that many tiles."""
    gen = torch.Generator().manual_seed(seed)
    batch, max_images, t, s = len(tiles), max(len(p) for p in tiles), vision.max_num_tiles, vision.image_size
    pixel_values = torch.zeros(batch, max_images, t, vision.num_channels, s, s)
    ids = torch.zeros(batch, max_images, dtype=torch.int64)
    mask = torch.zeros(batch, max_images, t, dtype=torch.int64)
    mask[:, :, 0] = 1  # the processor marks the first tile of padding images too
    for b, prompt in enumerate(tiles):
        for i, n in enumerate(prompt):
            pixel_values[b, i, :n] = torch.randn(n, vision.num_channels, s, s, generator=gen)
            ids[b, i] = 1 + [r * c for r, c in vision.supported_aspect_ratios].index(n)
            mask[b, i, :n] = 1
    return {"pixel_values": pixel_values, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask}
