"""Prompts as the checkpoint's tokenizer builds them (issue 17): our `Tokenizer.encode` and
`encode_chat` against transformers' `AutoTokenizer(...)(text)` and `apply_chat_template`, over the
real tokenizer rules of LLaMA 2 chat, Llama 3 / 3.1 Instruct and SmolLM2 (no BOS) written into
test checkpoints (tests/helpers/real_tokenizer_configs.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from real_tokenizer_configs import REAL_TOKENIZERS, write_llama3_instruct
from tiny_models import SAMPLE_TEXTS, train_tiny_sentencepiece

from llamaforge.runtime.core.chat_template import ChatTemplateError, render_chat
from llamaforge.runtime.core.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "", " ", "Hello world", "\n\nTwo newlines first", *SAMPLE_TEXTS,
    "special text: <s> </s> <|begin_of_text|> <|eot_id|> <|im_start|> <|im_end|> [INST]",
    "<|im_start|>user\nHi<|im_end|>\n", "[INST] <<SYS>>\nsys\n<</SYS>>\n\nquestion [/INST]",
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "  Answer in French.  "}, {"role": "user", "content": "Good morning"},
     {"role": "assistant", "content": " Bonjour ! "}, {"role": "user", "content": "  How are you?\n"}],
    [{"role": "user", "content": "naïve café — 日本語 🙂"}, {"role": "assistant", "content": "ok"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "literal </s> and <|eot_id|> here"},
     {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real-tokenizers")
    return {name: write(root / name) for name, write in REAL_TOKENIZERS.items()}


def _ours(ckpt: Path) -> Tokenizer:
    """The tokenizer as an engine directory describes it (copy_tokenizer's entry for these files)."""
    eos = json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"]
    return load_tokenizer(ckpt, {"kind": "hf", "file": "tokenizer.json", "config_file": "tokenizer_config.json",
                                 "eos_ids": eos if isinstance(eos, list) else [eos]})


def _reference(ckpt: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ckpt))


def _chat_ids(ref: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, **kwargs: Any) -> list[int]:
    out = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", sorted(REAL_TOKENIZERS))
def test_encode_equals_transformers(checkpoints: dict[str, Path], name: str) -> None:
    ours, ref = _ours(checkpoints[name]), _reference(checkpoints[name])
    for text in TEXTS:
        # transformers recognises special-token text in prompts (as TRT-LLM's preprocessing does).
        assert ours.encode(text, allow_special=True) == ref(text)["input_ids"], (name, text)
        assert ours.encode(text, add_bos=False, allow_special=True) == ref(text, add_special_tokens=False)["input_ids"]


def test_bos_only_where_the_tokenizer_adds_one(checkpoints: dict[str, Path]) -> None:
    for name in ("llama2-chat", "llama3-instruct", "llama3.1-instruct"):
        tok = _ours(checkpoints[name])
        assert tok.bos_id is not None and tok.encode("Hi")[0] == tok.bos_id, name
        assert tok.encode("Hi")[1:] == tok.encode("Hi", add_bos=False)
    smol = _ours(checkpoints["smollm2-instruct"])
    assert smol.bos_id == 1 and smol.special_token_strings["bos_token"] == "<|im_start|>"
    assert smol.encode("Hi") == smol.encode("Hi", add_bos=False) and 1 not in smol.encode("Hi")
    assert smol.encode("") == []


@pytest.mark.parametrize("name", ["llama2-chat", "llama3-instruct", "llama3.1-instruct"])
def test_no_double_bos(checkpoints: dict[str, Path], name: str) -> None:
    tok, ref = _ours(checkpoints[name]), _reference(checkpoints[name])
    bos = tok.special_token_strings["bos_token"]
    for text in (f"{bos}Hello", f"{bos}", f"{bos} {bos}x"):
        ids = tok.encode(text, allow_special=True)
        assert ids[:1] == [tok.bos_id] and ids[1:2] != [tok.bos_id], (name, text)
        # What the tokenizer makes of the text itself, its own BOS being the one the text has.
        assert ids == ref(text, add_special_tokens=False)["input_ids"]
    # A chat template that writes BOS: the rendered prompt has exactly one.
    chat = tok.encode_chat(CONVERSATIONS[1])
    assert chat[0] == tok.bos_id and chat[1] != tok.bos_id
    assert tok.encode(tok.apply_chat_template(CONVERSATIONS[1]), allow_special=True) == chat


