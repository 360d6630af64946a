"""`demo-tiny` (`make engine MODEL=demo-tiny`): a small Llama-3.2-shaped checkpoint made on the spot.

Nothing can be downloaded on a fresh machine, so this random-weight model is built from a checkpoint
generated locally in HF layout (config.json, sharded safetensors + index, tokenizer.json): a
byte-level BPE tokenizer trained on this Python's standard library sources, and seeded random
weights. It exercises exactly the path a real checkpoint takes.
"""

from __future__ import annotations

import json
import shutil
import sys
import sysconfig
from pathlib import Path

import torch
from safetensors.torch import save_file

from llamaforge.export.config import ModelConfig, RopeScaling
from llamaforge.export.demo.tokenizer import file_lines, train_tokenizer
from llamaforge.export.model import LlamaDecoder

DEMO_NAME = "demo-tiny"
VOCAB_SIZE = 2048
TOKENIZER_FILES = 60  # the first stdlib modules by name: enough text for VOCAB_SIZE tokens


def stdlib_files(limit: int | None = None) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    return files[:limit] if limit else files


def make_demo_checkpoint(dest: Path, seed: int = 0) -> Path:
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(file_lines(stdlib_files(TOKENIZER_FILES)), VOCAB_SIZE)
    tok.save(str(tmp / "tokenizer.json"))
    config = ModelConfig(
        name=DEMO_NAME, family="llama3.2", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
        head_dim=32, intermediate_size=768, vocab_size=VOCAB_SIZE, norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 256), max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=(1,), pad_token_id=None,
    )
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32", **config.to_hf()}
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    torch.manual_seed(seed)
    model = LlamaDecoder(config)
    for name, p in model.named_parameters():
        with torch.no_grad():
            p.normal_(0.0, 0.02) if not name.endswith("norm.weight") else p.fill_(1.0)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    shards = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in shard}, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    print(f"demo checkpoint ({config.num_parameters() / 1e6:.1f}M params, random weights): {dest}", file=sys.stderr)
    return dest
