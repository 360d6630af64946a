"""OpenAI's `/v1/completions` and `/v1/chat/completions` request bodies as engine-core requests, and
the response, chunk and error bodies (the HTTP routes themselves are runtime/serving/openai_server.py).

Parsing is strict: a parameter this server takes is honoured; a parameter of OpenAI's API that the
core cannot honour yet (`n` > 1, `best_of` > 1, tools, `suffix`, prompt log probabilities) and any
field that is neither OpenAI's nor one of vLLM's extensions taken here (`min_p`, `min_tokens`,
and `structured_outputs` for a regex or a grammar) is a `RequestError` naming it, which the server
answers 400 with `param` set. The prompt, `max_tokens` and context checks are
`runtime/core/validation.py`'s, as for gRPC; a structured-output guide is compiled (and refused,
naming its field) when the core is given the request.

Log probs (`logprobs`, chat `top_logprobs`, completions `logprobs: k`, at most MAX_TOP_LOGPROBS)
are those of the distribution each token was drawn from (runtime/core/sampling.py); a token that
distribution excludes (top_k, top_p, min_p, a ban) has log prob -inf, written -9999.0 as vLLM
writes it (JSON has no infinity).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llamaforge.runtime.core.guided import GuidedSpec
from llamaforge.runtime.core.mllama_image import ImageInput
from llamaforge.runtime.core.requests import GenerationOutput, GenerationRequest, RequestError
from llamaforge.runtime.core.sampling import MAX_TOP_LOGPROBS, SamplingParams
from llamaforge.runtime.core.tokenizer import Tokenizer
from llamaforge.runtime.core.validation import (
    RequestLimits,
    check_context,
    check_logit_bias,
    check_max_tokens,
    check_prompt_ids,
)

__all__ = ["OpenAIRequest", "PromptJob", "parse_completion", "parse_chat", "error_body", "usage_body",
           "completion_body", "chat_body", "completion_chunk", "chat_chunk", "MAX_LOGPROBS"]

MAX_LOGPROBS = MAX_TOP_LOGPROBS  # OpenAI's bound on top_logprobs (and here on the completions logprobs)
_MINUS_INF_LOGPROB = -9999.0  # vLLM's stand-in for a log prob of -inf

_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "logprobs",
           "user", "n", "presence_penalty", "frequency_penalty", "logit_bias", "min_p", "response_format",
           "structured_outputs", "min_tokens"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools",
                          "tool_choice", "parallel_tool_calls", "functions", "function_call"}


@dataclass
class PromptJob:
    """One prompt of a request, as the core will run it. `echo`: text to put before the completion."""

    index: int
    generation: GenerationRequest
    echo: str = ""


@dataclass
class OpenAIRequest:
    kind: str  # "completion" | "chat"
    model: str
    jobs: list[PromptJob]
    stream: bool
    include_usage: bool
    logprobs: bool
    response_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    n: int = 1  # choices per prompt: prompt i's sequence j is choice i * n + j (vLLM's numbering)

    def choice_index(self, job: PromptJob, sequence_index: int) -> int:
        return job.index * self.n + sequence_index

    def choices(self) -> list[tuple[int, PromptJob]]:
        """Every choice's index with the prompt it continues, in index order."""
        return [(self.choice_index(job, i), job) for job in self.jobs for i in range(self.n)]


