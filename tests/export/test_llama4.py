"""Llama 4 (MoE, chunked attention, NoPE layers) against transformers' `Llama4ForCausalLM`.

Random tiny checkpoints saved by transformers, built by the real build path and run by the runtime:
  * Scout-like: every layer MoE, QK norm, llama3 RoPE scaling, NoPE every 2nd layer;
  * Maverick-like: MoE on odd layers and dense FFNs on even ones, no QK norm, 8 experts.
Both use chunked attention with chunk 8, so the prompts (up to 53 tokens) span 7 chunks, and the
NoPE layers' query temperature with floor 4, so it varies within the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import load_llama4_oracle, make_llama4_checkpoint, tiny_llama4_config

from llamaforge.build.builder import BuildOptions, build_engine
from llamaforge.export.checkpoint import open_checkpoint
from llamaforge.export.config import ModelConfig
from llamaforge.runtime.core.engine import Engine
from llamaforge.runtime.core.generate import generate_ids

ATOL = 1e-4
NEW_TOKENS = 32
PROMPT_LENGTHS = (7, 30, 53)

CASES: dict[str, dict] = {
    "scout-like": {},
    "maverick-like": dict(num_local_experts=8, interleave_moe_layer_step=2, use_qk_norm=False, rope_scaling=None,
                          no_rope_layer_interval=4),
}


@pytest.fixture(scope="module", params=list(CASES))
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelConfig, Path, Engine]:
    tmp = tmp_path_factory.mktemp(request.param)
    config = tiny_llama4_config(**CASES[request.param])
    ckpt = make_llama4_checkpoint(tmp / "ckpt", config, seed=7)
    build_engine(BuildOptions(checkpoint=ckpt, out=tmp / "engine"))
    return config, ckpt, Engine(tmp / "engine")


def prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 640, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def test_structure_is_what_the_case_says(built: tuple[ModelConfig, Path, Engine]) -> None:
    config, ckpt, engine = built
    loaded = open_checkpoint(ckpt).config
    assert loaded.describe_mismatch(config) == []
    assert loaded.moe_layer_indices() == config.moe_layer_indices()
    assert [loaded.layer_uses_rope(i) for i in range(4)] == [config.layer_uses_rope(i) for i in range(4)]
    assert max(PROMPT_LENGTHS) >= 3 * config.attention_chunk_size
    assert engine.manifest.config["architecture"] == "llama4"
    # Llama 4 layers lower to the decomposition (GQA has no chunked mask / QK norm / temperature):
    # decode steps copy the cache rather than update it in place.
    assert engine.manifest.kv_cache.decode_in_place is False and not engine.decode_in_place
    hf = load_llama4_oracle(ckpt)
    assert list(hf.config.moe_layers) == list(config.moe_layer_indices())


def test_prefill_logits_match_transformers(built: tuple[ModelConfig, Path, Engine]) -> None:
    _, ckpt, engine = built
    hf = load_llama4_oracle(ckpt)
    batch = prompts(seed=1)
    ids = np.zeros((len(batch), max(PROMPT_LENGTHS)), np.int64)  # right-padded, one call
    for b, p in enumerate(batch):
        ids[b, : len(p)] = p
    logits, _ = engine.step(ids, np.zeros(len(batch), np.int32), engine.kv.empty(len(batch), 96))
    for b, p in enumerate(batch):
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0].numpy()
        diff = np.abs(logits[b, : len(p)] - want).max()
        assert diff <= ATOL, f"prompt {b} (len {len(p)}): prefill logits max |diff| {diff:.2e} > {ATOL}"


def test_greedy_tokens_match_transformers(built: tuple[ModelConfig, Path, Engine]) -> None:
    _, ckpt, engine = built
    hf = load_llama4_oracle(ckpt)
    batch = prompts(seed=2)
    gens = generate_ids(engine, batch, NEW_TOKENS, stop_at_eos=False)
    for b, (p, g) in enumerate(zip(batch, gens)):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=0, eos_token_id=None, pad_token_id=0)
        want = out[0, len(p):].tolist()
        assert len(want) == NEW_TOKENS
        assert g.output_ids == want, f"prompt {b}: greedy tokens differ from transformers"


def test_continued_prefill_matches_one_shot(built: tuple[ModelConfig, Path, Engine]) -> None:
    """Rows continuing a prefill at different positions, across chunk boundaries (as the in-flight
    batcher's chunked prefill calls the engine)."""
    _, _, engine = built
    batch = prompts(seed=3)
    one_shot = [engine.step(np.array([p]), np.zeros(1, np.int32), engine.kv.empty(1, 64))[0][0] for p in batch]
    split = [3, 9, 21]
    first = np.zeros((3, max(split)), np.int64)
    for b, (p, n) in enumerate(zip(batch, split)):
        first[b, :n] = p[:n]
    logits1, past = engine.step(first, np.zeros(3, np.int32), engine.kv.empty(3, 64))
    rest = [len(p) - n for p, n in zip(batch, split)]
    second = np.zeros((3, max(rest)), np.int64)
    for b, (p, n) in enumerate(zip(batch, split)):
        second[b, : len(p) - n] = p[n:]
    logits2, _ = engine.step(second, np.array(split, np.int32), past)
    for b, n in enumerate(split):
        got = np.concatenate([logits1[b, :n], logits2[b, : rest[b]]])
        np.testing.assert_allclose(got, one_shot[b], atol=ATOL, rtol=0)


def test_multimodal_checkpoint_layout_loads_the_text_model(built: tuple[ModelConfig, Path, Engine], tmp_path: Path) -> None:
    """The published repos are `Llama4ForConditionalGeneration`: text weights under `language_model.`,
    a vision tower beside them, the text config nested as `text_config`."""
    from safetensors.torch import load_file, save_file

    config, ckpt, _ = built
    plain = open_checkpoint(ckpt)
    dest = tmp_path / "multimodal"
    dest.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update({f"language_model.{k}": v for k, v in load_file(str(f)).items()})
    tensors["vision_model.patch_embedding.linear.weight"] = torch.zeros(8, 4)
    tensors["multi_modal_projector.linear_1.weight"] = torch.zeros(4, 8)
    save_file(tensors, str(dest / "model.safetensors"))
    text = json.loads((ckpt / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": text, "vision_config": {}}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dest / name).write_bytes((ckpt / name).read_bytes())
    multimodal = open_checkpoint(dest)
    assert multimodal.config.describe_mismatch(config) == []
    assert any("vision tower" in w for w in multimodal.warnings)
    assert multimodal.tensor_names() == plain.tensor_names()
    for name in plain.tensor_names():
        assert torch.equal(multimodal.load(name), plain.load(name)), name


def test_served_through_grpc_runtime(built: tuple[ModelConfig, Path, Engine]) -> None:
    """Three concurrent tritonclient requests through the in-flight batcher (chunked prefill of 16
    tokens per step, so prompts continue across attention chunks in shared calls) give
    transformers' greedy tokens, and the KV cache ends fully free."""
    import threading

    from server_utils import grpc_client, running_server, token_inputs

    from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
    from llamaforge.runtime.core.engine_core import EngineCore

    _, ckpt, engine = built
    hf = load_llama4_oracle(ckpt)
    core = EngineCore(engine.dir, CoreConfig(KVCacheConfig(budget_tokens=1024), SchedulerConfig(4, 16)))
    eos = core.eos_ids[0]
    batch, new = prompts(seed=4), 16
    want = []
    for p in batch:
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                              max_new_tokens=new, eos_token_id=eos, pad_token_id=0)[0, len(p):].tolist()
        want.append(out[: out.index(eos)] if eos in out else out)
    got: dict[int, list[int]] = {}
    with running_server(core) as server:
        def request(i: int) -> None:
            r = grpc_client(server).infer("tensorrt_llm", token_inputs(batch[i], new, exclude_input_in_output=True))
            got[i] = r.as_numpy("output_ids").reshape(-1).tolist()

        threads = [threading.Thread(target=request, args=(i,)) for i in range(len(batch))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert [got.get(i) for i in range(len(batch))] == want
    assert core.kv.all_free()