@pytest.mark.parametrize("name", sorted(REAL_TOKENIZERS))
def test_chat_template_equals_transformers(checkpoints: dict[str, Path], name: str) -> None:
    ours, ref = _ours(checkpoints[name]), _reference(checkpoints[name])
    checked = 0
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            want_text = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt) == want_text, (name, messages)
            assert ours.encode_chat(messages, add_generation_prompt) == _chat_ids(ref, messages, add_generation_prompt)
            checked += 1
    assert checked >= 10


def test_llama2_template_refuses_non_alternating_roles(checkpoints: dict[str, Path]) -> None:
    tok = _ours(checkpoints["llama2-chat"])
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        tok.encode_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="messages"):
        tok.encode_chat("hello")  # type: ignore[arg-type]


def test_llama31_tools_and_variables_equal_transformers(checkpoints: dict[str, Path]) -> None:
    ckpt = checkpoints["llama3.1-instruct"]
    ours, ref = _ours(ckpt), _reference(ckpt)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city — «quoted» ünïcode",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    messages = [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Zürich?"}]
    want = ref.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    got = ours.apply_chat_template(messages, tools=tools)
    assert got == want and '"description": "Weather for a city — «quoted» ünïcode"' in got  # tojson: no \\u escapes
    want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, date_string="1 Jan 2026")
    assert ours.apply_chat_template(messages, date_string="1 Jan 2026") == want and "1 Jan 2026" in want


def test_templates_run_sandboxed() -> None:
    with pytest.raises(ChatTemplateError):
        render_chat("{{ ''.__class__.__mro__[1].__subclasses__() }}", [], {})
    with pytest.raises(ChatTemplateError):
        render_chat("{% set x = messages.append(1) %}", [], {})  # immutable sandbox: no mutation
    with pytest.raises(ChatTemplateError, match="line 1"):
        render_chat("{% if %}", [], {})
    assert render_chat("{{ bos_token }}{{ messages[0]['content'] | tojson }}", [{"role": "user", "content": "é<>"}],
                       {"bos_token": "<s>"}) == '<s>"é<>"'


def test_generation_config_eos_list_is_the_stop_set(checkpoints: dict[str, Path]) -> None:
    tok = _ours(checkpoints["llama3.1-instruct"])
    n = tok.bos_id
    assert n is not None
    assert tok.eos_ids == (n + 1, n + 8, n + 9)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    # Llama 3 Instruct: generation_config lists <|end_of_text|> and <|eot_id|>; eos_token is <|eot_id|>.
    l3 = load_tokenizer(checkpoints["llama3-instruct"], {"kind": "hf", "file": "tokenizer.json",
                                                        "config_file": "tokenizer_config.json", "eos_ids": [n + 1]})
    assert l3.eos_ids == (n + 1, n + 9)


def test_copy_tokenizer_keeps_rules_template_and_generation_eos(tmp_path: Path) -> None:
    from tiny_models import make_hf_checkpoint, tiny_config

    from llamaforge.export.checkpoint import open_checkpoint
    from llamaforge.export.tokenizer_files import copy_tokenizer
    from llamaforge.runtime.core.manifest import TokenizerInfo

    ckpt_dir = make_hf_checkpoint(tmp_path / "ckpt", tiny_config())
    write_llama3_instruct(tmp_path / "l3")
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (ckpt_dir / file).write_bytes((tmp_path / "l3" / file).read_bytes())
    (ckpt_dir / "chat_template.jinja").write_text("{{ bos_token }}jinja file wins", encoding="utf-8")
    ckpt = open_checkpoint(ckpt_dir)
    info = copy_tokenizer(ckpt, tmp_path / "engine")
    n = json.loads((ckpt_dir / "generation_config.json").read_text())["bos_token_id"]
    assert info["eos_ids"] == [*ckpt.config.eos_token_id, *(e for e in (n + 1, n + 8, n + 9)
                                                            if e not in ckpt.config.eos_token_id)]
    assert info["config_file"] == "tokenizer_config.json" and info["chat_template_file"] == "chat_template.jinja"
    assert TokenizerInfo.from_json(info).to_json() == info
    tok = load_tokenizer(tmp_path / "engine", info)
    assert tok.chat_template == "{{ bos_token }}jinja file wins"
    assert tok.apply_chat_template([]) == "<|begin_of_text|>jinja file wins"


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_sentencepiece_follows_add_bos_token(tmp_path: Path, add_bos_token: bool) -> None:
    (tmp_path / "tokenizer.model").write_bytes(train_tiny_sentencepiece())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": add_bos_token, "add_eos_token": True, "bos_token": "<s>", "eos_token": "</s>",
         "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"}))
    tok = load_tokenizer(tmp_path, {"kind": "sentencepiece", "file": "tokenizer.model",
                                    "config_file": "tokenizer_config.json"})
    body = tok.encode("Hello world", add_bos=False)
    assert tok.encode("Hello world") == ([1] if add_bos_token else []) + body + [2]
    assert tok.encode("<s>Hello world", allow_special=True) == [1, *body, 2]  # one BOS, the text's own
    assert tok.encode_chat([{"role": "user", "content": "Hello world"}]) == [1, *body, 2]


