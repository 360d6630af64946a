"""The OpenAI-compatible HTTP front end of a real `llamaforge serve` process, driven by the official
`openai` client: completions unary and streaming, greedy parity with the engine, stop strings, seeds,
usage, errors, and 32 concurrent streams, some disconnecting, with the KV cache all free after."""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from server_process import ServerProcess, serve_process

from llamaforge.runtime.core.engine import Engine
from llamaforge.runtime.core.generate import generate_ids

pytestmark = pytest.mark.slow

PROMPT = "def main("


@pytest.fixture(scope="module")
def server(tiny_engine: Path) -> Iterator[ServerProcess]:
    with serve_process(tiny_engine, "--max-num-seqs", "4", "--max-queue", "64", "--kv-budget-tokens", "2048") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    models = client.models.list().data
    assert len(models) == 1 and models[0].object == "model"
    return models[0].id


@pytest.fixture(scope="module")
def engine(tiny_engine: Path) -> Engine:
    return Engine(tiny_engine)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _streamed(client: openai.OpenAI, **kwargs: Any) -> tuple[str, list[str | None], Any]:
    """(concatenated text, finish reasons in order, usage of the last chunk) of a streamed completion."""
    text, reasons, usage = [], [], None
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            text.append(c.text)
            reasons.append(c.finish_reason)
        usage = chunk.usage or usage
    return "".join(text), reasons, usage


def test_health_on_the_http_port(server: ServerProcess, model: str) -> None:
    assert _status(f"{server.root_url}/v2/health/live") == 200
    assert _status(f"{server.root_url}/v2/health/ready") == 200
    assert _status(f"{server.base_url}/models/{model}") == 200


def test_greedy_completion_is_the_engines_and_the_stream_concatenates_to_it(
        client: openai.OpenAI, model: str, engine: Engine) -> None:
    assert engine.tokenizer is not None
    ids = engine.tokenizer.encode(PROMPT)
    want = generate_ids(engine, [ids], 12, stop_at_eos=True)[0]
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.model == model and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.text == engine.tokenizer.decode(want.output_ids)
    assert choice.finish_reason == ("length" if len(want.output_ids) == 12 else "stop")
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want.output_ids))
    assert r.usage.total_tokens == len(ids) + len(want.output_ids)
    text, reasons, usage = _streamed(client, model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                     stream_options={"include_usage": True})
    assert text == choice.text and reasons[-1] == choice.finish_reason and set(reasons[:-1]) <= {None}
    assert usage == r.usage
    # Token ids and a list of prompts: one choice per prompt, in order.
    r2 = client.completions.create(model=model, prompt=[ids, PROMPT], max_tokens=12, temperature=0)
    assert [c.index for c in r2.choices] == [0, 1] and {c.text for c in r2.choices} == {choice.text}
    assert r2.usage is not None and r2.usage.prompt_tokens == 2 * len(ids)


def test_stop_strings_cut_the_text_before_them(client: openai.OpenAI, model: str) -> None:
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    assert len(full) >= 6, full
    stop = full[len(full) // 2:len(full) // 2 + 2]
    want = full[:full.index(stop)]
    for stops in (stop, ["\x00never", stop]):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=stops)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
        text, reasons, _ = _streamed(client, model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=stops)
        assert (text, reasons[-1]) == (want, "stop")


def test_a_seed_reproduces_a_sampled_completion(client: openai.OpenAI, model: str) -> None:
    args: dict[str, Any] = dict(model=model, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.95)
    first = client.completions.create(seed=1234, **args).choices[0].text
    assert client.completions.create(seed=1234, **args).choices[0].text == first
    assert _streamed(client, seed=1234, **args)[0] == first
    others = {client.completions.create(seed=s, **args).choices[0].text for s in range(5)}
    assert len(others) > 1  # sampling does sample


def test_echo_and_logprobs(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    assert r.choices[0].text == PROMPT + plain
    lp = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0)
    logprobs = lp.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.tokens is not None
    assert len(logprobs.token_logprobs) == lp.usage.completion_tokens  # type: ignore[union-attr]
    assert all(x <= 0.0 for x in logprobs.token_logprobs)


