"""`/v1/chat/completions` of a real `llamaforge serve` process, through the official `openai` client,
on an engine whose checkpoint has a real chat template (Llama 3.1 Instruct's): greedy parity with
transformers' `generate` on `apply_chat_template`'s ids, streaming, usage, and the errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from real_tokenizer_configs import build_engine_with_tokenizer, write_llama3_instruct
from server_process import ServerProcess, serve_process

pytestmark = pytest.mark.slow

MESSAGES: list[Any] = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def main():"}]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def llama31(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_engine_with_tokenizer(tmp_path_factory.mktemp("llama31"), write_llama3_instruct)


@pytest.fixture(scope="module")
def server(llama31: tuple[Path, Path]) -> Iterator[ServerProcess]:
    with serve_process(llama31[1], "--max-num-seqs", "2", "--max-queue", "8", "--kv-budget-tokens", "1024") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def reference(llama31: tuple[Path, Path]) -> tuple[int, str, str]:
    """transformers' greedy answer: (prompt tokens, text, finish reason)."""
    import torch
    from tiny_models import load_hf_oracle
    from transformers import AutoTokenizer

    ckpt, _ = llama31
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    out = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    hf = load_hf_oracle(ckpt)
    eos = hf.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    prompt = torch.tensor([ids])
    with torch.no_grad():
        gen = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=NEW_TOKENS,
                          pad_token_id=min(eos))[0, len(ids):].tolist()
    stopped = bool(gen) and gen[-1] in eos
    text = tok.decode(gen[:-1] if stopped else gen, skip_special_tokens=True)
    return len(ids), text, "stop" if stopped else "length"


def test_greedy_chat_matches_transformers_generate(client: openai.OpenAI, model: str,
                                                   reference: tuple[int, str, str]) -> None:
    num_prompt, text, reason = reference
    assert text  # the reference says something, so the comparison means something
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=NEW_TOKENS,
                                       temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert (choice.message.content, choice.finish_reason) == (text, reason)
    assert r.usage is not None and r.usage.prompt_tokens == num_prompt
    assert r.usage.total_tokens == num_prompt + r.usage.completion_tokens
    # max_tokens (the older name) means the same.
    again = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=NEW_TOKENS, temperature=0)
    assert again.choices[0].message.content == text


def test_streamed_chat_has_a_role_chunk_and_the_same_text(client: openai.OpenAI, model: str,
                                                          reference: tuple[int, str, str]) -> None:
    num_prompt, text, reason = reference
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=NEW_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content is None and first.finish_reason is None
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == text
    assert [c.choices[0].finish_reason for c in with_choices][-1] == reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == num_prompt


def test_n_chat_choices_unary_and_streamed(client: openai.OpenAI, model: str) -> None:
    """n = 2: two choices (the first the n = 1 answer with the seed), the prompt counted once; a
    stream has a role chunk per choice, and each index's deltas concatenate to its unary content."""
    args: dict[str, Any] = dict(model=model, messages=MESSAGES, max_completion_tokens=8, temperature=1.0, seed=5)
    one = client.chat.completions.create(**args)
    two = client.chat.completions.create(**args, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content == one.choices[0].message.content
    assert two.usage is not None and one.usage is not None and two.usage.prompt_tokens == one.usage.prompt_tokens
    roles, texts, reasons = set(), {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(**args, n=2, stream=True):
        for c in chunk.choices:
            if c.delta.role:
                roles.add(c.index)
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    assert roles == {0, 1} and texts == {c.index: c.message.content for c in two.choices}
    assert reasons == {c.index: c.finish_reason for c in two.choices}


def test_chat_logprobs_and_seed(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=4, temperature=0,
                                       logprobs=True)
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and r.usage is not None and len(content) == r.usage.completion_tokens
    assert all(t.logprob <= 0.0 and t.top_logprobs == [] for t in content)
    args: dict[str, Any] = dict(model=model, messages=MESSAGES, max_completion_tokens=8, temperature=1.0, seed=7)
    assert client.chat.completions.create(**args).choices[0].message.content == \
        client.chat.completions.create(**args).choices[0].message.content
    # top_logprobs: each token's k most likely alternatives, most likely first, with their bytes; the
    # same in a stream; with penalties and a bias too (they shape the distribution the k come from).
    for extra in ({}, {"presence_penalty": 1.0, "frequency_penalty": 0.5, "logit_bias": {"100": 3}}):
        top = client.chat.completions.create(**args, logprobs=True, top_logprobs=4, **extra)
        content = top.choices[0].logprobs.content  # type: ignore[union-attr]
        assert content is not None and len(content) == top.usage.completion_tokens  # type: ignore[union-attr]
        for t in content:
            alternatives = [a.logprob for a in t.top_logprobs]
            assert len(alternatives) == 4 and alternatives == sorted(alternatives, reverse=True)
            assert all(bytes(a.bytes or []).decode("utf-8", "replace") == a.token for a in t.top_logprobs)
            assert t.logprob <= alternatives[0] and (t.logprob < alternatives[-1] or
                                                     any(a.token == t.token for a in t.top_logprobs))
        streamed = [c for chunk in client.chat.completions.create(**args, logprobs=True, top_logprobs=4, stream=True,
                                                                   **extra)
                    for choice in chunk.choices if choice.logprobs and choice.logprobs.content
                    for c in choice.logprobs.content]
        assert [(c.token, c.logprob, [a.logprob for a in c.top_logprobs]) for c in streamed] == \
            [(c.token, c.logprob, [a.logprob for a in c.top_logprobs]) for c in content]


def test_chat_structured_output(client: openai.OpenAI, model: str) -> None:
    """response_format on /v1/chat/completions: json_schema (strict) and json_object, sampled."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "score": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["answer", "score"], "additionalProperties": False}
    for seed in range(3):
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=48, temperature=1.0,
                                           seed=seed, response_format={"type": "json_schema", "json_schema": {
                                               "name": "verdict", "schema": schema, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=48, temperature=0,
                                       response_format={"type": "json_object"})
    assert (r.choices[0].message.content or "").startswith("{")


def test_chat_errors(client: openai.OpenAI, model: str) -> None:
    tools: Any = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for kwargs, param in (({"tools": tools}, "tools"), ({"response_format": {"type": "json_schema", "json_schema": {
                              "name": "x", "schema": {"type": "objectx"}}}}, "response_format"),
                          ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"presence_penalty": 3.0},
                                                                                     "presence_penalty"),
                          ({"max_completion_tokens": 100_000}, "max_completion_tokens")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=MESSAGES, **kwargs)
        assert e.value.param == param, kwargs
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    assert e.value.param == "messages[0].content[0]"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="llama", messages=MESSAGES)
