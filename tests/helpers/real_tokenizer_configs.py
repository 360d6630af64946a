"""The tokenizer rules of real checkpoints, written over tiny trained vocabularies (a test helper).

Each `write_*` function writes into a checkpoint directory what the real checkpoint has there:
tokenizer.json with the real normalizer / pre-tokenizer / post-processor / decoder and the real
special tokens (with their real ids where the vocabulary allows it: LLaMA 2's <s> = 1 and
SmolLM2's <|im_start|> = 1 are real; Llama 3's specials follow Meta's numbering from the end of the
base vocabulary, so <|begin_of_text|> is `n` as it is 128000 = len(ranks) in the real one),
tokenizer_config.json with the real flags and chat template, and generation_config.json's
eos_token_id. The vocabularies are small ones trained here on the tiny corpus, never the real
128k ones.

Sources of the texts below:
  * chat templates of Llama-2-7b-chat-hf, Meta-Llama-3-8B-Instruct and Llama-3.1-8B-Instruct:
    the `chat_template` of each meta-llama repository's tokenizer_config.json, as collected in
    openvinotoolkit/openvino.genai tests/python_tests/data/tokenizer_configs.py (the LLaMA 2 one
    is the current revision, with `content.strip()` / `' ' + eos_token`);
  * the SmolLM2 template: HuggingFaceTB/SmolLM2-135M-Instruct tokenizer_config.json (the
    135M Llama-architecture instruct checkpoint of issue 17; its tokenizer adds no BOS);
  * the tokenizer.json components and flags: the same repositories' tokenizer.json,
    tokenizer_config.json and generation_config.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tiny_models import TINY_VOCAB, corpus_text, train_tiny_sentencepiece

__all__ = [
    "LLAMA2_CHAT_TEMPLATE", "LLAMA3_INSTRUCT_TEMPLATE", "LLAMA31_INSTRUCT_TEMPLATE", "SMOLLM2_CHAT_TEMPLATE",
    "write_llama2_chat", "write_llama3_instruct", "write_smollm2_instruct", "REAL_TOKENIZERS",
    "build_engine_with_tokenizer",
]

LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

LLAMA3_INSTRUCT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

LLAMA31_INSTRUCT_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta's Llama 3 pre-tokenizer split (tokenizer.json: Split, behavior Isolated).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_MAX_LENGTH = 1000000000000000019884624838656  # transformers' "no limit", as the LLaMA configs write it


def _added_token(content: str) -> dict[str, Any]:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def _template_processing(bos: str, bos_id: int) -> dict[str, Any]:
    """LLaMA's post-processor: "<bos> $A" (and "<bos> $A <bos> $B" for pairs)."""
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}}


def _added(tokens: list[tuple[int, str]]) -> list[dict[str, Any]]:
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True} for i, t in tokens]


def _write(dest: Path, tokenizer: dict[str, Any], config: dict[str, Any], generation: dict[str, Any]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (dest / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    return dest


# -- LLaMA 2 chat ---------------------------------------------------------------------------------


def write_llama2_chat(dest: str | Path) -> Path:
    """meta-llama/Llama-2-7b-chat-hf's tokenizer rules over the tiny SentencePiece BPE vocabulary
    (<unk> 0, <s> 1, </s> 2, byte-fallback pieces): TINY_VOCAB ids."""
    import sentencepiece as spm
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_proto=train_tiny_sentencepiece())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = [list(m) for m in generate_merges(vocab)]  # what transformers' SentencePieceExtractor derives
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": _added([(0, "<unk>"), (1, "<s>"), (2, "</s>")]),
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": _template_processing("<s>", 1),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "vocab": vocab,
                  "merges": merges},
    }
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": _added_token("<s>"),
        "chat_template": LLAMA2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": _added_token("</s>"), "legacy": False, "model_max_length": _MAX_LENGTH, "pad_token": None,
        "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added_token("<unk>"),
    }
    generation = {"bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "max_length": 4096, "pad_token_id": 0,
                  "temperature": 0.6, "top_p": 0.9}
    return _write(Path(dest), tokenizer, config, generation)


# -- Llama 3 / 3.1 Instruct -----------------------------------------------------------------------


