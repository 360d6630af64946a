"""export/tensor_parallel.py: which slice of every tensor a rank holds, and the models it refuses."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_config, tiny_llama4_config

from llamaforge.export.tensor_parallel import RankShard, ShardingError, check_shardable, vocab_shards


def test_vocab_shards_cover_the_vocabulary_in_order_without_padding() -> None:
    assert vocab_shards(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert vocab_shards(128256, 8)[-1] == (112224, 128256)


@pytest.mark.parametrize("overrides,tp,field", [
    (dict(num_heads=4, num_kv_heads=2), 3, "num_heads=4"),
    (dict(num_heads=12, num_kv_heads=3, hidden_size=96, intermediate_size=96), 4, "num_kv_heads=3"),
    (dict(intermediate_size=129), 2, "intermediate_size=129"),
])
def test_a_model_the_ranks_cannot_split_is_refused_naming_the_field(overrides: dict, tp: int, field: str) -> None:
    with pytest.raises(ShardingError, match=field):
        check_shardable(tiny_config(**overrides), tp)


def test_kv_heads_split_or_replicated_like_tensorrt_llm() -> None:
    config = tiny_config(num_heads=8, num_kv_heads=2)  # head_dim 8, query group of 4
    split = [RankShard(config, 2, r) for r in range(2)]
    assert [(s.q_heads, s.kv_heads, s.kv_rows()) for s in split] == [(4, 1, (0, 8)), (4, 1, (8, 16))]
    replicated = [RankShard(config, 4, r) for r in range(4)]
    # ranks 0, 1 hold query heads 0-3 (KV head 0); ranks 2, 3 query heads 4-7 (KV head 1)
    assert [s.kv_rows() for s in replicated] == [(0, 8), (0, 8), (8, 16), (8, 16)]
    assert all(s.kv_replicated and s.kv_heads == 1 for s in replicated)


def test_each_tensor_is_cut_on_its_megatron_axis() -> None:
    config = tiny_config()  # hidden 64, 4 heads x 16, 2 kv heads, ffn 128, vocab 640
    shard = RankShard(config, 2, 1)
    full = {"model.layers.0.self_attn.q_proj.weight": (64, 64), "model.layers.0.self_attn.o_proj.weight": (64, 64),
            "model.layers.0.mlp.up_proj.weight": (128, 64), "model.layers.0.mlp.down_proj.weight": (64, 128),
            "lm_head.weight": (640, 64), "model.embed_tokens.weight": (640, 64), "model.norm.weight": (64,)}
    tensors = {name: torch.arange(torch.Size(shape).numel()).reshape(shape) for name, shape in full.items()}
    cut = {name: shard.shard_tensor(name, t) for name, t in tensors.items()}
    assert torch.equal(cut["model.layers.0.self_attn.q_proj.weight"], tensors["model.layers.0.self_attn.q_proj.weight"][32:])
    assert torch.equal(cut["model.layers.0.self_attn.o_proj.weight"], tensors["model.layers.0.self_attn.o_proj.weight"][:, 32:])
    assert torch.equal(cut["model.layers.0.mlp.up_proj.weight"], tensors["model.layers.0.mlp.up_proj.weight"][64:])
    assert torch.equal(cut["model.layers.0.mlp.down_proj.weight"], tensors["model.layers.0.mlp.down_proj.weight"][:, 64:])
    assert torch.equal(cut["lm_head.weight"], tensors["lm_head.weight"][320:])
    assert torch.equal(cut["model.embed_tokens.weight"], tensors["model.embed_tokens.weight"])  # replicated
    assert shard.linear_channels("model.layers.0.mlp.down_proj") == ("in", (64, 128))
    assert shard.linear_channels("lm_head") == ("out", (320, 640))


def test_moe_experts_keep_every_expert_with_a_share_of_its_columns() -> None:
    config = tiny_llama4_config()  # 4 experts, intermediate 32
    shard = RankShard(config, 2, 1)
    gate_up = torch.randn(4, 64, 64)  # [E, hidden, gate(32) | up(32)]
    cut = shard.shard_tensor("model.layers.0.feed_forward.experts.gate_up_proj", gate_up)
    assert torch.equal(cut, torch.cat([gate_up[..., 16:32], gate_up[..., 48:64]], dim=-1))
    down = torch.randn(4, 32, 64)
    assert torch.equal(shard.shard_tensor("model.layers.0.feed_forward.experts.down_proj", down), down[:, 16:])
    router = torch.randn(4, 64)
    assert torch.equal(shard.shard_tensor("model.layers.0.feed_forward.router.weight", router), router)
