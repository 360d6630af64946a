"""Llama 3.2 Vision's text decoder as an export-friendly module: Llama layers with gated
cross-attention layers among them (transformers' `MllamaTextModel` + `lm_head`).

Parameter names are the graph names of `mllama_checkpoint` (`model.layers.{i}.cross_attn.q_proj.weight`,
`model.layers.{i}.cross_attn_attn_gate`, ...). Self-attention layers are `export.model.DecoderLayer`
(the `llamaforge::LlamaAttention` op); a cross-attention layer is

    x += tanh(attn_gate) * o_proj(CrossAttention(q_norm(q_proj(norm(x))), k_norm(k_proj(states)), v_proj(states)))
    x += tanh(mlp_gate) * sees_an_image * mlp(norm(x))

with `llamaforge::CrossAttention` (plugins/cross_attention/) and `sees_an_image` transformers'
`full_text_row_masked_out_mask`: 0 for a token whose cross-attention mask allows no tile.

Graph interface (`model.onnx` of a Llama 3.2 Vision engine), beyond the text model's (export/model.py):
  inputs   cross_attention_states [batch, new_image_tokens, hidden]: the vision graph's output at the
             prefill call that brings the images, [batch, 0, hidden] on every later call;
           cross_attention_mask [batch, seq, image_tiles] int64: 1 where the token may see the tile
             (max_images * max_num_tiles tiles, as the processor lays them out);
           past_cross_key.{i} / past_cross_value.{i} [batch, kv_heads, image_tokens, head_dim] for each
             cross-attention layer i (in place of past_key.{i} / past_value.{i})
  outputs  present_cross_key.{i} / present_cross_value.{i}: the cache with the new image keys written.
A text-only sequence (transformers skips the cross-attention layers when there is no image) is run
with one tile of zero image states that no token may see: the attention then averages zero values
(exactly 0) and `sees_an_image` masks the MLP, so these layers add exactly nothing. (Zero image
tokens would express the same, but ONNX Runtime's buffer reuse fails on the empty tensors.)
"""

from __future__ import annotations

import torch
from torch import nn

from llamaforge.export.config import ModelConfig
from llamaforge.export.model import MLP, DecoderLayer, RMSNorm
from llamaforge.export.vision_config import MLLAMA_EXTRA_EMBEDDINGS, VisionConfig
from llamaforge.plugins.cross_attention.schema import CrossAttentionAttrs
from llamaforge.plugins.cross_attention.torch_op import cross_attention


class CrossAttention(nn.Module):
    def __init__(self, config: ModelConfig, vision: VisionConfig) -> None:
        super().__init__()
        self.attrs = CrossAttentionAttrs(config.num_heads, config.num_kv_heads, config.head_dim, vision.num_patches)
        self.q_proj = nn.Linear(config.hidden_size, config.q_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_size, bias=False)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def forward(self, x: torch.Tensor, states: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.attrs
        batch, seq, _ = x.shape
        new = states.shape[1]
        q = self.q_norm(self.q_proj(x).view(batch, seq, a.num_heads, a.head_dim)).reshape(batch, seq, -1)
        k = self.k_norm(self.k_proj(states).view(batch, new, a.num_kv_heads, a.head_dim)).reshape(batch, new, -1)
        out, present_key, present_value = cross_attention(q, k, self.v_proj(states), past_key, past_value, mask, a)
        return self.o_proj(out), present_key, present_value


class CrossAttentionDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, vision: VisionConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.cross_attn = CrossAttention(config, vision)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, states: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, present_key, present_value = self.cross_attn(self.input_layernorm(x), states, past_key, past_value, mask)
        x = x + self.cross_attn_attn_gate.tanh() * h
        sees_an_image = ((mask == 1).sum(dim=-1, keepdim=True) > 0).to(x.dtype)
        x = x + self.cross_attn_mlp_gate.tanh() * (sees_an_image * self.mlp(self.post_attention_layernorm(x)))
        return x, present_key, present_value


class TextBody(nn.Module):
    def __init__(self, config: ModelConfig, vision: VisionConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size + MLLAMA_EXTRA_EMBEDDINGS, config.hidden_size)
        self.layers = nn.ModuleList(
            CrossAttentionDecoderLayer(config, vision) if i in vision.cross_attention_layers else DecoderLayer(config, i)
            for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


class MllamaTextDecoder(nn.Module):
    def __init__(self, config: ModelConfig, vision: VisionConfig) -> None:
        super().__init__()
        self.config, self.vision = config, vision
        self.model = TextBody(config, vision)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, past_lengths: torch.Tensor, logits_index: torch.Tensor,
                cross_attention_states: torch.Tensor, cross_attention_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.model.embed_tokens(input_ids)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.layers):
            if i in self.vision.cross_attention_layers:
                x, key, value = layer(x, cross_attention_states, past[2 * i], past[2 * i + 1], cross_attention_mask)
            else:
                x, key, value = layer(x, past[2 * i], past[2 * i + 1], past_lengths)
            presents += [key, value]
        x = torch.gather(x, 1, logits_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return (self.lm_head(self.model.norm(x)), *presents)


def cache_names(vision: VisionConfig, num_layers: int, prefix: str) -> list[str]:
    """`{prefix}_key.{i}`, `{prefix}_value.{i}` per layer, `{prefix}_cross_...` for cross-attention layers."""
    names = []
    for i in range(num_layers):
        kind = f"{prefix}_cross" if i in vision.cross_attention_layers else prefix
        names += [f"{kind}_key.{i}", f"{kind}_value.{i}"]
    return names


def input_names(config: ModelConfig, vision: VisionConfig) -> list[str]:
    return ["input_ids", "past_lengths", "logits_index", "cross_attention_states", "cross_attention_mask",
            *cache_names(vision, config.num_layers, "past")]


def output_names(config: ModelConfig, vision: VisionConfig) -> list[str]:
    return ["logits", *cache_names(vision, config.num_layers, "present")]
