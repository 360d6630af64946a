"""Batched generation over an `Engine` with a KV cache: one prefill call for the whole batch
(right-padded prompts), then one decode call per token. The in-flight batching scheduler of the
serving runtime replaces this for serving; this is the simple, static-batch path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llamaforge.runtime.core.engine import Engine
from llamaforge.runtime.core.sampling import SamplingParams, sample
from llamaforge.runtime.core.tokenizer import Tokenizer


@dataclass
class Generation:
    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""


def generate_ids(engine: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 params: SamplingParams = SamplingParams(), stop_at_eos: bool = True) -> list[Generation]:
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be > 0")
    batch = len(prompts)
    lengths = np.array([len(p) for p in prompts], dtype=np.int32)
    capacity = int(lengths.max()) + max_new_tokens
    if capacity > engine.kv.max_capacity:
        raise ValueError(f"prompt ({lengths.max()} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"context length {engine.kv.max_capacity}")
    gens = [Generation(list(p)) for p in prompts]
    rngs = [np.random.default_rng(params.seed) for _ in prompts]  # per row: batch-independent

    ids = np.zeros((batch, int(lengths.max())), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = p
    # Logits at each row's final real prompt token only.
    logits, past = engine.step(ids, np.zeros(batch, np.int32), engine.kv.empty(batch, capacity), (lengths - 1)[:, None])
    last = logits[:, 0]
    done = np.zeros(batch, dtype=bool)
    for step in range(max_new_tokens):
        next_ids = np.zeros((batch, 1), dtype=np.int64)
        for b, g in enumerate(gens):
            if done[b]:
                continue
            # The log prob is not kept, so none is asked for (sample's fast greedy path).
            token, _ = sample(last[b], params, rngs[b], g.prompt_ids + g.output_ids, want_log_prob=False)
            g.output_ids.append(token)
            next_ids[b, 0] = token
            if stop_at_eos and token in engine.eos_ids:
                done[b], g.finish_reason = True, "stop"
            elif len(g.output_ids) == max_new_tokens:
                done[b], g.finish_reason = True, "length"
        if done.all():
            break
        logits, past = engine.step(next_ids, lengths + step, past)
        last = logits[:, -1]
    return gens


def _tokenizer(engine: Engine) -> Tokenizer:
    if engine.tokenizer is None:
        raise ValueError(f"{engine.dir}: engine has no tokenizer")
    return engine.tokenizer


def generate_text(engine: Engine, prompts: Sequence[str], max_new_tokens: int,
                  params: SamplingParams = SamplingParams(), allow_special: bool = False) -> list[str]:
    """The text generated after each prompt. Prompts are encoded by the tokenizer's own rules
    (`Tokenizer.encode`); `allow_special`: special-token text in them ("<|im_start|>") is the
    special token, not plain characters."""
    tok = _tokenizer(engine)
    gens = generate_ids(engine, [tok.encode(p, allow_special=allow_special) for p in prompts], max_new_tokens, params)
    return [tok.decode(g.output_ids) for g in gens]


def generate_chat(engine: Engine, messages: Sequence[Mapping[str, Any]], max_new_tokens: int,
                  params: SamplingParams = SamplingParams(), **template_variables: Any) -> str:
    """The assistant's reply to `messages`, prompted through the checkpoint's chat template with
    the generation prompt (`Tokenizer.encode_chat`)."""
    tok = _tokenizer(engine)
    ids = tok.encode_chat(messages, add_generation_prompt=True, **template_variables)
    return tok.decode(generate_ids(engine, [ids], max_new_tokens, params)[0].output_ids)
