"""Llama 3.2 Vision's image side as an export-friendly module: the vision encoder and the projector.

Module and parameter names follow transformers' `MllamaVisionModel` and the projector of
`MllamaModel`, under the names the published checkpoints store them (`vision_model.*`,
`multi_modal_projector.*`), so checkpoint tensors bind to graph initializers by name.

What it computes, per image (`VisionConfig` holds the numbers):

    tiles [T, 3, S, S] -> patch convolution -> + gated pre-tile embedding (per aspect ratio and tile)
    -> class token -> + gated position embedding (shared, and per aspect ratio and tile) -> LayerNorm
    -> padded to a multiple of 8 positions per tile -> local encoder (per tile: attention does not
    cross tiles only because of how transformers builds its mask, see `aspect_ratio_attention_mask`)
    -> LayerNorm -> + gated post-tile embedding -> gated global encoder over all tiles of the image
    -> final state | the local encoder's `intermediate_layers_indices` outputs (interleaved)
    -> projector (linear with bias) to the text hidden size.

Graph interface (`vision.onnx` in the engine directory):
  inputs   pixel_values [batch, max_images, max_num_tiles, 3, S, S] float32 (cast to the encoder's precision inside),
           aspect_ratio_ids [batch, max_images] int64, aspect_ratio_mask [batch, max_images, max_num_tiles] int64
  output   cross_attention_states (the encoder's precision) [batch, max_images * max_num_tiles * num_patches, text_hidden]: the
           projected states in transformers' memory order (it hands the text model
           [batch * max_images * max_num_tiles, num_patches, text_hidden], which its cross-attention
           views as [batch, -1, ...]), so row b holds exactly the keys' source states of prompt b.

Attention here is plain multi-head attention written with standard ops, not the
`llamaforge::LlamaAttention` plugin op: that op's contract is a causal, RoPE-rotated, GQA attention
over a per-row KV cache, and the encoder has none of these (bidirectional, no positions, no cache,
an additive mask). Standard MatMul/Softmax lowers to every backend as is (ONNX Runtime fuses it,
TensorRT recognises the pattern), so a plugin would add a seam and buy nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.export.vision_config import VisionConfig

INPUT_NAMES = ["pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"]
OUTPUT_NAMES = ["cross_attention_states"]
PATCH_ALIGNMENT = 8  # transformers pads each tile's positions to a multiple of 8


def padded_patches(vision: VisionConfig) -> int:
    return vision.num_patches + (-vision.num_patches) % PATCH_ALIGNMENT


def aspect_ratio_attention_mask(aspect_ratio_mask: torch.Tensor, vision: VisionConfig,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' `_prepare_aspect_ratio_attention_mask`, [images, 1, T*P, T*P] in `dtype` (the encoder's).

    A position is padding when its tile is (aspect_ratio_mask 0) or it is one of the alignment
    positions; the additive mask is `dtype`'s minimum where *both* the query and the key are padding
    and 0 elsewhere. So real positions also attend to padding ones: that is transformers' (and the
    published weights') behaviour, reproduced as is. (There is always alignment padding: a tile has
    n² + 1 positions, never a multiple of 8, so transformers' `[..., -pad:]` slice is never `-0:`.)
    """
    images, tiles = aspect_ratio_mask.shape
    target = padded_patches(vision)
    real_position = torch.arange(target, device=aspect_ratio_mask.device) < vision.num_patches
    real = aspect_ratio_mask.to(dtype)[:, :, None] * real_position.to(dtype)  # [I, T, P]
    padding = (1.0 - real).reshape(images, tiles * target, 1)
    return (padding @ padding.transpose(-1, -2) * torch.finfo(dtype).min).unsqueeze(1)