# -- field readers ---------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(name, f"expected a number, got {_type_name(value)}")
    if value > hi or value < lo or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise RequestError(name, f"must be in {bound}, got {value}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"expected an integer, got {_type_name(value)}")
    return value


def _boolean(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(name, f"expected a boolean, got {_type_name(value)}")
    return value


def _refuse_unless(body: Mapping[str, Any], name: str, allowed: Sequence[Any], why: str) -> None:
    """`name` is absent or one of `allowed` (the values that mean what the core does anyway)."""
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or value not in allowed):
        raise RequestError(name, f"{value!r} is not supported: {why}")


def _check_fields(body: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(unknown[0], "unknown parameter (this server refuses parameters it would otherwise ignore)")


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise RequestError("stop", "expected a string or a list of strings")
    return tuple(s for s in value if s)


def _logit_bias(body: Mapping[str, Any], vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: an object from token ids (as strings) to a bias in [-100, 100]."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RequestError("logit_bias", f"expected an object of token id -> bias, got {_type_name(value)}")
    pairs = []
    for key in value:
        try:
            token = int(key)
        except ValueError:
            raise RequestError("logit_bias", f"key {key!r} is not a token id") from None
        bias = value[key]
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise RequestError("logit_bias", f"the bias of token {key} must be a number in [-100, 100], got {bias!r}")
        pairs.append((token, float(bias)))
    check_logit_bias(pairs, vocab_size)
    return tuple(pairs)


def _sampling(body: Mapping[str, Any], vocab_size: int) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**64:
        raise RequestError("seed", f"must be in [0, 2**64), got {seed}")
    return SamplingParams(temperature=temperature, top_p=top_p, seed=seed,
                          presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
                          frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                          min_p=_number(body, "min_p", 0.0, 0.0, 1.0), logit_bias=_logit_bias(body, vocab_size))


def _stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError("stream_options", "only allowed when stream is true")
    if not isinstance(options, dict):
        raise RequestError("stream_options", f"expected an object, got {_type_name(options)}")
    extra = sorted(set(options) - {"include_usage"})
    if extra:
        raise RequestError(f"stream_options.{extra[0]}", "unknown parameter")
    return _boolean(options, "include_usage")


def _choices_per_prompt(body: Mapping[str, Any]) -> int:
    """`n`: sequences sampled from each prompt, which is computed once (the engine core forks its KV)."""
    n = _integer(body, "n")
    if n is None:
        return 1
    if n < 1:
        raise RequestError("n", f"must be >= 1, got {n}")
    return n


def _check_user(body: Mapping[str, Any]) -> None:
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError("user", f"expected a string, got {_type_name(user)}")


def _response_format(body: Mapping[str, Any]) -> GuidedSpec | None:
    """OpenAI's `response_format`: text (no constraint), json_object (any JSON object) or
    json_schema ({"name", "schema", "strict", "description"}); the output is held to the schema
    whether `strict` is true or not, as vLLM holds it."""
    value = body.get("response_format")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError("response_format", f"expected an object, got {_type_name(value)}")
    kind = value.get("type")
    expected = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in expected:
        raise RequestError("response_format.type", f"expected one of {', '.join(expected)}, got {kind!r}")
    extra = sorted(set(value) - expected[kind])
    if extra:
        raise RequestError(f"response_format.{extra[0]}", f"unknown field for type {kind}")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedSpec("json_schema", '{"type": "object"}', field="response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestError("response_format.json_schema", f"expected an object, got {_type_name(spec)}")
    extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if extra:
        raise RequestError(f"response_format.json_schema.{extra[0]}", "unknown field")
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise RequestError("response_format.json_schema.name", "required: a non-empty string")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise RequestError("response_format.json_schema.strict", f"expected a boolean, got {_type_name(spec['strict'])}")
    schema = spec.get("schema", {"type": "object"})  # OpenAI: no schema is any JSON object
    if not isinstance(schema, (dict, bool)):
        raise RequestError("response_format.json_schema.schema", f"expected an object, got {_type_name(schema)}")
    return GuidedSpec("json_schema", json.dumps(schema), field="response_format")


_STRUCTURED_KINDS = {"json": "json_schema", "regex": "regex", "grammar": "ebnf_grammar"}


def _structured_outputs(body: Mapping[str, Any]) -> GuidedSpec | None:
    """vLLM's extension `structured_outputs`: exactly one of json (a schema), regex or grammar
    (GBNF / EBNF or Lark): the kinds `response_format` cannot ask for."""
    value = body.get("structured_outputs")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError("structured_outputs", f"expected an object, got {_type_name(value)}")
    given = [k for k in value if value[k] is not None]
    unknown = sorted(set(given) - set(_STRUCTURED_KINDS))
    if unknown:
        raise RequestError(f"structured_outputs.{unknown[0]}", f"expected one of {', '.join(_STRUCTURED_KINDS)}")
    if len(given) != 1:
        raise RequestError("structured_outputs", f"give exactly one of {', '.join(_STRUCTURED_KINDS)}")
    (key,) = given
    guide = value[key]
    field = f"structured_outputs.{key}"
    if key == "json" and isinstance(guide, (dict, bool)):
        guide = json.dumps(guide)
    if not isinstance(guide, str):
        raise RequestError(field, f"expected a string, got {_type_name(guide)}")
    return GuidedSpec(_STRUCTURED_KINDS[key], guide, field=field)


def _guided(body: Mapping[str, Any]) -> GuidedSpec | None:
    fmt, structured = _response_format(body), _structured_outputs(body)
    if fmt is not None and structured is not None:
        raise RequestError("structured_outputs", "give either response_format or structured_outputs, not both")
    return fmt or structured


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("model", "required: the name of a served model (GET /v1/models)")
    return model


def _max_tokens(body: Mapping[str, Any], names: Sequence[str]) -> tuple[int | None, str]:
    """The first of `names` that is set, and its name (the field errors then name)."""
    for name in names:
        value = _integer(body, name)
        if value is not None:
            check_max_tokens(value, name)
            return value, name
    return None, names[0]


def _min_tokens(body: Mapping[str, Any]) -> int:
    """vLLM's extension: no end id before this many tokens."""
    value = _integer(body, "min_tokens") or 0
    if value < 0:
        raise RequestError("min_tokens", f"must be >= 0, got {value}")
    return value


def _generation(prompt_ids: list[int], body: Mapping[str, Any], limits: RequestLimits, prompt_field: str,
                max_names: Sequence[str], stream: bool, logprobs: bool, top_logprobs: int,
                n: int = 1) -> GenerationRequest:
    check_prompt_ids(prompt_ids, limits.vocab_size, prompt_field, limits.image_token_id)
    max_tokens, max_field = _max_tokens(body, max_names)
    if max_tokens is None:  # vLLM's default: whatever the context (here: and the whole KV cache) leaves
        room = min(limits.context_length, limits.kv_tokens or limits.context_length)
        max_tokens = max(1, room - len(prompt_ids))
    check_context(len(prompt_ids), max_tokens, limits, prompt_field, max_field)
    min_tokens = _min_tokens(body)
    if min_tokens > max_tokens:
        raise RequestError("min_tokens", f"must be at most {max_field}={max_tokens}, got {min_tokens}")
    return GenerationRequest(request_id=uuid.uuid4().hex, prompt_ids=prompt_ids, max_tokens=max_tokens,
                             min_tokens=min_tokens,
                             sampling=_sampling(body, limits.vocab_size), stop_words=_stops(body), stream=stream,
                             return_log_probs=logprobs, top_logprobs=top_logprobs, guided=_guided(body), n=n)


# -- /v1/completions -----------------------------------------------------------------------------------------


def _prompts(value: Any, tokenizer: Tokenizer | None) -> list[tuple[list[int], str | None]]:
    """`prompt` as (ids, text) pairs: a string, a list of token ids, or a list of either."""
    def one(p: Any, where: str) -> tuple[list[int], str | None]:
        if isinstance(p, str):
            if tokenizer is None:
                raise RequestError(where, "this engine has no tokenizer: send token ids")
            return tokenizer.encode(p, add_bos=True, allow_special=True), p
        if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p), None
        raise RequestError(where, "expected a string or a list of token ids")

    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, int) for t in value)):
        return [one(value, "prompt")]
    if isinstance(value, list) and value:
        return [one(p, "prompt") for p in value]
    raise RequestError("prompt", "required: a string, a list of token ids, or a non-empty list of either")


