"""OpenAI's `/v1/completions` and `/v1/chat/completions` request bodies as engine-core requests, and
the response, chunk and error bodies (the HTTP routes themselves are runtime/serving/openai_server.py).

Parsing is strict: a parameter this server takes is honoured; a parameter of OpenAI's API that the
core cannot honour yet (`n` > 1, `best_of` > 1, penalties, `logit_bias`, `response_format` other
than text, tools, `suffix`, top log probabilities, prompt log probabilities) and any field that is
not OpenAI's is a `RequestError` naming it, which the server answers 400 with `param` set. The
prompt, `max_tokens` and context checks are `runtime/core/validation.py`'s, as for gRPC.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llamaforge.runtime.core.requests import GenerationOutput, GenerationRequest, RequestError
from llamaforge.runtime.core.sampling import SamplingParams
from llamaforge.runtime.core.tokenizer import Tokenizer
from llamaforge.runtime.core.validation import RequestLimits, check_context, check_max_tokens, check_prompt_ids

__all__ = ["OpenAIRequest", "PromptJob", "parse_completion", "parse_chat", "error_body", "usage_body",
           "completion_body", "chat_body", "completion_chunk", "chat_chunk", "MAX_LOGPROBS"]

MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs

_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "logprobs",
           "user", "n", "presence_penalty", "frequency_penalty", "logit_bias"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
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


def _sampling(body: Mapping[str, Any]) -> SamplingParams:
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**64:
        raise RequestError("seed", f"must be in [0, 2**64), got {seed}")
    return SamplingParams(temperature=temperature, top_p=top_p, seed=seed)


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


def _unsupported_common(body: Mapping[str, Any]) -> None:
    _refuse_unless(body, "n", [1], "one choice per prompt (n > 1 is not implemented yet)")
    for penalty in ("presence_penalty", "frequency_penalty"):
        _refuse_unless(body, penalty, [0.0], "penalties are not implemented yet")
    _refuse_unless(body, "logit_bias", [{}], "logit_bias is not implemented yet")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError("user", f"expected a string, got {_type_name(user)}")


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


def _generation(prompt_ids: list[int], body: Mapping[str, Any], limits: RequestLimits, prompt_field: str,
                max_names: Sequence[str], stream: bool, logprobs: bool) -> GenerationRequest:
    check_prompt_ids(prompt_ids, limits.vocab_size, prompt_field)
    max_tokens, max_field = _max_tokens(body, max_names)
    if max_tokens is None:  # vLLM's default: whatever the context (here: and the whole KV cache) leaves
        room = min(limits.context_length, limits.kv_tokens or limits.context_length)
        max_tokens = max(1, room - len(prompt_ids))
    check_context(len(prompt_ids), max_tokens, limits, prompt_field, max_field)
    return GenerationRequest(request_id=uuid.uuid4().hex, prompt_ids=prompt_ids, max_tokens=max_tokens,
                             sampling=_sampling(body), stop_words=_stops(body), stream=stream,
                             return_log_probs=logprobs)


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
    _unsupported_common(body)
    _refuse_unless(body, "best_of", [1], "one candidate per prompt (best_of > 1 is not implemented yet)")
    _refuse_unless(body, "suffix", [""], "insertion (suffix) is not implemented")
    stream = _boolean(body, "stream")
    include_usage = _stream_options(body, stream)
    logprobs = _integer(body, "logprobs")
    if logprobs is not None and logprobs != 0:
        raise RequestError("logprobs", f"{logprobs} is not supported: the core returns the sampled token's log "
                                       "probability only, so logprobs can be 0 (or null)")
    echo = _boolean(body, "echo")
    if echo and logprobs is not None:
        raise RequestError("echo", "echo with logprobs needs the prompt's log probabilities, which the core does "
                                   "not compute")
    jobs = []
    for index, (ids, text) in enumerate(_prompts(body.get("prompt"), tokenizer)):
        gen = _generation(ids, body, limits, "prompt", ("max_tokens",), stream, logprobs is not None)
        echoed = ""
        if echo:
            echoed = text if text is not None else (tokenizer.decode(ids) if tokenizer is not None else "")
        jobs.append(PromptJob(index, gen, echoed))
    return OpenAIRequest("completion", model, jobs, stream, include_usage, logprobs is not None,
                         f"cmpl-{uuid.uuid4().hex}")


# -- /v1/chat/completions ------------------------------------------------------------------------------------

_ROLES = ("system", "developer", "user", "assistant", "tool")


def _content(value: Any, where: str) -> str:
    """A message's content: a string, or text parts (joined), as vLLM joins them."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise RequestError(f"{where}[{i}]", f"content part of type {kind!r} is not supported (text only)")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError(where, f"expected a string or a list of text parts, got {_type_name(value)}")


