"""Llama 3.2 Vision (transformers' `MllamaForConditionalGeneration`): the numbers a text `ModelConfig`
cannot hold, and the parameter count of the whole model.

A Llama 3.2 Vision model has three parts:

* a vision encoder: each image is cut into up to `max_num_tiles` tiles of `image_size` pixels, each
  tile into `patch_size` patches; a local ViT (`num_layers`) runs per tile, then a gated global ViT
  (`num_global_layers`) over all tiles; the outputs of the layers in `intermediate_layers_indices`
  are concatenated with the final state (`vision_output_dim` = hidden * (len(indices) + 1));
* a projector: one linear layer (with bias) from `vision_output_dim` to the text hidden size;
* a text decoder: a Llama 3.1 decoder in which the layers listed in `cross_attention_layers` are
  gated cross-attention layers (onto the projected image states) instead of self-attention layers.

The text decoder's shape stays in the variant's `ModelConfig`, whose `num_layers` counts every
decoder layer, cross-attention ones included, as HF's `text_config.num_hidden_layers` does. That
config alone describes a model that does not exist (all layers self-attention), which is why the
single-graph exporter refuses these variants (`variants.require_exportable`); their graphs are
export/mllama_vision.py and export/mllama_text.py, built by llamaforge/build/mllama.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llamaforge.export.config import ConfigError, ModelConfig

__all__ = ["VisionConfig", "MLLAMA_EXTRA_EMBEDDINGS", "mllama_num_parameters", "text_decoder_parameters"]

# HF's MllamaTextModel embeds `vocab_size + 8` rows: the <|image|> token (id 128256) and 7 reserved
# rows, which transformers' converter appends to the token embeddings from Meta's `learnable_embedding`.
# The output head keeps `vocab_size` rows.
MLLAMA_EXTRA_EMBEDDINGS = 8


@dataclass(frozen=True)
class VisionConfig:
    """The vision encoder (HF `vision_config`, with HF's field names noted where ours differ) and
    the two text-side facts that only a multimodal model has."""

    image_size: int  # the tile's side in pixels
    patch_size: int
    hidden_size: int
    num_layers: int  # the local (per-tile) encoder: vision_config.num_hidden_layers
    num_global_layers: int  # the gated encoder over all tiles of an image
    num_heads: int  # vision_config.attention_heads
    intermediate_size: int
    vision_output_dim: int
    max_num_tiles: int
    intermediate_layers_indices: tuple[int, ...]
    supported_aspect_ratios: tuple[tuple[int, int], ...]  # (tile rows, tile columns)
    cross_attention_layers: tuple[int, ...]  # text_config.cross_attention_layers
    num_channels: int = 3
    norm_eps: float = 1e-5
    image_token_index: int = 128256

    def __post_init__(self) -> None:
        object.__setattr__(self, "intermediate_layers_indices", tuple(int(i) for i in self.intermediate_layers_indices))
        object.__setattr__(self, "cross_attention_layers", tuple(int(i) for i in self.cross_attention_layers))
        object.__setattr__(self, "supported_aspect_ratios",
                           tuple((int(r), int(c)) for r, c in self.supported_aspect_ratios))
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision: image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"vision: hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        bad = [i for i in self.intermediate_layers_indices if not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"vision: intermediate_layers_indices {bad} are not layers of a "
                              f"{self.num_layers}-layer encoder")
        # The encoder concatenates the chosen intermediate states with its final state.
        want = self.hidden_size * (len(self.intermediate_layers_indices) + 1)
        if self.vision_output_dim != want:
            raise ConfigError(f"vision: vision_output_dim={self.vision_output_dim}, but hidden_size * "
                              f"(len(intermediate_layers_indices) + 1) = {want}")
        too_big = [a for a in self.supported_aspect_ratios if a[0] * a[1] > self.max_num_tiles]
        if too_big:
            raise ConfigError(f"vision: supported_aspect_ratios {too_big} need more than max_num_tiles="
                              f"{self.max_num_tiles} tiles")

    # -- derived sizes -----------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        """Positions per tile: its patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def num_aspect_ratio_ids(self) -> int:
        """Rows of the tile-position embeddings: one per supported arrangement, and id 0 for padding."""
        return len(self.supported_aspect_ratios) + 1

    def check_text_decoder(self, text: ModelConfig) -> None:
        """The cross-attention layers must be distinct layers of `text`."""
        layers = self.cross_attention_layers
        bad = [i for i in layers if not 0 <= i < text.num_layers]
        if bad or len(set(layers)) != len(layers):
            raise ConfigError(f"{text.name}: cross_attention_layers {list(layers)} are not distinct layers of a "
                              f"{text.num_layers}-layer decoder")

    # -- parameter counts ----------------------------------------------------------------------
    def encoder_parameters(self) -> int:
        """Every weight of HF's `MllamaVisionModel`: convolution without bias, LayerNorms and MLPs
        with biases, attention projections without, a tanh gate per gated embedding or layer."""
        v, i = self.hidden_size, self.intermediate_size
        patch_embedding = v * self.num_channels * self.patch_size**2
        class_embedding = v
        positions = self.num_patches * v
        # The gated positional embedding: one position table shared by all tiles, plus one per
        # (aspect ratio id, tile) pair, and its gate.
        gated_positional = positions + self.num_aspect_ratio_ids * self.max_num_tiles * positions + 1
        # Pre- and post-encoder tile embeddings: a vector per (aspect ratio id, tile), and a gate.
        tile_positional = 2 * (self.num_aspect_ratio_ids * self.max_num_tiles * v + 1)
        pre_and_post_layernorms = 2 * 2 * v
        layer = 4 * v * v + (v * i + i) + (i * v + v) + 2 * 2 * v
        global_layer = layer + 2  # attention and MLP gates
        return (patch_embedding + class_embedding + gated_positional + tile_positional + pre_and_post_layernorms
                + self.num_layers * layer + self.num_global_layers * global_layer)

    def projector_parameters(self, text_hidden_size: int) -> int:
        return self.vision_output_dim * text_hidden_size + text_hidden_size

    # -- (de)serialisation -----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> VisionConfig:
        """From an HF `MllamaConfig` dict (its `vision_config` and `text_config`)."""
        vision, text = hf.get("vision_config"), hf.get("text_config")
        if not isinstance(vision, dict) or not isinstance(text, dict):
            raise ConfigError(f"{source}: an mllama config needs 'vision_config' and 'text_config' objects")
        try:
            return cls(
                image_size=int(vision["image_size"]),
                patch_size=int(vision["patch_size"]),
                hidden_size=int(vision["hidden_size"]),
                num_layers=int(vision["num_hidden_layers"]),
                num_global_layers=int(vision["num_global_layers"]),
                num_heads=int(vision.get("attention_heads") or vision["num_attention_heads"]),
                intermediate_size=int(vision["intermediate_size"]),
                vision_output_dim=int(vision["vision_output_dim"]),
                max_num_tiles=int(vision["max_num_tiles"]),
                intermediate_layers_indices=tuple(vision["intermediate_layers_indices"]),
                supported_aspect_ratios=tuple(tuple(a) for a in vision["supported_aspect_ratios"]),
                cross_attention_layers=tuple(text["cross_attention_layers"]),
                num_channels=int(vision.get("num_channels", 3)),
                norm_eps=float(vision.get("norm_eps", 1e-5)),
                image_token_index=int(hf.get("image_token_index", 128256)),
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing field {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """transformers' `MllamaVisionConfig` kwargs (tests build the oracle model from them)."""
        return dict(
            image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
            hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_global_layers=self.num_global_layers, attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size, vision_output_dim=self.vision_output_dim,
            max_num_tiles=self.max_num_tiles, intermediate_layers_indices=list(self.intermediate_layers_indices),
            supported_aspect_ratios=[list(a) for a in self.supported_aspect_ratios], norm_eps=self.norm_eps,
        )

    def replace(self, **changes: Any) -> VisionConfig:
        return dataclasses.replace(self, **changes)


def text_decoder_parameters(text: ModelConfig, vision: VisionConfig) -> int:
    """HF's `MllamaForCausalLM`: self-attention layers as in Llama; a cross-attention layer has the
    same projections (keys and values come from the projected image states, already of the text
    hidden size), RMSNorms on queries and keys (head_dim each) and tanh gates on its attention and
    MLP outputs. The token embedding has `MLLAMA_EXTRA_EMBEDDINGS` rows more than the output head."""
    vision.check_text_decoder(text)
    if text.is_moe or text.tie_word_embeddings:
        raise ConfigError(f"{text.name}: a Llama 3.2 Vision text decoder is dense with an untied output head")
    h = text.hidden_size
    attention = h * text.q_size + 2 * h * text.kv_size + text.q_size * h
    mlp = 3 * h * text.intermediate_size
    self_layer = attention + mlp + 2 * h
    cross_layer = self_layer + 2 * text.head_dim + 2
    num_cross = len(vision.cross_attention_layers)
    layers = (text.num_layers - num_cross) * self_layer + num_cross * cross_layer
    embedding = (text.vocab_size + MLLAMA_EXTRA_EMBEDDINGS) * h
    return embedding + layers + h + text.vocab_size * h


def mllama_num_parameters(text: ModelConfig, vision: VisionConfig) -> int:
    """Vision encoder + projector + text decoder: the model's every weight."""
    return (vision.encoder_parameters() + vision.projector_parameters(text.hidden_size)
            + text_decoder_parameters(text, vision))
