"""An export-friendly LLaMA decoder: plain nn.Modules driven by `ModelConfig`.

Parameter names match the HF checkpoint layout (`model.layers.0.self_attn.q_proj.weight`, ...) so
checkpoint tensors bind to graph initializers by name. Everything RoPE/cache/mask related lives in
the attention plugin op, so the traced graph is: embedding, then per layer RMSNorm -> Q/K/V
projections -> `LlamaAttention` -> output projection -> RMSNorm -> SwiGLU MLP, then the LM head.
Llama 4 layers differ in their attention attributes (NoPE, QK norm, chunking) and, on MoE layers,
in the FFN: one `llamaforge::MoE` node plus a shared-expert MLP (`export/llama4.py`).

A tensor-parallel rank (`shard`, export/tensor_parallel.py) is the same decoder with its share of
the heads, FFN columns and vocabulary, and a `llamaforge::AllReduce` after each row-parallel
projection (o_proj, down_proj; a MoE layer's experts and shared expert together).

Graph interface (names are part of the engine manifest):
  inputs   input_ids [batch, seq] int64, past_lengths [batch] int32,
           logits_index [batch, num_logits] int64: the positions (0..seq-1) whose logits are wanted,
           past_key.{i} / past_value.{i} [batch, kv_heads, capacity, head_dim] per layer
  outputs  logits [batch, num_logits, vocab], present_key.{i} / present_value.{i} (same shape as past)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamaforge.export.config import ModelConfig
from llamaforge.export.llama4 import MoEFeedForward
from llamaforge.export.tensor_parallel import RankShard
from llamaforge.plugins.all_reduce.schema import AllReduceAttrs
from llamaforge.plugins.all_reduce.torch_op import all_reduce
from llamaforge.plugins.attention.schema import AttentionAttrs
from llamaforge.plugins.attention.torch_op import attention


def reduce_over_ranks(x: torch.Tensor, shard: RankShard | None) -> torch.Tensor:
    """The all-reduce after a row-parallel projection; nothing on a single device."""
    return x if shard is None or shard.size == 1 else all_reduce(x, AllReduceAttrs(shard.size))


def attention_attrs(config: ModelConfig, layer: int = 0, shard: RankShard | None = None) -> AttentionAttrs:
    rs = config.rope_scaling
    rope = config.layer_uses_rope(layer)
    return AttentionAttrs(
        num_heads=shard.q_heads if shard else config.num_heads,
        num_kv_heads=shard.kv_heads if shard else config.num_kv_heads,
        head_dim=config.head_dim,
        rope_theta=config.rope_theta,
        rope_scaling_type="llama3" if rs else "none",
        rope_scaling_factor=rs.factor if rs else 1.0,
        rope_low_freq_factor=rs.low_freq_factor if rs else 1.0,
        rope_high_freq_factor=rs.high_freq_factor if rs else 1.0,
        rope_original_max_positions=rs.original_max_position_embeddings if rs else 0,
        rope_interleaved=int(config.rope_interleaved),
        # Llama 4: NoPE layers get the query temperature; RoPE layers QK norm and chunked attention.
        use_rope=int(rope),
        qk_norm=int(config.use_qk_norm and rope),
        qk_norm_eps=config.norm_eps,
        attn_chunk_size=config.attention_chunk_size if rope else 0,
        temperature_tuning=int(config.attn_temperature_tuning and not rope),
        temperature_floor=config.floor_scale,
        temperature_scale=config.attn_scale,
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 whatever the activation dtype, as the reference implementation does.
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0, shard: RankShard | None = None) -> None:
        super().__init__()
        self.attrs = attention_attrs(config, layer, shard)
        self.shard = shard
        q_size, kv_size = self.attrs.num_heads * config.head_dim, self.attrs.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=False)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                past_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, present_key, present_value = attention(
            self.q_proj(x), self.k_proj(x), self.v_proj(x), past_key, past_value, past_lengths, self.attrs
        )
        return reduce_over_ranks(self.o_proj(out), self.shard), present_key, present_value


class MLP(nn.Module):
    """SwiGLU; on a rank, its share of the columns, then the all-reduce unless `reduce=False` (a MoE
    layer's shared expert, summed with the experts before one all-reduce)."""

    def __init__(self, config: ModelConfig, intermediate_size: int = 0, shard: RankShard | None = None,
                 reduce: bool = True) -> None:
        super().__init__()
        width = (intermediate_size or config.intermediate_size) // (shard.size if shard else 1)
        self.shard = shard if reduce else None
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=False)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_over_ranks(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), self.shard)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0, shard: RankShard | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        self.self_attn = Attention(config, layer, shard)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.norm_eps)
        # The FFN's attribute name is its checkpoint prefix: `mlp` (LLaMA 1-3) or `feed_forward` (Llama 4).
        self.ffn_name = "feed_forward" if config.architecture == "llama4" else "mlp"
        ffn: nn.Module
        if layer in config.moe_layer_indices():
            ffn = MoEFeedForward(config, MLP(config, config.intermediate_size, shard, reduce=False), shard)
        else:
            ffn = MLP(config, config.dense_intermediate_size, shard)
        self.add_module(self.ffn_name, ffn)

    def forward(self, x: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                past_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, present_key, present_value = self.self_attn(self.input_layernorm(x), past_key, past_value, past_lengths)
        x = x + h
        x = x + getattr(self, self.ffn_name)(self.post_attention_layernorm(x))
        return x, present_key, present_value


class Body(nn.Module):
    def __init__(self, config: ModelConfig, shard: RankShard | None = None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # replicated on every rank
        self.layers = nn.ModuleList(DecoderLayer(config, i, shard) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)


class LlamaDecoder(nn.Module):
    def __init__(self, config: ModelConfig, shard: RankShard | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = Body(config, shard)
        # On a rank: the vocabulary rows [start, end), so `logits` is the rank's vocab shard. A tied
        # head is then its own slice of the table (bound by the exporter), not the table itself.
        start, end = shard.vocab_rows() if shard else (0, config.vocab_size)
        self.lm_head = nn.Linear(config.hidden_size, end - start, bias=False)
        if config.tie_word_embeddings and (shard is None or shard.size == 1):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, past_lengths: torch.Tensor, logits_index: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.model.embed_tokens(input_ids)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.model.layers):
            x, present_key, present_value = layer(x, past[2 * i], past[2 * i + 1], past_lengths)
            presents += [present_key, present_value]
        # Only the positions asked for reach the final norm and the LM head (TensorRT-LLM's
        # last_token_ids): a serving step samples from one position per row, and the LM head is a
        # quarter of a prefill's FLOPs at vocab 32000. Scoring a whole text asks for every position.
        x = torch.gather(x, 1, logits_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        logits = self.lm_head(self.model.norm(x))
        return (logits, *presents)


def input_names(config: ModelConfig) -> list[str]:
    names = ["input_ids", "past_lengths", "logits_index"]
    for i in range(config.num_layers):
        names += [f"past_key.{i}", f"past_value.{i}"]
    return names


def output_names(config: ModelConfig) -> list[str]:
    names = ["logits"]
    for i in range(config.num_layers):
        names += [f"present_key.{i}", f"present_value.{i}"]
    return names