def parse_completion(body: Mapping[str, Any], tokenizer: Tokenizer | None, limits: RequestLimits) -> OpenAIRequest:
    _check_fields(body, _COMPLETION_FIELDS)
    model = _model(body)
    _check_user(body)
    n = _choices_per_prompt(body)
    _refuse_unless(body, "best_of", [n], "as many candidates as choices, n (ranking best_of > n candidates is "
                                         "not implemented)")
    _refuse_unless(body, "suffix", [""], "insertion (suffix) is not implemented")
    stream = _boolean(body, "stream")
    include_usage = _stream_options(body, stream)
    logprobs = _integer(body, "logprobs")  # the legacy API's: how many top log probs per token
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise RequestError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {logprobs}")
    echo = _boolean(body, "echo")
    if echo and logprobs is not None:
        raise RequestError("echo", "echo with logprobs needs the prompt's log probabilities, which the core does "
                                   "not compute")
    jobs = []
    for index, (ids, text) in enumerate(_prompts(body.get("prompt"), tokenizer)):
        gen = _generation(ids, body, limits, "prompt", ("max_tokens",), stream, logprobs is not None, logprobs or 0, n)
        echoed = ""
        if echo:
            echoed = text if text is not None else (tokenizer.decode(ids) if tokenizer is not None else "")
        jobs.append(PromptJob(index, gen, echoed))
    return OpenAIRequest("completion", model, jobs, stream, include_usage, logprobs is not None,
                         f"cmpl-{uuid.uuid4().hex}", n=n)


