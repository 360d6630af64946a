"""Request checks, written once for every way in: the protocol front ends
(`runtime/serving/protocol.py parse_inputs`, for the gRPC server and the Triton Python backend) run
them on a request's inputs, and `EngineCore.submit` runs them on every `GenerationRequest`, for
callers that build requests themselves.

Each refusal is a `RequestError` naming the field the way the caller's request names it (`max_tokens`
or `request_output_len`, `text_input` or `input_ids`); an id outside the vocabulary is always
`input_ids`, since the ids are what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llamaforge.runtime.core.requests import GenerationRequest, RequestError
from llamaforge.runtime.core.sampling import MAX_TOP_LOGPROBS


@dataclass(frozen=True)
class RequestLimits:
    """What a served engine can take. `kv_tokens`: the whole KV cache (None: not checked)."""

    context_length: int
    vocab_size: int
    kv_tokens: int | None = None
    image_token_id: int | None = None  # a vision model's `<|image|>`: a prompt id past the vocabulary


def check_max_tokens(max_tokens: int, field: str) -> None:
    if max_tokens <= 0:
        raise RequestError(field, f"must be > 0, got {max_tokens}")


def check_prompt_ids(prompt_ids: Sequence[int], vocab_size: int, field: str, image_token_id: int | None = None) -> None:
    """The prompt is not empty and every id is in the vocabulary (or is a vision model's `<|image|>`)."""
    if not prompt_ids:
        raise RequestError(field, "the prompt is empty")
    bad = [i for i in prompt_ids if not 0 <= i < vocab_size and i != image_token_id]
    if bad:
        raise RequestError("input_ids", f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")


def check_context(num_prompt: int, max_tokens: int, limits: RequestLimits, prompt_field: str, max_field: str) -> None:
    """The prompt leaves room for a generated token, and the prompt plus `max_tokens` fit the
    context length and (a sequence's KV never leaves the cache) the whole KV cache."""
    n, context = num_prompt, limits.context_length
    if n >= context:
        raise RequestError(prompt_field, f"the prompt is {n} tokens; the context length is {context}, "
                                         "which leaves no room for a generated token")
    total = n + max_tokens
    if total > context:
        raise RequestError(max_field, f"prompt ({n} tokens) + {max_field} ({max_tokens}) = {total} exceeds "
                                      f"the context length {context}; at most {context - n}")
    if limits.kv_tokens is not None and total > limits.kv_tokens:
        raise RequestError(max_field, f"prompt + {max_field} = {total} tokens exceeds the whole KV cache budget "
                                      f"({limits.kv_tokens} tokens)")


def check_top_logprobs(top: int, field: str) -> None:
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(field, f"must be in [0, {MAX_TOP_LOGPROBS}], got {top}")


def check_logit_bias(pairs: Sequence[tuple[int, float]], vocab_size: int, field: str = "logit_bias") -> None:
    """The biased ids are in the vocabulary (SamplingParams checks the biases themselves)."""
    for token, _ in pairs:
        if not 0 <= token < vocab_size:
            raise RequestError(field, f"token id {token} is outside the vocabulary [0, {vocab_size})")


def check_request(request: GenerationRequest, limits: RequestLimits, prompt_field: str = "text_input") -> None:
    """Every check above, on a request built by the caller (as `EngineCore.submit` gets it)."""
    check_prompt_ids(request.prompt_ids, limits.vocab_size, prompt_field, limits.image_token_id)
    check_max_tokens(request.max_tokens, "max_tokens")
    check_context(len(request.prompt_ids), request.max_tokens, limits, prompt_field, "max_tokens")
    check_top_logprobs(request.top_logprobs, "top_logprobs")
    check_logit_bias(request.sampling.logit_bias, limits.vocab_size)
