"""Number-for-number parity of built engines with transformers (the oracle), per LLaMA variant style.

For each case a random-weight checkpoint is made, compiled by the real build path (trace -> passes
-> engine directory) and run through the runtime:
  * prefill logits of a right-padded batch: max |diff| <= 1e-4 (fp32) against `LlamaForCausalLM`;
  * 32 greedy tokens for 3 prompts of different lengths: identical to `generate(do_sample=False)`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import load_hf_oracle, make_hf_checkpoint, make_meta_checkpoint, tiny_config

from llamaforge.build.builder import BuildOptions, build_engine
from llamaforge.export.config import ModelConfig, RopeScaling
from llamaforge.runtime.core.engine import Engine
from llamaforge.runtime.core.generate import generate_ids

ATOL = 1e-4
NEW_TOKENS = 32

CASES: dict[str, dict] = {
    # LLaMA 1: multi-head attention at every size, eps 1e-6.
    "llama1-mha": dict(num_heads=4, num_kv_heads=4, norm_eps=1e-6),
    # LLaMA 2 70B: grouped-query attention, 8 query heads per KV head.
    "llama2-70b-gqa": dict(num_heads=8, num_kv_heads=1, norm_eps=1e-5),
    # LLaMA 3.1: llama3 rope scaling; prompts + generation run well past original_max_position_embeddings=24.
    "llama3.1-rope-scaling": dict(rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 24), max_position_embeddings=512),
    # LLaMA 3.2: tied embeddings (and scaling factor 32).
    "llama3.2-tied": dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 24)),
    # Code Llama: rope theta 1e6.
    "codellama-theta-1e6": dict(rope_theta=1_000_000.0),
}
PROMPT_LENGTHS = (7, 30, 53)


def prompts_for(config: ModelConfig, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def build(checkpoint: Path, out: Path) -> Engine:
    build_engine(BuildOptions(checkpoint=checkpoint, out=out))
    return Engine(out)


def hf_greedy(hf: torch.nn.Module, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                          min_new_tokens=0, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def check_parity(engine: Engine, hf: torch.nn.Module, config: ModelConfig, seed: int) -> None:
    prompts = prompts_for(config, seed)
    batch, longest = len(prompts), max(PROMPT_LENGTHS)
    ids = np.zeros((batch, longest), np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    logits, _ = engine.step(ids, np.zeros(batch, np.int32), engine.kv.empty(batch, longest + NEW_TOKENS))
    for b, p in enumerate(prompts):
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0].numpy()
        diff = np.abs(logits[b, : len(p)] - want).max()
        assert diff <= ATOL, f"prompt {b} (len {len(p)}): prefill logits max |diff| {diff:.2e} > {ATOL}"

    gens = generate_ids(engine, prompts, NEW_TOKENS, stop_at_eos=False)
    for b, (p, g) in enumerate(zip(prompts, gens)):
        want_tokens = hf_greedy(hf, p)
        assert len(want_tokens) == NEW_TOKENS
        assert g.output_ids == want_tokens, f"prompt {b}: greedy tokens differ from transformers"


@pytest.mark.parametrize("case", list(CASES))
def test_hf_layout_parity(case: str, tmp_path: Path) -> None:
    config = tiny_config(**CASES[case])
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", config, seed=1)
    engine = build(ckpt, tmp_path / "engine")
    check_parity(engine, load_hf_oracle(ckpt), config, seed=2)


@pytest.mark.parametrize("tokenizer,overrides", [
    ("sentencepiece", dict(num_heads=4, num_kv_heads=4, norm_eps=1e-6)),  # LLaMA 1/2 style
    # LLaMA 3.1 style. params.json says only `use_scaled_rope`; Meta's code fixes factor 8, 1, 4, 8192.
    # The scaling still changes every low-frequency pair at any position.
    ("tiktoken", dict(rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_position_embeddings=512)),
])
def test_meta_layout_parity(tokenizer: str, overrides: dict, tmp_path: Path) -> None:
    """Meta layout: 2 model-parallel .pth shards, interleaved-RoPE wq/wk, tokenizer.model."""
    config = tiny_config(**overrides)
    hf_dir = make_hf_checkpoint(tmp_path / "hf", config, seed=3)
    meta_dir = make_meta_checkpoint(tmp_path / "meta", hf_dir, mp=2, tokenizer=tokenizer)
    engine = build(meta_dir, tmp_path / "engine")
    assert engine.manifest.source["layout"] == "meta"
    check_parity(engine, load_hf_oracle(hf_dir), config, seed=4)


def test_chunked_prefill_matches_one_shot(tmp_path: Path) -> None:
    """Rows continuing a prefill at different positions in one call (the decomposed `If` branch)
    give the same logits as one-shot prefill."""
    config = tiny_config(**CASES["llama3.1-rope-scaling"])
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", config, seed=5)
    engine = build(ckpt, tmp_path / "engine")
    prompts = prompts_for(config, seed=6)
    capacity = 64
    one_shot = []
    for p in prompts:
        logits, _ = engine.step(np.array([p]), np.zeros(1, np.int32), engine.kv.empty(1, capacity))
        one_shot.append(logits[0])
    # First chunk: row b gets `split[b]` tokens; second chunk: the rest, each row at its own position.
    split = [3, 17, 40]
    first = np.zeros((3, max(split)), np.int64)
    for b, (p, n) in enumerate(zip(prompts, split)):
        first[b, :n] = p[:n]
    logits1, past = engine.step(first, np.zeros(3, np.int32), engine.kv.empty(3, capacity))
    rest = [len(p) - n for p, n in zip(prompts, split)]
    second = np.zeros((3, max(rest)), np.int64)
    for b, (p, n) in enumerate(zip(prompts, split)):
        second[b, : len(p) - n] = p[n:]
    logits2, _ = engine.step(second, np.array(split, np.int32), past)
    for b, n in enumerate(split):
        got = np.concatenate([logits1[b, :n], logits2[b, : rest[b]]])
        np.testing.assert_allclose(got, one_shot[b], atol=ATOL, rtol=0)
