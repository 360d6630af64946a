"""The engine core's configuration, composed of one part per owner: the KV cache's size
(`KVCacheConfig`), the scheduler's bounds and policy (`SchedulerConfig`), speculative decoding
(`SpeculativeConfig`), and what the core itself reads (`CoreConfig`). Every default is written
here once; the CLI (`llamaforge serve`, `llamaforge repo`), the Triton repository's `RepoOptions`
and the Triton `llama` model read them from these classes. Plain dataclasses, no imports: the CLI reads the defaults without loading the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# "inflight": admit at every step. "static": admit only into an empty batch, so a batch must drain
# before the next starts (the baseline `make bench-serve` compares against).
SCHEDULING_POLICIES = ("inflight", "static")


@dataclass
class KVCacheConfig:
    """The KV cache's size, as one of two budgets (neither: `max_num_seqs` sequences of the
    context length, at most 2048 tokens each), its block size in tokens, and whether full blocks
    are reused across requests by their content (automatic prefix caching, on as in vLLM; what
    TensorRT-LLM calls KV cache reuse)."""

    budget_tokens: int | None = None
    budget_bytes: int | None = None
    block_size: int = 16
    prefix_caching: bool = True


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16  # sequences in the running batch
    max_num_batched_tokens: int = 512  # tokens per engine step (decodes + prefill chunks)
    policy: str = "inflight"  # one of SCHEDULING_POLICIES


SPECULATIVE_METHODS = ("ngram", "draft")


class SpeculativeError(ValueError):
    """A speculative decoding setting out of bounds, or a draft engine that cannot serve."""


def check_prompt_lookup(min_n: int, max_n: int) -> None:
    if not 1 <= min_n <= max_n:
        raise SpeculativeError(f"prompt_lookup_min ({min_n}) and prompt_lookup_max ({max_n}) must satisfy "
                               "1 <= min <= max")


@dataclass
class SpeculativeConfig:
    """Speculative decoding (runtime/core/speculative.py). `method`: None (off), "ngram" (prompt
    lookup: the tokens that followed the sequence's last n-gram where it occurred before; no second
    model) or "draft" (the greedy tokens of `draft_engine`, a smaller engine directory with the same
    tokenizer). Each decode row proposes up to `num_speculative_tokens` tokens, all verified by one
    target call."""

    method: str | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2  # the shortest n-gram matched (1 matches too often to pay off)
    prompt_lookup_max: int = 4
    draft_engine: str | None = None
    # No drafts in a step where this many sequences or more are decoding (vLLM's
    # speculative_disable_by_batch_size). Rows verified together run one engine call per row here
    # (ORT's GroupQueryAttention kernel refuses several rows of several tokens after a past in one
    # call): 5-10x a decode call at 8 rows, 1.0-1.9x for one row alone (make bench-spec), so by
    # default only a sequence decoding alone speculates. 0: never disabled.
    disable_by_batch_size: int = 2

    def check(self) -> None:
        """Raise SpeculativeError naming the first setting out of bounds: what the engine core
        checks at start, and `llamaforge repo` before it writes the settings into config.pbtxt."""
        if self.method is not None and self.method not in SPECULATIVE_METHODS:
            raise SpeculativeError(f"speculative method {self.method!r} is not one of {list(SPECULATIVE_METHODS)}")
        if self.method == "draft" and not self.draft_engine:
            raise SpeculativeError("speculative method 'draft' needs a draft engine (draft_engine: an engine "
                                   "directory with the target's tokenizer)")
        if self.num_speculative_tokens < 1:
            raise SpeculativeError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.disable_by_batch_size < 0:
            raise SpeculativeError(f"speculative_disable_by_batch_size must be >= 0 (0: never), got "
                                   f"{self.disable_by_batch_size}")
        check_prompt_lookup(self.prompt_lookup_min, self.prompt_lookup_max)


@dataclass
class CoreConfig:
    kv: KVCacheConfig = field(default_factory=KVCacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    max_queue: int = 64  # waiting requests (not yet running) before `submit` raises QueueFullError
    # Padding a fresh prompt chunk may receive to share a prefill call with others. On a 2-core CPU
    # a call's fixed cost (reading the weights, ~16 ms for 125M fp32 params) is worth about 8
    # prefill tokens (~2 ms each, compute-bound); an accelerator would afford far more.
    prefill_padding_tokens: int = 8
    # What happens to a finished sequence's row of the decode batch. True: the last live row moves
    # into it (a copy of one row's cache, vLLM v1's InputBatch.condense), so every decode call
    # computes live rows only. False: the batch keeps its shape until all of it has finished, the
    # way static batching engines run a batch (FasterTransformer, TensorRT-LLM's V1 GptSession);
    # a finished row is fed past length 0, so it skips attention but not the matmuls.
    # None: what the scheduling policy asks for (True in flight, False for a static batch).
    condense_decode_rows: bool | None = None
    # The most bytes of float32 logits one request may ask to have returned (return_context_logits:
    # prompt x vocab x 4; return_generation_logits: max_tokens x vocab x 4; both: the sum); more is
    # refused at submit, naming the flag. 1 GiB keeps a response under gRPC's 2 GiB message limit.
    max_logits_bytes: int = 1 << 30
    threads: int | None = None  # ONNX Runtime intra-op threads (None: its default)
    providers: tuple[Any, ...] | None = None  # ONNX Runtime execution providers (None: CPU)
    # Llama 3.2 Vision engines: images one request may carry (Meta recommends a single image per
    # prompt; each image costs its cross-attention cache, docs/vision.md).
    max_images: int = 2

    @property
    def max_num_seqs(self) -> int:
        """The scheduler's bound on running sequences: with `max_queue`, what a front end sizes its
        request handling by (runtime/serving/engine_client.py `AdmissionLimits`)."""
        return self.scheduler.max_num_seqs
