"""What flows between the protocol front ends (gRPC server, Triton Python backend) and the
engine core: one `GenerationRequest` in, a stream of `GenerationOutput`s out."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from llamaforge.runtime.core.sampling import SamplingParams

if TYPE_CHECKING:  # guided.py and mllama_image.py import RequestError from here
    from llamaforge.runtime.core.guided import GuidedSpec
    from llamaforge.runtime.core.mllama_image import ImageInput


class RequestError(ValueError):
    """A request the engine cannot serve; `field` names the offending request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound: answer RESOURCE_EXHAUSTED at once."""


class EngineUnavailable(RuntimeError):
    """The engine can no longer run steps (a tensor-parallel rank died or stopped answering): the
    requests in flight end with finish reason 'unavailable' (gRPC UNAVAILABLE, HTTP 503)."""


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    min_tokens: int = 0
    end_ids: tuple[int, ...] | None = None  # None: the model's EOS ids
    stop_words: tuple[str, ...] = ()  # stop when the generated text contains one; it is not returned
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences that are never generated
    stream: bool = False
    return_log_probs: bool = False
    # Per generated token, its step's `top_logprobs` most likely tokens with their log probs
    # (runtime/core/sampling.py: of the distribution the token was drawn from); 0: none.
    top_logprobs: int = 0
    guided: GuidedSpec | None = None  # structured output (runtime/core/guided.py)
    detokenize: bool = True  # False for the token-level model
    # TensorRT-LLM's return_context_logits / return_generation_logits: the raw logits (before
    # penalties, bans and temperature) of every prompt position, and of every returned token's
    # sampling step. Only a request that asks pays for them (engine core: `max_logits_bytes`).
    return_context_logits: bool = False
    return_generation_logits: bool = False
    # Sequences to generate from the prompt (OpenAI's n, TensorRT-LLM's num_return_sequences): the
    # prompt is computed once and its KV shared; each sequence samples with its own RNG stream and
    # sends its own outputs, tagged with its `sequence_index`. With beam search: the best n beams.
    n: int = 1
    # Beam search (TensorRT-LLM's beam_width > 1; runtime/core/beam_search.py), with transformers'
    # length_penalty and early_stopping (True, False or "never").
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    # Llama 3.2 Vision: the prompt's images in order, one per `<|image|>` token, as the request carried
    # them (encoded bytes and the field that held them, which errors name); the engine core
    # preprocesses them at `submit` (runtime/core/cross_attention.py).
    images: tuple[ImageInput, ...] = ()


@dataclass
class GenerationOutput:
    """One step's news for one request. For streams each carries only what is new; the last has
    `finished` set and a `finish_reason` of 'stop', 'length', 'cancelled', 'error' or 'unavailable'."""

    request_id: str
    token_ids: list[int]
    text: str = ""
    log_probs: list[float] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    cum_log_prob: float = 0.0
    # Seconds from `submit` until the scheduler first admitted the request into the running batch;
    # None until then (front ends report it as the request's queue time).
    queue_s: float | None = None
    # TensorRT-LLM's per-request perf metrics (return_perf_metrics), in nanoseconds of the monotonic
    # clock `time.perf_counter_ns` reads (TRT-LLM's steady clock); None until the event happened.
    arrival_ns: int | None = None
    first_scheduled_ns: int | None = None
    first_token_ns: int | None = None
    last_token_ns: int | None = None
    # KV-cache blocks the request's sequence holds (at its final output: those it held when it
    # finished); of them, those its admission found in the prefix cache (TensorRT-LLM's
    # kv_cache_reused_blocks), and the prompt tokens they hold (OpenAI's cached_tokens).
    kv_blocks: int = 0
    kv_reused_blocks: int = 0
    num_cached_tokens: int = 0
    # Speculative decoding: draft tokens verified for the request so far, and of them those accepted
    # (TensorRT-LLM's total_draft_tokens / total_accepted_draft_tokens).
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    # Only for requests that ask (return_context_logits / return_generation_logits), float32.
    # context_logits [num_input_tokens, vocab]: every output carries the whole prompt's, once the
    # prompt is computed (as TensorRT-LLM's executor puts them in every result). generation_logits
    # [len(token_ids), vocab]: the logits each of this output's tokens was sampled from, row for row.
    context_logits: np.ndarray | None = None
    generation_logits: np.ndarray | None = None
    # Only for requests with top_logprobs > 0: per token of `token_ids`, its step's most likely
    # (token id, log prob) pairs, most likely first.
    top_log_probs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    sequence_index: int = 0  # which of the request's n sequences this output is about (n > 1)


OutputSink = Callable[[GenerationOutput], None]


class RequestHandle:
    """The caller's side of one request: iterate outputs as they come; `cancel()` at any time.

    With a `sink`, the outputs are not queued here: the core calls `sink(output)` from its own
    thread as each is produced, so a front end that serves many requests (one gRPC stream) needs
    no thread per request to move them. A sink must be quick and must not raise."""

    def __init__(self, request_id: str, cancel: Callable[[str], None], sink: OutputSink | None = None,
                 num_sequences: int = 1) -> None:
        import queue

        self.request_id = request_id
        # SimpleQueue: put and get in C, no Condition; about a tenth of Queue's cost a token.
        self._queue: queue.SimpleQueue[GenerationOutput] = queue.SimpleQueue()
        self._cancel = cancel
        self._sink = sink
        self.num_sequences = num_sequences
        self._unfinished = num_sequences
        self.done = threading.Event()  # set once every sequence has sent its final output

    def put(self, output: GenerationOutput) -> None:
        if self._sink is not None:
            self._sink(output)
        else:
            self._queue.put(output)
        if output.finished:
            self._unfinished -= 1
            if not self._unfinished:
                self.done.set()

    def __iter__(self) -> Iterator[GenerationOutput]:
        """Every output of every sequence, in the order they come, until the last has finished."""
        left = self.num_sequences
        while left:
            out = self._queue.get()
            yield out
            left -= out.finished

    def get(self, timeout: float | None = None) -> GenerationOutput:
        return self._queue.get(timeout=timeout)

    def cancel(self) -> None:
        self._cancel(self.request_id)
