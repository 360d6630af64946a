"""The output processor on its own: logits rows in, tokens, stops and emitted outputs out (byte
tokenizer, greedy sampling, no engine)."""

from __future__ import annotations

import numpy as np
from fake_core import EOS, ByteTokenizer

from llamaforge.runtime.core.output_processor import OutputProcessor, RequestState
from llamaforge.runtime.core.requests import GenerationOutput, GenerationRequest, RequestHandle
from llamaforge.runtime.core.stats import CoreStats


def logits(*ranked: int) -> np.ndarray:
    """A row whose greedy pick is ranked[0], then ranked[1] if that one is banned, ..."""
    row = np.zeros(ByteTokenizer.vocab_size, np.float32)
    for rank, token in enumerate(ranked):
        row[token] = 10.0 - rank
    return row


class Run:
    def __init__(self, context_length: int = 64) -> None:
        self.stats = CoreStats()
        self.processor = OutputProcessor(ByteTokenizer(), (EOS,), context_length, self.stats)
        self.outputs: list[GenerationOutput] = []

    def start(self, request: GenerationRequest) -> RequestState:
        return self.processor.new_request(request, RequestHandle(request.request_id, lambda _: None, self.outputs.append))

    def feed(self, state: RequestState, *rows: np.ndarray) -> str | None:
        """Feed rows one step at a time until the request finishes; returns its finish reason."""
        for row in rows:
            finished = self.processor.update([(state, row)])
            if finished:
                [(done, reason)] = finished
                assert done is state
                self.processor.finish(state, reason)
                return reason
        return None


def b(text: str) -> list[np.ndarray]:
    return [logits(c) for c in text.encode()]


def test_end_id_stops_before_it_is_emitted_and_counts_as_generated() -> None:
    run = Run()
    state = run.start(GenerationRequest("r", [1, 2], 10))
    assert run.feed(state, *b("hi"), logits(EOS), *b("never")) == "stop"
    assert [(o.token_ids, o.text, o.finish_reason) for o in run.outputs] == [([104, 105], "hi", "stop")]
    assert state.seq.tokens == [1, 2, 104, 105] and run.stats.generated_tokens == 3


def test_min_tokens_bans_the_end_id_until_reached() -> None:
    run = Run()
    state = run.start(GenerationRequest("r", [1], 10, min_tokens=2))
    assert run.feed(state, logits(EOS, ord("a")), logits(EOS, ord("b")), logits(EOS, ord("c"))) == "stop"
    assert run.outputs[-1].text == "ab"


def test_stop_word_is_cut_from_the_stream() -> None:
    run = Run()
    state = run.start(GenerationRequest("r", [1], 10, stop_words=("lo",), stream=True))
    assert run.feed(state, *b("hello world")) == "stop"
    assert "".join(o.text for o in run.outputs) == "hel" and run.outputs[-1].finished
    assert len(run.outputs) > 1, "a stream sends pieces before the final output"


def test_length_stops_at_max_tokens_and_at_the_context_length() -> None:
    run = Run()
    state = run.start(GenerationRequest("r", [1], 3))
    assert run.feed(state, *b("abcdef")) == "length"
    assert run.outputs[-1].token_ids == [97, 98, 99]
    short = Run(context_length=4)
    state = short.start(GenerationRequest("r", [1, 2], 10))
    assert short.feed(state, *b("abcdef")) == "length"
    assert short.outputs[-1].text == "ab" and len(state.seq.tokens) == 4