class _OpenAIPenalties:
    """OpenAI's presence / frequency penalties as a transformers logits processor (the reference):
    counts over the tokens after the prompt only."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt_len:]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def test_penalties_bias_min_p_and_top_logprobs(client: openai.OpenAI, model: str, engine: Engine,
                                               tiny_hf_checkpoint: Path) -> None:
    """presence / frequency penalties: greedy equals transformers' generate with OpenAI's formula as
    its logits processor; logit_bias +100 forces a token; min_p (vLLM's extension) keeps only tokens
    within min_p of the most likely; logprobs: k gives the step's k alternatives (+ the sampled one)."""
    import torch
    from tiny_models import load_hf_oracle
    from transformers import LogitsProcessorList

    assert engine.tokenizer is not None
    ids = engine.tokenizer.encode(PROMPT)
    hf = load_hf_oracle(tiny_hf_checkpoint)
    prompt = torch.tensor([ids])
    with torch.no_grad():
        want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=24,
                           logits_processor=LogitsProcessorList([_OpenAIPenalties(len(ids), 0.7, 1.1)]),
                           pad_token_id=0)[0, len(ids):].tolist()
    r = client.completions.create(model=model, prompt=ids, max_tokens=24, temperature=0, presence_penalty=0.7,
                                  frequency_penalty=1.1, logprobs=3)
    got_text = r.choices[0].text
    stop = next((i for i, t in enumerate(want) if t in engine.eos_ids), len(want))
    assert got_text == engine.tokenizer.decode(want[:stop])
    lp = r.choices[0].logprobs
    assert lp is not None and lp.top_logprobs is not None and lp.token_logprobs is not None and lp.tokens is not None
    for token, token_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # Greedy: the sampled token is the most likely. Alternatives whose texts are the same (byte
        # pieces of one character: "\ufffd") share a key of this legacy format, so there may be fewer.
        assert 1 <= len(top) <= 4 and max(top.values()) == token_lp == top[token]
    # logit_bias: +100 on one token makes it every greedy pick.
    forced = engine.tokenizer.encode("x", add_bos=False)[-1]
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, logit_bias={str(forced): 100})
    assert r.choices[0].text == engine.tokenizer.decode([forced] * 5)
    # min_p: every alternative still possible is within min_p of the step's most likely token.
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3, logprobs=5,
                                  extra_body={"min_p": 0.3})
    lp = r.choices[0].logprobs
    assert lp is not None and lp.top_logprobs is not None
    for top in lp.top_logprobs:
        best = max(top.values())
        assert all(v >= best + np.log(0.3) - 1e-9 or v == -9999.0 for v in top.values()), top
    assert r.choices[0].text == client.completions.create(
        model=model, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=3, logprobs=5,
        extra_body={"min_p": 0.3}).choices[0].text


GUIDED_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                 "n": {"type": "integer", "minimum": 0, "maximum": 99}},
                 "required": ["name", "n"], "additionalProperties": False}


def test_structured_output(client: openai.OpenAI, model: str) -> None:
    """response_format json_schema (strict) and json_object, and vLLM's structured_outputs regex,
    sampled at temperature 1, unary and streamed: every output validates; a schema or regex that
    does not compile is a 400 naming the field, with the compiler's message."""
    import json

    import jsonschema

    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": GUIDED_SCHEMA, "strict": True}}
    for seed in range(4):
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=64, temperature=1.0, seed=seed,
                                      extra_body={"response_format": fmt})
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].text), GUIDED_SCHEMA)
        text, reasons, _ = _streamed(client, model=model, prompt=PROMPT, max_tokens=64, temperature=1.0, seed=seed,
                                     extra_body={"response_format": fmt})
        assert text == r.choices[0].text and reasons[-1] == "stop"
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=64, temperature=1.0, seed=seed,
                                      extra_body={"structured_outputs": {"regex": r"[a-z]{3}-[0-9]{2}"}})
        assert re.fullmatch(r"[a-z]{3}-[0-9]{2}", r.choices[0].text), r.choices[0].text
    obj = client.completions.create(model=model, prompt=PROMPT, max_tokens=64, temperature=0,
                                    extra_body={"response_format": {"type": "json_object"}}).choices[0]
    assert obj.finish_reason != "stop" or isinstance(json.loads(obj.text), dict)
    assert obj.text.startswith("{")
    for extra, param, message in (
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
             "response_format", "objectx"),
            ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex", "unclosed character class")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt=PROMPT, max_tokens=8, extra_body=extra)
        assert e.value.param == param and message in e.value.message, e.value.message


def test_n_choices_per_prompt_share_it_and_follow_the_seed(client: openai.OpenAI, model: str) -> None:
    """n = 3 over two prompts: choices prompt * 3 + sequence, the first of each prompt's the n = 1
    completion with the same seed, the others their own streams; each prompt counted once in the
    usage; streamed, the chunks of each index concatenate to its unary text."""
    prompts = [PROMPT, "class Config:"]
    kw: dict[str, Any] = {"model": model, "max_tokens": 10, "temperature": 1.0, "seed": 11, "logprobs": 0}
    many = client.completions.create(prompt=prompts, n=3, **kw)
    assert [c.index for c in many.choices] == list(range(6))
    singles = [client.completions.create(prompt=p, **kw) for p in prompts]
    assert [many.choices[0].text, many.choices[3].text] == [s.choices[0].text for s in singles]
    assert len({c.text for c in many.choices[:3]}) > 1  # each sequence samples on its own
    assert many.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert many.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in many.choices)
    texts: dict[int, str] = {}
    for chunk in client.completions.create(prompt=prompts, n=3, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in many.choices}