class VisionAttention(nn.Module):
    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.num_heads = vision.num_heads
        self.head_dim = vision.hidden_size // vision.num_heads
        self.q_proj = nn.Linear(vision.hidden_size, vision.hidden_size, bias=False)
        self.k_proj = nn.Linear(vision.hidden_size, vision.hidden_size, bias=False)
        self.v_proj = nn.Linear(vision.hidden_size, vision.hidden_size, bias=False)
        self.o_proj = nn.Linear(vision.hidden_size, vision.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5 + mask
        out = scores.softmax(dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class VisionMLP(nn.Module):
    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision.hidden_size, vision.intermediate_size)
        self.fc2 = nn.Linear(vision.intermediate_size, vision.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU: the vision config's hidden_act "gelu"


class VisionEncoderLayer(nn.Module):
    def __init__(self, vision: VisionConfig, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        self.self_attn = VisionAttention(vision)
        self.mlp = VisionMLP(vision)
        self.input_layernorm = nn.LayerNorm(vision.hidden_size, eps=vision.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(vision.hidden_size, eps=vision.norm_eps)
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * h if self.gated else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * h if self.gated else h)


class VisionEncoder(nn.Module):
    def __init__(self, vision: VisionConfig, num_layers: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(vision, gated) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output, in order (the last is the encoder's)."""
        states = []
        for layer in self.layers:
            x = layer(x, mask)
            states.append(x)
        return states


class AspectRatioEmbedding(nn.Module):
    """One vector per (aspect ratio id, tile), added to every position of the tile through a tanh gate."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.tiles, self.hidden = vision.max_num_tiles, vision.hidden_size
        self.embedding = nn.Embedding(vision.num_aspect_ratio_ids, vision.max_num_tiles * vision.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x [images, tiles, positions, hidden]; aspect_ratio_ids [images, 1]."""
        embedding = self.embedding(aspect_ratio_ids).reshape(-1, self.tiles, 1, self.hidden)
        return x + embedding * self.gate.tanh()


class PositionEmbedding(nn.Module):
    """A position table shared by all tiles weighted by 1 - tanh(gate), plus one table per
    (aspect ratio id, tile) weighted by tanh(gate)."""

    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.tiles, self.positions, self.hidden = vision.max_num_tiles, vision.num_patches, vision.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(vision.num_patches, vision.hidden_size))
        self.tile_embedding = nn.Embedding(vision.num_aspect_ratio_ids,
                                           vision.max_num_tiles * vision.num_patches * vision.hidden_size)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        gate = self.gate.tanh()
        x = x + ((1 - gate) * self.embedding).view(1, 1, self.positions, self.hidden)
        tile = self.tile_embedding(aspect_ratio_ids).reshape(-1, self.tiles, self.positions, self.hidden)
        return x + gate * tile


class VisionModel(nn.Module):
    def __init__(self, vision: VisionConfig) -> None:
        super().__init__()
        self.vision = vision
        v = vision.hidden_size
        self.patch_embedding = nn.Conv2d(vision.num_channels, v, kernel_size=vision.patch_size,
                                         stride=vision.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(v))
        self.gated_positional_embedding = PositionEmbedding(vision)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(vision)
        self.post_tile_positional_embedding = AspectRatioEmbedding(vision)
        # transformers builds these two with LayerNorm's default eps, not the config's norm_eps.
        self.layernorm_pre = nn.LayerNorm(v)
        self.layernorm_post = nn.LayerNorm(v)
        self.transformer = VisionEncoder(vision, vision.num_layers, gated=False)
        self.global_transformer = VisionEncoder(vision, vision.num_global_layers, gated=True)

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """[batch, max_images, tiles, positions, vision_output_dim] (positions without the alignment)."""
        cfg = self.vision
        batch, max_images, tiles, channels, height, width = pixel_values.shape
        images = batch * max_images
        dim, positions, padded = cfg.hidden_size, cfg.num_patches, padded_patches(cfg)
        ids = aspect_ratio_ids.reshape(images, 1)

        x = self.patch_embedding(pixel_values.reshape(images * tiles, channels, height, width))
        x = x.flatten(2).transpose(1, 2)  # [images * tiles, patches, dim]
        x = self.pre_tile_positional_embedding(x.reshape(images, tiles, positions - 1, dim), ids)
        x = x.reshape(images * tiles, positions - 1, dim)
        x = torch.cat([self.class_embedding.expand(images * tiles, 1, dim), x], dim=1)
        x = self.gated_positional_embedding(x.reshape(images, tiles, positions, dim), ids)
        x = F.pad(self.layernorm_pre(x), (0, 0, 0, padded - positions))
        mask = aspect_ratio_attention_mask(aspect_ratio_mask.reshape(images, tiles), cfg, x.dtype)

        local = self.transformer(x.reshape(images, tiles * padded, dim), mask)
        x = self.layernorm_post(local[-1]).reshape(images, tiles, padded, dim)
        x = self.post_tile_positional_embedding(x, ids).reshape(images, tiles * padded, dim)
        x = self.global_transformer(x, mask)[-1]
        x = x.reshape(images, tiles, padded, dim)[:, :, :positions]
        # transformers stacks the chosen layers on a new last axis: features interleave (dim-major).
        chosen = torch.stack([local[i] for i in cfg.intermediate_layers_indices], dim=-1)
        chosen = chosen.reshape(images, tiles, padded, -1)[:, :, :positions]
        out = torch.cat([x, chosen], dim=-1)
        return out.reshape(batch, max_images, tiles, positions, cfg.vision_output_dim)


class VisionGraph(nn.Module):
    """What `vision.onnx` computes: the encoder and the projector (see the module docstring)."""

    def __init__(self, vision: VisionConfig, text_hidden_size: int) -> None:
        super().__init__()
        self.vision_model = VisionModel(vision)
        self.multi_modal_projector = nn.Linear(vision.vision_output_dim, text_hidden_size)

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        # pixel_values stay float32 at the interface (the runtime's preprocessing output) whatever the
        # encoder's precision; the cast is the graph's first node, as TensorRT-LLM casts them to the model dtype.
        pixel_values = pixel_values.to(self.multi_modal_projector.weight.dtype)
        states = self.multi_modal_projector(self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask))
        return states.reshape(pixel_values.shape[0], -1, states.shape[-1])


def vision_tensor_shapes(vision: VisionConfig, text_hidden_size: int) -> dict[str, tuple[int, ...]]:
    """Every weight of the image side under its checkpoint name, with its shape (from the module itself)."""
    with torch.device("meta"):
        graph = VisionGraph(vision, text_hidden_size)
    return {name: tuple(p.shape) for name, p in graph.named_parameters()}
