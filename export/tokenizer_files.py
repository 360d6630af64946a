"""Copy a checkpoint's tokenizer into an engine directory and describe it for the manifest.

The returned dict is everything `runtime.tokenizer.load_tokenizer(engine_dir, info)` needs; it is
JSON-serialisable and its file names are relative to the engine directory.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from llamaforge.export.checkpoint_base import HF_TOKENIZER_CONFIG, TIKTOKEN_NUM_SPECIAL, Checkpoint, read_json_object
from llamaforge.export.checkpoint_errors import CheckpointError

__all__ = ["LLAMA3_PAT_STR", "CHAT_TEMPLATE_FILE", "llama3_special_tokens", "copy_tokenizer"]

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 saves the chat template here

# Meta's Llama 3 pre-tokenisation pattern (llama-models `tokenizer.py`, `Tokenizer.pat_str`).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]


def llama3_special_tokens(num_base_tokens: int, num_reserved: int = TIKTOKEN_NUM_SPECIAL) -> dict[str, int]:
    """Meta's Llama 3 special tokens -> ids, numbered from `num_base_tokens` (= len(ranks)).

    As in llama-models: 11 named tokens, then `<|reserved_special_token_{2 + i}|>` for the rest,
    256 in all (so with 128000 ranks: <|begin_of_text|> = 128000, <|eot_id|> = 128009).
    """
    names = list(_LLAMA3_NAMED_SPECIALS)
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(num_reserved - len(names))]
    return {tok: num_base_tokens + i for i, tok in enumerate(names)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _num_ranks(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _generation_eos_ids(checkpoint_dir: Path) -> list[int]:
    """`eos_token_id` of generation_config.json (an int or a list; Llama 3 Instruct lists <|eot_id|>
    there, not in config.json); [] when the file or the key is absent."""
    name = "generation_config.json"
    if not (checkpoint_dir / name).is_file():
        return []
    data = read_json_object(checkpoint_dir, name)
    value = data.get("eos_token_id")
    values = value if isinstance(value, list) else [value]
    if not all(v is None or (type(v) is int and v >= 0) for v in values):
        raise CheckpointError(f"{name}: eos_token_id must be a token id or a list of them, got {value!r}")
    return [int(v) for v in values if v is not None]


def copy_tokenizer(ckpt: Checkpoint, dest_dir: str | Path) -> dict[str, Any]:
    """Copy the tokenizer file(s) of `ckpt` into `dest_dir` and return the manifest entry:

    ``{"kind": "hf"|"sentencepiece"|"tiktoken", "file": <name in dest_dir>, "sha256": ...,
    "bos_id": int|None, "eos_ids": [int, ...]}`` plus ``"config_file"`` when the checkpoint has a
    tokenizer_config.json (its BOS/EOS rules and chat_template), ``"chat_template_file"`` when it
    has a chat_template.jinja, and for "tiktoken", ``"pattern"``, ``"num_base_tokens"`` and
    ``"special_tokens"`` ({token: id}). `eos_ids`, the stop set, is config.json's eos_token_id
    followed by generation_config.json's.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    src = Path(ckpt.tokenizer_path)
    if not src.is_file():
        raise CheckpointError(f"{src.name}: tokenizer file not found in {src.parent}")
    kind = ckpt.tokenizer_kind
    if kind not in ("hf", "sentencepiece", "tiktoken"):
        raise CheckpointError(f"{src.name}: unknown tokenizer kind {kind!r}")
    file = "tokenizer.json" if kind == "hf" else "tokenizer.model"
    shutil.copyfile(src, dest / file)
    eos_ids = list(ckpt.config.eos_token_id)
    for checkpoint_dir in dict.fromkeys([Path(ckpt.path), src.parent]):
        eos_ids += [i for i in _generation_eos_ids(checkpoint_dir) if i not in eos_ids]
    info: dict[str, Any] = {
        "kind": kind,
        "file": file,
        "sha256": _sha256(dest / file),
        "bos_id": ckpt.config.bos_token_id,
        "eos_ids": eos_ids,
    }
    cfg = getattr(ckpt, "tokenizer_config_path", None)
    if cfg is None and (src.parent / HF_TOKENIZER_CONFIG).is_file():
        cfg = src.parent / HF_TOKENIZER_CONFIG
    if cfg is not None:
        shutil.copyfile(cfg, dest / HF_TOKENIZER_CONFIG)
        info["config_file"] = HF_TOKENIZER_CONFIG
    template = Path(cfg).parent / CHAT_TEMPLATE_FILE if cfg is not None else src.parent / CHAT_TEMPLATE_FILE
    if template.is_file():
        shutil.copyfile(template, dest / CHAT_TEMPLATE_FILE)
        info["chat_template_file"] = CHAT_TEMPLATE_FILE
    if kind == "tiktoken":
        n = _num_ranks(dest / file)
        info["pattern"] = LLAMA3_PAT_STR
        info["num_base_tokens"] = n
        info["special_tokens"] = llama3_special_tokens(n)
    return info