def _messages(value: Any) -> list[dict[str, Any]]:
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
                                   else _content(content, f"{where}.content")}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise RequestError(f"{where}.name", "expected a string")
            message["name"] = m["name"]
        messages.append(message)
    return messages


def parse_chat(body: Mapping[str, Any], tokenizer: Tokenizer | None, limits: RequestLimits) -> OpenAIRequest:
    _check_fields(body, _CHAT_FIELDS)
    model = _model(body)
    _unsupported_common(body)
    _refuse_unless(body, "response_format", [{"type": "text"}], "structured output is not implemented yet")
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
        if top > 0:
            raise RequestError("top_logprobs", f"{top} is not supported: the core returns the sampled token's log "
                                               "probability only, so top_logprobs can be 0")
    messages = _messages(body.get("messages"))
    _max_tokens(body, ("max_completion_tokens", "max_tokens"))  # every parameter is checked before the template runs
    _sampling(body)
    _stops(body)
    if tokenizer is None:
        raise RequestError("messages", "this engine has no tokenizer, so it has no chat template")
    if tokenizer.chat_template is None:
        raise RequestError("messages", "this model has no chat template; use /v1/completions")
    try:
        ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - a template's raise_exception() is the caller's error
        raise RequestError("messages", f"the chat template refused them: {e}") from None
    gen = _generation(ids, body, limits, "messages", ("max_completion_tokens", "max_tokens"), stream, logprobs)
    return OpenAIRequest("chat", model, [PromptJob(0, gen)], stream, include_usage, logprobs,
                         f"chatcmpl-{uuid.uuid4().hex}")


# -- response bodies -----------------------------------------------------------------------------------------


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage_body(outputs: Sequence[GenerationOutput]) -> dict[str, Any]:
    """OpenAI's usage, with the prompt tokens found in the prefix cache as its `cached_tokens`."""
    prompt = sum(o.num_input_tokens for o in outputs)
    completion = sum(o.num_output_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)}}


def _token_text(tokenizer: Tokenizer | None, token_id: int) -> tuple[str, list[int]]:
    if tokenizer is None:
        return str(token_id), []
    raw = tokenizer.id_to_bytes(token_id)
    return raw.decode("utf-8", "replace"), list(raw)


def completion_logprobs(tokenizer: Tokenizer | None, ids: Sequence[int], logprobs: Sequence[float],
                        offset: int) -> dict[str, Any]:
    """The legacy completions `logprobs` object for `ids`; `offset`: their text's start in the choice."""
    tokens, offsets = [], []
    for t in ids:
        offsets.append(offset)
        text, _ = _token_text(tokenizer, t)
        tokens.append(text)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": list(logprobs),
            "top_logprobs": [{tok: lp} for tok, lp in zip(tokens, logprobs)], "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer | None, ids: Sequence[int], logprobs: Sequence[float]) -> dict[str, Any]:
    content = []
    for t, lp in zip(ids, logprobs):
        text, raw = _token_text(tokenizer, t)
        content.append({"token": text, "logprob": lp, "bytes": raw, "top_logprobs": []})
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
