"""Tensor-parallel engines (built by `build --tp N`) against the same model at TP=1 and against
transformers (the oracle), each rank run as its own process under mpiexec (tests/helpers/tp_rank.py):

  * prefill logits (every position of a right-padded batch, the ranks' vocabulary shards gathered)
    within 1e-4 max-abs of TP=1's and of transformers';
  * 16 greedy tokens per prompt identical to TP=1's and to transformers' `generate`;

for MHA, GQA (KV heads split), MQA and TP=4 over 2 KV heads (KV heads replicated), TP=3 with a
vocabulary it does not divide, tied embeddings,
llama3 RoPE scaling and a Llama 4 MoE model (TP inside every expert). Ranks run one thread each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from tiny_models import (
    hf_state_dict,
    load_hf_oracle,
    load_llama4_oracle,
    make_hf_checkpoint,
    make_llama4_checkpoint,
    tiny_config,
    tiny_llama4_config,
)
from tp_runs import NEW_TOKENS, prompts, run_ranks

from llamaforge.build.builder import BuildOptions, build_engine
from llamaforge.export.config import ModelConfig, RopeScaling
from llamaforge.runtime.core.manifest import EngineManifest

ATOL = 1e-4

CASES: dict[str, tuple[int, dict]] = {  # case -> (TP, tiny_config overrides)
    "mha": (2, dict(num_heads=4, num_kv_heads=4, norm_eps=1e-6)),
    "gqa-split": (2, dict(num_heads=4, num_kv_heads=2)),
    "mqa-replicated": (2, dict(num_heads=4, num_kv_heads=1)),
    "tp4-kv-replicated": (4, dict(num_heads=8, num_kv_heads=2, hidden_size=64)),
    # 640 rows over 3 ranks: 214, 213, 213 (two graph widths, so two traces)
    "tp3-uneven-vocab": (3, dict(num_heads=6, num_kv_heads=3, hidden_size=96, intermediate_size=192)),
    "tied-embeddings": (2, dict(tie_word_embeddings=True, rope_theta=500000.0)),
    "llama3-rope-scaling": (2, dict(rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16))),
    "llama4-moe": (2, {}),
}


def oracle(hf: torch.nn.Module, batch: list[list[int]]) -> tuple[list[np.ndarray], list[list[int]]]:
    logits, tokens = [], []
    with torch.no_grad():
        for p in batch:
            ids = torch.tensor([p])
            logits.append(hf(ids).logits[0].numpy())
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=0, eos_token_id=None, pad_token_id=0)
            tokens.append(out[0, len(p):].tolist())
    return logits, tokens


def check_rank_weights(engine: Path, ckpt: Path, config: ModelConfig, tp: int, vocab: list[list[int]]) -> None:
    """Each rank's external data holds its shard of the checkpoint (Megatron's cut, KV heads replicated
    where there are fewer than ranks) and nothing of the other ranks' shards."""
    sd = {k: v.numpy() for k, v in hf_state_dict(ckpt).items()}
    d, group = config.head_dim, config.num_heads // config.num_kv_heads
    q_part, ffn_part = config.q_size // tp, config.intermediate_size // tp
    for rank in range(tp):
        weights = {t.name: numpy_helper.to_array(t, base_dir=str(engine / f"rank{rank}"))
                   for t in onnx.load(str(engine / f"rank{rank}" / "model.onnx"), load_external_data=False).graph.initializer}
        p = "model.layers.1."
        q = sd[p + "self_attn.q_proj.weight"][rank * q_part:(rank + 1) * q_part]
        kv_heads = range(rank * q_part // d // group, rank * q_part // d // group + 1) if config.num_kv_heads < tp else \
            range(rank * config.num_kv_heads // tp, (rank + 1) * config.num_kv_heads // tp)
        k = np.concatenate([sd[p + "self_attn.k_proj.weight"][h * d:(h + 1) * d] for h in kv_heads])
        v = np.concatenate([sd[p + "self_attn.v_proj.weight"][h * d:(h + 1) * d] for h in kv_heads])
        np.testing.assert_array_equal(weights[p + "self_attn.qkv_proj.weight.T"], np.concatenate([q, k, v]).T)
        np.testing.assert_array_equal(weights[p + "self_attn.o_proj.weight.T"],
                                      sd[p + "self_attn.o_proj.weight"][:, rank * q_part:(rank + 1) * q_part].T)
        np.testing.assert_array_equal(weights[p + "mlp.down_proj.weight.T"],
                                      sd[p + "mlp.down_proj.weight"][:, rank * ffn_part:(rank + 1) * ffn_part].T)
        head = sd["model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"]
        np.testing.assert_array_equal(weights["lm_head.weight.T"], head[vocab[rank][0]:vocab[rank][1]].T)
        np.testing.assert_array_equal(weights["model.embed_tokens.weight"], sd["model.embed_tokens.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_tp_engine_matches_tp1_and_transformers(case: str, tmp_path: Path) -> None:
    tp, overrides = CASES[case]
    if case == "llama4-moe":
        config = tiny_llama4_config()
        ckpt = make_llama4_checkpoint(tmp_path / "ckpt", config, seed=3)
        hf = load_llama4_oracle(ckpt)
    else:
        config = tiny_config(**overrides)
        ckpt = make_hf_checkpoint(tmp_path / "ckpt", config, seed=3)
        hf = load_hf_oracle(ckpt)
    sharded = build_engine(BuildOptions(checkpoint=ckpt, out=tmp_path / "tp", tp=tp))
    single = build_engine(BuildOptions(checkpoint=ckpt, out=tmp_path / "tp1"))

    manifest = EngineManifest.read(sharded)
    info = manifest.tensor_parallel
    assert info is not None and info.size == tp and info.rank is None
    assert info.q_heads_per_rank == config.num_heads // tp
    replicated = config.num_kv_heads < tp
    base, extra = divmod(config.vocab_size, tp)
    assert info.kv_heads_per_rank == (1 if replicated else config.num_kv_heads // tp)
    assert info.vocab_shards == [[b * base + min(b, extra), (b + 1) * base + min(b + 1, extra)] for b in range(tp)]
    for rank in range(tp):
        rank_manifest = EngineManifest.read(sharded / f"rank{rank}")
        assert rank_manifest.tensor_parallel is not None and rank_manifest.tensor_parallel.rank == rank
        assert rank_manifest.kv_cache.num_kv_heads == info.kv_heads_per_rank
        logits = next(o for o in rank_manifest.outputs if o.name == "logits")
        assert logits.shape[-1] == info.vocab_shards[rank][1] - info.vocab_shards[rank][0]

    if case != "llama4-moe":
        check_rank_weights(sharded, ckpt, config, tp, info.vocab_shards)

    batch = prompts(seed=4)
    tp_logits, tp_tokens = run_ranks(sharded, batch, tmp_path, tp)
    one_logits, one_tokens = run_ranks(single, batch, tmp_path, 1)
    want_logits, want_tokens = oracle(hf, batch)
    for b, p in enumerate(batch):
        got = tp_logits[b, :len(p)]
        assert got.shape == want_logits[b].shape
        diff_tp1 = np.abs(got - one_logits[b, :len(p)]).max()
        diff_hf = np.abs(got - want_logits[b]).max()
        assert diff_tp1 <= ATOL, f"prompt {b}: TP={tp} prefill logits differ from TP=1 by {diff_tp1:.2e}"
        assert diff_hf <= ATOL, f"prompt {b}: TP={tp} prefill logits differ from transformers by {diff_hf:.2e}"
        assert tp_tokens[b].tolist() == one_tokens[b].tolist() == want_tokens[b], f"prompt {b}: greedy tokens differ"