@pytest.mark.parametrize("add_bos_token", [None, False])
def test_tiktoken_follows_add_bos_token_and_keeps_the_template(tmp_path: Path, add_bos_token: bool | None) -> None:
    from real_tokenizer_configs import LLAMA3_INSTRUCT_TEMPLATE
    from tiny_models import tiny_tiktoken_ranks, write_tiktoken_ranks

    from llamaforge.export.tokenizer_files import LLAMA3_PAT_STR

    write_tiktoken_ranks(tmp_path / "tokenizer.model", tiny_tiktoken_ranks())
    cfg: dict[str, Any] = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                           "chat_template": LLAMA3_INSTRUCT_TEMPLATE}
    if add_bos_token is not None:
        cfg["add_bos_token"] = add_bos_token
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(tmp_path, {"kind": "tiktoken", "file": "tokenizer.model", "pattern": LLAMA3_PAT_STR,
                                    "config_file": "tokenizer_config.json"})
    bos = tok.bos_id
    assert bos is not None
    body = tok.encode("Hello world", add_bos=False)
    assert tok.encode("Hello world") == ([bos] if add_bos_token is None else []) + body  # Meta's default: BOS
    assert tok.eos_ids == (bos + 1, bos + 9)  # <|end_of_text|>, and eos_token <|eot_id|>
    ids = tok.encode_chat([{"role": "user", "content": "Hello world"}])
    assert ids[:2] == [bos, bos + 6] and ids.count(bos) == 1 and ids.count(bos + 9) == 1  # header, one <|eot_id|>
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template([{"role": "user", "content": "Hello world"}])


@pytest.fixture(scope="module")
def llama2_sentencepiece(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LLaMA 2 chat as its HF repo also ships it and as the Meta release is: the SentencePiece
    `tokenizer.model` beside the real tokenizer_config.json, with no tokenizer.json, so transformers
    converts the .model itself (SentencePieceExtractor + LlamaConverter)."""
    dest = tmp_path_factory.mktemp("llama2-chat-sentencepiece")
    (dest / "tokenizer.model").write_bytes(train_tiny_sentencepiece())
    for name in ("tokenizer_config.json", "generation_config.json"):
        (dest / name).write_bytes((checkpoints["llama2-chat"] / name).read_bytes())
    return dest


def test_sentencepiece_model_equals_transformers(llama2_sentencepiece: Path) -> None:
    ours = load_tokenizer(llama2_sentencepiece, {"kind": "sentencepiece", "file": "tokenizer.model",
                                                 "config_file": "tokenizer_config.json", "eos_ids": [2]})
    ref = _reference(llama2_sentencepiece)
    assert "tokenizer.json" not in {p.name for p in llama2_sentencepiece.iterdir()}
    for text in TEXTS:
        assert ours.encode(text, allow_special=True) == ref(text)["input_ids"], text
        assert ours.encode(text, add_bos=False, allow_special=True) == ref(text, add_special_tokens=False)["input_ids"]
    for messages in CONVERSATIONS:
        assert ours.encode_chat(messages) == _chat_ids(ref, messages, add_generation_prompt=True), messages


def test_meta_sentencepiece_without_a_config_adds_bos_as_metas_tokenizer(tmp_path: Path) -> None:
    """The Meta layout has only tokenizer.model: Meta's reference Tokenizer.encode(s, bos=True,
    eos=False) is BOS followed by SentencePiece's ids."""
    import sentencepiece as spm

    proto = train_tiny_sentencepiece()
    (tmp_path / "tokenizer.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    ours = load_tokenizer(tmp_path, {"kind": "sentencepiece", "file": "tokenizer.model"})
    for text in TEXTS:
        assert ours.encode(text) == [sp.bos_id(), *sp.encode(text)], text
