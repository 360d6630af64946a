"""Real prompts end to end (issue 17): a tiny engine built from a checkpoint whose tokenizer is
SmolLM2's (no BOS, `<|im_start|>` chat template) or LLaMA 2 chat's keeps the tokenizer's rules
and chat template (build -> engine directory -> runtime); `llamaforge generate --chat` and
`--special-tokens`. (The gRPC text path: tests/serving/test_prompt_rules.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from real_tokenizer_configs import (
    SMOLLM2_CHAT_TEMPLATE,
    build_engine_with_tokenizer,
    write_llama2_chat,
    write_smollm2_instruct,
)

from llamaforge.runtime.core.engine import Engine
from llamaforge.runtime.core.generate import generate_ids
from llamaforge.runtime.core.manifest import EngineManifest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def main():"}]


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_engine_with_tokenizer(tmp_path_factory.mktemp("smol"), write_smollm2_instruct)


@pytest.fixture(scope="module")
def llama2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_engine_with_tokenizer(tmp_path_factory.mktemp("llama2"), write_llama2_chat)


def test_engine_keeps_the_tokenizer_rules_and_template(smol: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    ckpt, engine_dir = smol
    info = EngineManifest.read(engine_dir).tokenizer
    assert info is not None and info.config_file == "tokenizer_config.json"
    assert json.loads((engine_dir / "tokenizer_config.json").read_text())["chat_template"] == SMOLLM2_CHAT_TEMPLATE
    engine = Engine(engine_dir)
    tok = engine.tokenizer
    assert tok is not None and tok.chat_template == SMOLLM2_CHAT_TEMPLATE
    ref = AutoTokenizer.from_pretrained(str(ckpt))
    assert tok.encode("Hello world", allow_special=True) == ref("Hello world")["input_ids"]
    assert tok.encode("Hello world")[0] != 1  # no <|im_start|> glued to the prompt
    out = ref.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert tok.encode_chat(MESSAGES) == list(out["input_ids"] if hasattr(out, "keys") else out)
    assert engine.eos_ids == (2,)  # <|im_end|>: config.json, generation_config.json and eos_token agree


def test_generate_chat_cli(smol: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llamaforge.cli import main

    _, engine_dir = smol
    engine = Engine(engine_dir)
    tok = engine.tokenizer
    assert tok is not None
    want = tok.decode(generate_ids(engine, [tok.encode_chat(MESSAGES)], 6)[0].output_ids)
    assert main(["generate", str(engine_dir), "--chat", "system: Be brief.", "def main():", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == want + "\n"
    messages_file = tmp_path / "messages.json"
    messages_file.write_text(json.dumps(MESSAGES))
    assert main(["generate", str(engine_dir), "--chat", "--messages", str(messages_file), "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == want + "\n"

    # Special-token text: plain characters by default, the special tokens with --special-tokens.
    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    outputs = []
    for flag, ids in (([], tok.encode(prompt)), (["--special-tokens"], tok.encode(prompt, allow_special=True))):
        text = tok.decode(generate_ids(engine, [ids], 5)[0].output_ids)
        assert main(["generate", str(engine_dir), prompt, "--max-new-tokens", "5", *flag]) == 0
        outputs.append(capsys.readouterr().out)
        assert outputs[-1] == f"{prompt}{text}\n" + "-" * 40 + "\n"
    assert outputs[0] != outputs[1]  # the two encodings continue differently, so the flag is seen
    assert 1 in tok.encode(prompt, allow_special=True) and 1 not in tok.encode(prompt)


def test_generate_chat_refuses_what_the_template_refuses(llama2: tuple[Path, Path]) -> None:
    from llamaforge.cli import main

    _, engine_dir = llama2
    tok = Engine(engine_dir).tokenizer
    assert tok is not None and tok.chat_template is not None and "[INST]" in tok.chat_template
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<s>[INST] Hi [/INST]"
    assert tok.encode_chat([{"role": "user", "content": "Hi"}]).count(1) == 1  # the template's <s> only
    with pytest.raises(SystemExit, match="Conversation roles must alternate"):
        main(["generate", str(engine_dir), "--chat", "user: a", "user: b"])
    with pytest.raises(SystemExit, match="needs --chat"):
        main(["generate", str(engine_dir), "--messages", "x.json"])
