"""The engine core's configuration, composed of one part per owner: the KV cache's size
(`KVCacheConfig`), the scheduler's bounds and policy (`SchedulerConfig`), and what the core itself
reads (`CoreConfig`). Every default is written here once; the CLI (`llamaforge serve`, `llamaforge
repo`), the Triton repository's `RepoOptions` and the Triton `llama` model read them from these
classes. Plain dataclasses, no imports: the CLI reads the defaults without loading the runtime.
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
    context length, at most 2048 tokens each), and its block size in tokens."""

    budget_tokens: int | None = None
    budget_bytes: int | None = None
    block_size: int = 16


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16  # sequences in the running batch
    max_num_batched_tokens: int = 512  # tokens per engine step (decodes + prefill chunks)
    policy: str = "inflight"  # one of SCHEDULING_POLICIES


@dataclass
class CoreConfig:
    kv: KVCacheConfig = field(default_factory=KVCacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
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

    @property
    def max_num_seqs(self) -> int:
        """The scheduler's bound on running sequences: with `max_queue`, what a front end sizes its
        request handling by (runtime/serving/engine_client.py `AdmissionLimits`)."""
        return self.scheduler.max_num_seqs