def test_errors_reach_the_client_in_openais_schema(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, n=0)
    assert e.value.param == "n" and e.value.status_code == 400
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=100_000)
    assert e.value.param == "max_tokens" and "context length" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model, prompt=PROMPT, extra_body={"min_p": 1.5})  # vLLM's extension
    assert e.value.param == "min_p" and e.value.status_code == 400
    for kwargs, param in (({"logprobs": 21}, "logprobs"), ({"presence_penalty": 2.5}, "presence_penalty"),
                          ({"frequency_penalty": -2.5}, "frequency_penalty"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                          ({"logit_bias": {"3": 150}}, "logit_bias"), ({"logit_bias": {"100000": 1}}, "logit_bias")):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model=model, prompt=PROMPT, **kwargs)
        assert e.value.param == param, kwargs
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    assert nf.value.code == "model_not_found" and nf.value.param == "model"


def test_32_concurrent_streams_some_disconnecting_leave_the_kv_cache_free(
        server: ServerProcess, client: openai.OpenAI, model: str) -> None:
    cancelled_before = _outcome(server, "cancelled")
    results: dict[int, tuple[str, str | None]] = {}
    errors: list[BaseException] = []
    expected = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0).choices[0]
    # The disconnecting streams ask for nearly the whole context, with EOS held off by min_tokens, so
    # none can end before its client goes: a client thread starved among 32 on a loaded machine may
    # read its second chunk long after the server sent it (200 tokens once finished first there).
    long_tokens = {"max_tokens": 480, "extra_body": {"min_tokens": 480}}
    long = client.completions.create(model=model, prompt=PROMPT, temperature=0, **long_tokens).choices[0]
    assert long.finish_reason == "length"

    def run(i: int) -> None:
        try:
            own = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
            disconnect = i % 4 == 0
            size: dict[str, Any] = long_tokens if disconnect else {"max_tokens": 16}
            stream = own.completions.create(model=model, prompt=PROMPT, temperature=0, stream=True, **size)
            pieces, reason = [], None
            for n, chunk in enumerate(stream):
                pieces.append(chunk.choices[0].text)
                reason = chunk.choices[0].finish_reason
                if disconnect and n == 1:
                    stream.close()  # the client goes away mid-stream
                    break
            results[i] = ("".join(pieces), reason)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert len(results) == 32
    for i, (text, reason) in results.items():
        if i % 4:
            assert (text, reason) == (expected.text, expected.finish_reason), i
    # Every disconnected stream was cancelled in the core, and all the KV is free again.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (server.metric("llamaforge_kv_cache_free_fraction") == 1.0
                and server.metric("llamaforge_running_sequences") == 0
                and _outcome(server, "cancelled") - cancelled_before == 8):
            break
        time.sleep(0.05)
    assert server.metric("llamaforge_kv_cache_free_fraction") == 1.0
    assert server.metric("llamaforge_kv_cache_used_tokens") == 0
    assert server.metric("llamaforge_running_sequences") == 0 and server.metric("llamaforge_queue_depth") == 0
    assert _outcome(server, "cancelled") - cancelled_before == 8


def _outcome(server: ServerProcess, outcome: str) -> float:
    import re

    m = re.search(rf'^llamaforge_requests_total{{outcome="{outcome}"}} (\S+)$', server.metrics(), re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_a_repeated_prompt_reports_its_cached_tokens(client: openai.OpenAI, model: str, server: ServerProcess) -> None:
    """Prefix caching seen from outside: usage.prompt_tokens_details.cached_tokens (OpenAI's field),
    the Prometheus counters, and the same answer either way."""
    prompt = "class PrefixCache:\n    def lookup(self, tokens):\n        " * 4
    hits_before = server.metric("llamaforge_prefix_cache_hits_tokens_total")
    first = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    second = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    assert first.usage is not None and second.usage is not None
    n = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details is not None and first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    assert second.choices[0].text == first.choices[0].text
    assert server.metric("llamaforge_prefix_cache_hits_tokens_total") - hits_before == (n - 1) // 16 * 16
    assert server.metric("llamaforge_prefix_cache_queries_tokens_total") >= 2 * n
    assert server.metric("llamaforge_kv_cache_cached_free_tokens") > 0
