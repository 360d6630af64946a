"""runtime/core/validation.py: the request checks the protocol front ends and the engine core share;
each refusal names the field the way the caller's request names it."""

from __future__ import annotations

import pytest

from llamaforge.runtime.core.requests import GenerationRequest, RequestError
from llamaforge.runtime.core.validation import RequestLimits, check_context, check_request

LIMITS = RequestLimits(context_length=100, vocab_size=50, kv_tokens=64)


@pytest.mark.parametrize("prompt,max_tokens,field,words", [
    ([], 4, "text_input", "the prompt is empty"),
    ([1, 50], 4, "input_ids", "token id 50 is outside the vocabulary [0, 50)"),
    ([1], 0, "max_tokens", "must be > 0, got 0"),
    ([1] * 100, 1, "text_input", "leaves no room"),
    ([1] * 90, 20, "max_tokens", "= 110 exceeds the context length 100; at most 10"),
    ([1] * 60, 10, "max_tokens", "exceeds the whole KV cache budget (64 tokens)"),
])
def test_the_core_names_each_field(prompt: list[int], max_tokens: int, field: str, words: str) -> None:
    with pytest.raises(RequestError) as info:
        check_request(GenerationRequest("r", prompt, max_tokens), LIMITS)
    assert info.value.field == field and words in str(info.value)


def test_fits_and_the_front_ends_own_field_names() -> None:
    check_request(GenerationRequest("r", [1] * 60, 4), LIMITS)  # 64 tokens: exactly the KV budget
    with pytest.raises(RequestError, match="^request_output_len: prompt .* request_output_len .20."):
        check_context(90, 20, RequestLimits(100, 50), "input_ids", "request_output_len")