def _byte_level_bpe(vocab_size: int, split_regex: str | None, special_tokens: list[str]) -> dict[str, Any]:
    """A byte-level BPE trained on the tiny corpus (tokenizer.json as a dict), special tokens first."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split_regex is None)
    tok.pre_tokenizer = byte_level if split_regex is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_text().splitlines(keepends=True), trainer)
    return dict(json.loads(tok.to_str()))


def write_llama3_instruct(dest: str | Path, version: str = "3.1") -> Path:
    """meta-llama/Meta-Llama-3-8B-Instruct ("3") or Llama-3.1-8B-Instruct ("3.1") tokenizer rules:
    a byte-level BPE of TINY_VOCAB - 256 ids, then Meta's 256 special tokens (so TINY_VOCAB ids;
    <|begin_of_text|> = TINY_VOCAB - 256)."""
    from llamaforge.export.tokenizer_files import llama3_special_tokens

    spec = _byte_level_bpe(TINY_VOCAB - 256, _LLAMA3_SPLIT, [])
    n = len(spec["model"]["vocab"])
    specials = llama3_special_tokens(n)
    spec["added_tokens"] = _added(sorted((i, t) for t, i in specials.items()))
    spec["model"]["ignore_merges"] = True
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    spec["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        _template_processing("<|begin_of_text|>", specials["<|begin_of_text|>"])]}
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    config = {
        "added_tokens_decoder": {str(i): {**_added_token(t), "special": True} for t, i in specials.items()},
        "bos_token": "<|begin_of_text|>",
        "chat_template": LLAMA31_INSTRUCT_TEMPLATE if version == "3.1" else LLAMA3_INSTRUCT_TEMPLATE,
        "clean_up_tokenization_spaces": True, "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 131072 if version == "3.1"
        else _MAX_LENGTH, "tokenizer_class": "PreTrainedTokenizerFast",
    }
    for entry in config["added_tokens_decoder"].values():
        entry.pop("__type")
    eos = [n + 1, n + 8, n + 9] if version == "3.1" else [n + 1, n + 9]  # <|end_of_text|>, (<|eom_id|>), <|eot_id|>
    generation = {"bos_token_id": n, "do_sample": True, "eos_token_id": eos, "temperature": 0.6, "top_p": 0.9}
    return _write(Path(dest), spec, config, generation)


# -- a tokenizer without BOS (SmolLM2) ------------------------------------------------------------

_SMOLLM2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
                     "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>",
                     "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
                     "<jupyter_script>", "<empty_output>"]


def write_smollm2_instruct(dest: str | Path) -> Path:
    """HuggingFaceTB/SmolLM2-135M-Instruct's tokenizer rules (GPT-2 byte-level BPE, no BOS added:
    its post-processor is ByteLevel only; bos_token <|im_start|> = 1, eos_token <|im_end|> = 2)
    over a byte-level BPE of TINY_VOCAB ids."""
    spec = _byte_level_bpe(TINY_VOCAB, None, _SMOLLM2_SPECIALS)
    spec["added_tokens"] = _added(list(enumerate(_SMOLLM2_SPECIALS)))
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    config = {
        "add_prefix_space": False, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>", "chat_template": SMOLLM2_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "model_max_length": 8192, "pad_token": "<|im_end|>",
        "tokenizer_class": "GPT2Tokenizer", "unk_token": "<|endoftext|>", "vocab_size": 49152,
    }
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    return _write(Path(dest), spec, config, generation)


REAL_TOKENIZERS = {
    "llama2-chat": write_llama2_chat,
    "llama3-instruct": lambda dest: write_llama3_instruct(dest, "3"),
    "llama3.1-instruct": lambda dest: write_llama3_instruct(dest, "3.1"),
    "smollm2-instruct": write_smollm2_instruct,
}


def build_engine_with_tokenizer(root: str | Path, write_tokenizer: Callable[[Path], Path]) -> tuple[Path, Path]:
    """A tiny random HF checkpoint (`make_hf_checkpoint`, TINY_VOCAB) whose tokenizer files are
    replaced by `write_tokenizer`'s, and its fp32 ONNX Runtime engine: (checkpoint, engine)."""
    from tiny_models import make_hf_checkpoint, tiny_config

    from llamaforge.build.builder import BuildOptions, build_engine

    root = Path(root)
    ckpt = make_hf_checkpoint(root / "ckpt", tiny_config())
    write_tokenizer(ckpt)
    return ckpt, build_engine(BuildOptions(checkpoint=ckpt, out=root / "engine"))