# -- /v1/chat/completions ------------------------------------------------------------------------------------

_ROLES = ("system", "developer", "user", "assistant", "tool")


def _content(value: Any, where: str, images: list[ImageInput] | None) -> str | list[dict[str, Any]]:
    """A message's content: a string, or text parts (joined), as vLLM joins them. With `images` (a
    vision model's request): `image_url` parts too, decoded into `images`; a message with one is
    the part list the chat template takes ({"type": "text", "text": ...} and {"type": "image"},
    in order)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts, parts = [], []
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else _type_name(part)
            if kind == "image_url" and isinstance(part, dict):
                if images is None:
                    raise RequestError(f"{where}[{i}]", "this model is text-only: it takes no images")
                images.append(image_input(part.get("image_url"), f"{where}[{i}].image_url"))
                parts.append({"type": "image"})
                continue
            if not isinstance(part, dict) or kind != "text" or not isinstance(part.get("text"), str):
                also = " and image_url" if images is not None else ""
                raise RequestError(f"{where}[{i}]", f"content part of type {kind!r} is not supported (text{also} only)")
            texts.append(part["text"])
            parts.append({"type": "text", "text": part["text"]})
        return parts if any(p["type"] == "image" for p in parts) else "\n".join(texts)
    raise RequestError(where, f"expected a string or a list of text parts, got {_type_name(value)}")


def image_input(value: Any, where: str) -> ImageInput:
    """An `image_url` part's image: {"url": "data:image/...;base64,..."} (the server fetches no URL)."""
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise RequestError(where, f"expected {{'url': 'data:image/...;base64,...'}}, got {_type_name(value)}")
    return ImageInput(where, data_url_bytes(url, where))


def data_url_bytes(url: str, where: str) -> bytes:
    """The bytes of a base64 `data:` URL (RFC 2397); other URLs are refused: the server fetches nothing."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise RequestError(where, "http(s) image URLs are not fetched (this server makes no outgoing requests): send "
                                  "the image inline as a data: URL, data:image/png;base64,...")
    if scheme != "data":
        raise RequestError(where, "expected a data: URL (data:image/png;base64,...)")
    head, comma, payload = url[5:].partition(",")
    if not comma or not head.lower().endswith(";base64"):
        raise RequestError(where, "expected a base64 data: URL (data:image/png;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(where, "the data: URL's payload is not valid base64") from None


def _messages(value: Any, images: list[ImageInput] | None = None) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages", "required: a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(where, f"expected an object, got {_type_name(m)}")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            why = "tool calling is not implemented" if extra[0] in ("tool_calls", "tool_call_id", "function_call") \
                else "unknown field"
            raise RequestError(f"{where}.{extra[0]}", why)
        role = m.get("role")
        if role not in _ROLES:
            raise RequestError(f"{where}.role", f"expected one of {', '.join(_ROLES)}, got {role!r}")
        content = m.get("content")
        message: dict[str, Any] = {"role": role, "content": "" if content is None and role == "assistant"
                                   else _content(content, f"{where}.content", images)}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise RequestError(f"{where}.name", "expected a string")
            message["name"] = m["name"]
        messages.append(message)
    return messages


def parse_chat(body: Mapping[str, Any], tokenizer: Tokenizer | None, limits: RequestLimits) -> OpenAIRequest:
    _check_fields(body, _CHAT_FIELDS)
    model = _model(body)
    _check_user(body)
    for name in ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"):
        _refuse_unless(body, name, [], "tool calling is not implemented")
    stream = _boolean(body, "stream")
    include_usage = _stream_options(body, stream)
    logprobs = _boolean(body, "logprobs")
    top = _integer(body, "top_logprobs")
    if top is not None:
        if not logprobs:
            raise RequestError("top_logprobs", "needs logprobs: true")
        if not 0 <= top <= MAX_LOGPROBS:
            raise RequestError("top_logprobs", f"must be in [0, {MAX_LOGPROBS}], got {top}")
    n = _choices_per_prompt(body)
    images: list[ImageInput] | None = [] if limits.image_token_id is not None else None
    messages = _messages(body.get("messages"), images)
    _max_tokens(body, ("max_completion_tokens", "max_tokens"))  # every parameter is checked before the template runs
    _sampling(body, limits.vocab_size)
    _min_tokens(body)
    _stops(body)
    _guided(body)
    if tokenizer is None:
        raise RequestError("messages", "this engine has no tokenizer, so it has no chat template")
    if tokenizer.chat_template is None:
        raise RequestError("messages", "this model has no chat template; use /v1/completions")
    try:
        ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template's raise_exception() is the caller's error
        raise RequestError("messages", f"the chat template refused them: {e}") from None
    gen = _generation(ids, body, limits, "messages", ("max_completion_tokens", "max_tokens"), stream, logprobs,
                      top or 0, n)
    gen.images = tuple(images or ())  # preprocessed (and checked, naming each one's field) by the core
    return OpenAIRequest("chat", model, [PromptJob(0, gen)], stream, include_usage, logprobs,
                         f"chatcmpl-{uuid.uuid4().hex}", n=n)


# -- response bodies -----------------------------------------------------------------------------------------


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage_body(outputs: Sequence[GenerationOutput]) -> dict[str, Any]:
    """OpenAI's usage of the choices' final outputs: each prompt counted once (its n choices share
    it), with the prompt tokens found in the prefix cache as its `cached_tokens`."""
    firsts = [o for o in outputs if o.sequence_index == 0]
    prompt = sum(o.num_input_tokens for o in firsts)
    completion = sum(o.num_output_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in firsts)}}


def _token_text(tokenizer: Tokenizer | None, token_id: int) -> tuple[str, list[int]]:
    if tokenizer is None:
        return str(token_id), []
    raw = tokenizer.id_to_bytes(token_id)
    return raw.decode("utf-8", "replace"), list(raw)


def _finite(logprob: float) -> float:
    return max(logprob, _MINUS_INF_LOGPROB)


Tops = Sequence[Sequence[tuple[int, float]]]  # per token: its step's (token id, log prob), most likely first


def completion_logprobs(tokenizer: Tokenizer | None, ids: Sequence[int], logprobs: Sequence[float],
                        offset: int, tops: Tops = ()) -> dict[str, Any]:
    """The legacy completions `logprobs` object for `ids`; `offset`: their text's start in the choice.
    Each `top_logprobs` entry holds the step's top alternatives and, as OpenAI and vLLM do, the
    sampled token (so up to k + 1 entries)."""
    tokens, offsets, top_dicts = [], [], []
    for i, (t, lp) in enumerate(zip(ids, logprobs)):
        offsets.append(offset)
        text, _ = _token_text(tokenizer, t)
        tokens.append(text)
        offset += len(text)
        top: dict[str, float] = {}
        for a, alp in (tops[i] if i < len(tops) else ()):  # tokens of the same text: the most likely's
            top.setdefault(_token_text(tokenizer, a)[0], _finite(alp))
        top.setdefault(text, _finite(lp))
        top_dicts.append(top)
    return {"tokens": tokens, "token_logprobs": [_finite(lp) for lp in logprobs], "top_logprobs": top_dicts,
            "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer | None, ids: Sequence[int], logprobs: Sequence[float],
                  tops: Tops = ()) -> dict[str, Any]:
    content = []
    for i, (t, lp) in enumerate(zip(ids, logprobs)):
        text, raw = _token_text(tokenizer, t)
        alternatives = []
        for a, alp in (tops[i] if i < len(tops) else ()):
            a_text, a_raw = _token_text(tokenizer, a)
            alternatives.append({"token": a_text, "logprob": _finite(alp), "bytes": a_raw})
        content.append({"token": text, "logprob": _finite(lp), "bytes": raw, "top_logprobs": alternatives})
    return {"content": content}


def _head(req: OpenAIRequest, obj: str) -> dict[str, Any]:
    return {"id": req.response_id, "object": obj, "created": req.created, "model": req.model}


def completion_body(req: OpenAIRequest, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    return {**_head(req, "text_completion"), "choices": choices, "usage": usage}


def chat_body(req: OpenAIRequest, choices: list[dict[str, Any]], usage: dict[str, Any]) -> dict[str, Any]:
    return {**_head(req, "chat.completion"), "choices": choices, "usage": usage}


def completion_chunk(req: OpenAIRequest, choices: list[dict[str, Any]],
                     usage: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {**_head(req, "text_completion"), "choices": choices}
    if req.include_usage:
        body["usage"] = usage
    return body


def chat_chunk(req: OpenAIRequest, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {**_head(req, "chat.completion.chunk"), "choices": choices}
    if req.include_usage:
        body["usage"] = usage
    return body
