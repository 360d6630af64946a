"""Guided decoding (structured output): a request's output is held to a JSON schema, any JSON, a
regex or a grammar by masking, at each step, the tokens that cannot continue it.

The masks come from llguidance, through its NumPy API (the runtime never imports torch; xgrammar
needs torch, and its masks measured 4-20x slower on JSON and regexes: docs/benchmarks.md
`make bench-guided`). The kinds are TensorRT-LLM's guide types:

    json          any JSON object or array (TensorRT-LLM's `json`, as xgrammar's built-in grammar)
    json_schema   a JSON schema (the OpenAI API's response_format json_schema / json_object)
    regex         the whole output matches the regex
    ebnf_grammar  a context-free grammar: GBNF / EBNF (`root ::= ...`, xgrammar's and llama.cpp's
                  syntax) or Lark (`start: ...`, llguidance's own)

JSON is generated compact (no whitespace between tokens beyond what a schema's strings hold),
so a model cannot wander into endless whitespace; a schema's `x-guidance` options can change that.

Cost, and where it is paid:
  * compiling: at submit, on the caller's thread, never in the step loop; compiled grammars are
    kept (an LRU of `CACHE_SIZE`), so a repeated schema costs a copy of its matcher;
  * masks: once an engine call's rows have their tokens, the next masks of all its guided rows
    are computed in one llguidance call (its LLExecutor, which drops the GIL) on a worker thread,
    while the engine runs the next call; the sampler waits for a row's mask only if it is not done
    yet. One job per engine call, not one per row: a job per row made the step loop and the
    worker trade the GIL at every row, which cost more than the masks (tens of microseconds each
    at vocab 32k: `make bench-guided`).

A mask allows the request's end ids exactly when the grammar may end there (and only them once it
must), so a guided output ends at its grammar's end unless max_tokens or a stop word cuts it.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from llamaforge.runtime.core.requests import RequestError

GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")
CACHE_SIZE = 64  # compiled grammars kept per engine
# llguidance's JSON options: compact output (see the module docstring).
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}
_ANY_JSON = {"type": ["object", "array"]}


@dataclass(frozen=True)
class GuidedSpec:
    """What a request's output must match. `field`: the request field errors name (the OpenAI
    API's `response_format`, TensorRT-LLM's `guided_decoding_guide`, ...)."""

    kind: str
    guide: str = ""
    field: str = "guided_decoding_guide"

    def __post_init__(self) -> None:
        if self.kind not in GUIDE_TYPES:
            raise RequestError("guided_decoding_guide_type", f"{self.kind!r} is not one of {', '.join(GUIDE_TYPES)}")
        if self.kind != "json" and not self.guide:
            raise RequestError(self.field, f"a {self.kind} guide is required")


def _grammar(spec: GuidedSpec) -> str:
    """The llguidance grammar of `spec` (not yet checked: `LLMatcher.validate_grammar` does)."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    if spec.kind in ("json", "json_schema"):
        if spec.kind == "json":
            schema: Any = _ANY_JSON
        else:
            try:
                schema = json.loads(spec.guide)
            except json.JSONDecodeError as e:
                raise RequestError(spec.field, f"the JSON schema is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise RequestError(spec.field, f"a JSON schema is an object or a boolean, got {type(schema).__name__}")
        return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)  # type: ignore[arg-type]
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.guide)
    try:
        return LLMatcher.grammar_from_lark(any_to_lark(spec.guide))
    except Exception as e:  # noqa: BLE001 - the GBNF converter's parse errors: the caller's grammar
        raise RequestError(spec.field, f"the grammar does not parse: {e}") from None


class _TokenizerView:
    """The engine's tokenizer as llguidance's TokenizerWrapper reads one: every id's bytes (ids the
    tokenizer lacks, up to the logits' width, are empty special tokens that are never allowed)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        known = min(vocab_size, tokenizer.vocab_size)
        self.tokens = [tokenizer.id_to_bytes(i) for i in range(known)] + [b""] * (vocab_size - known)
        self.special_token_ids = [i for i in range(known) if tokenizer.is_special(i)] + list(range(known, vocab_size))
        self.eos_token_id = eos_ids[0] if eos_ids else 0
        self.bos_token_id = getattr(tokenizer, "bos_id", None)
        self._tokenizer = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return list(self._tokenizer.encode(text, add_bos=False))


class Guidance:
    """One engine's guided decoding: llguidance's view of its tokenizer (built on first use, under
    a second at vocab 128k), the compiled grammars, and the worker thread that computes masks."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._worker: ThreadPoolExecutor | None = None  # the mask jobs' thread
        self._executor: Any = None  # llguidance's LLExecutor: a job's masks in one call, without the GIL

    def _lltokenizer(self) -> Any:
        if self._ll_tokenizer is None:
            from llguidance import LLTokenizer, TokenizerWrapper

            view = _TokenizerView(self.tokenizer, self.vocab_size, self.eos_ids)
            self._ll_tokenizer = LLTokenizer(TokenizerWrapper(view), n_vocab=self.vocab_size,
                                             eos_token=list(self.eos_ids) or None)
        return self._ll_tokenizer

    def compile(self, spec: GuidedSpec) -> Any:
        """A fresh `LLMatcher` for `spec`, copied from the cached compiled one; a grammar that does
        not compile is a RequestError naming `spec.field`, with llguidance's message."""
        from llguidance import LLMatcher

        if self.tokenizer is None:
            raise RequestError(spec.field, "this engine has no tokenizer, so its output cannot be guided")
        key = (spec.kind, spec.guide)
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                return template.deep_copy()
            tokenizer = self._lltokenizer()
        grammar = _grammar(spec)
        error = LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise RequestError(spec.field, f"the {spec.kind} guide does not compile: {error.strip()}")
        template = LLMatcher(tokenizer, grammar, log_level=0)
        if template.is_error():
            raise RequestError(spec.field, f"the {spec.kind} guide does not compile: {template.get_error()}")
        with self._lock:
            self._compiled[key] = template
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return template.deep_copy()

    def start(self, spec: GuidedSpec, end_ids: frozenset[int]) -> GuidedState:
        """A request's guided state; its first mask is computed at once (while its prompt runs)."""
        state = GuidedState(self.compile(spec), self.vocab_size, self.eos_ids, tuple(sorted(end_ids)))
        self.prefetch([state])
        return state

    def prefetch(self, states: list[GuidedState]) -> None:
        """Start computing the next mask of each of `states` (one job on the mask worker)."""
        if not states:
            return
        with self._lock:
            if self._worker is None:
                from llguidance import LLExecutor

                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guided-mask")
                self._executor = LLExecutor()
            worker = self._worker
        job = worker.submit(self._masks, states)
        for i, state in enumerate(states):
            state.pending = (job, i)

    def _masks(self, states: list[GuidedState]) -> list[np.ndarray]:
        words = (self.vocab_size + 31) // 32
        bits = np.empty((len(states), words), np.int32)
        self._executor.unsafe_compute_mask_ptr([(s.matcher, i) for i, s in enumerate(states)], bits.ctypes.data,
                                               words * 4, len(states))
        allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")[:, : self.vocab_size].astype(bool)
        return [s.ends(row) for s, row in zip(states, allowed)]


class GuidedState:
    """One request's matcher and its next mask (`pending`: a mask job and this row's place in it)."""

    def __init__(self, matcher: Any, vocab_size: int, eos_ids: tuple[int, ...], end_ids: tuple[int, ...]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._eos = list(eos_ids)
        self._end = list(end_ids)
        self.pending: tuple[Future[list[np.ndarray]], int] | None = None

    def ends(self, allowed: np.ndarray) -> np.ndarray:
        """`allowed` (llguidance's mask, as booleans [vocab]) with the request's end ids where the
        grammar may end: the model's EOS ids stand for that in llguidance's mask."""
        may_end = bool(allowed[self._eos].any()) if self._eos else self.matcher.is_accepting()
        allowed[self._eos] = False
        allowed[self._end] = may_end
        if not allowed.any():  # a dead end (an error state): end the output
            allowed[self._end] = True
        return allowed

    def allowed(self) -> np.ndarray:
        assert self.pending is not None, "prefetch() computes every mask before it is asked for"
        job, index = self.pending
        return job.result()[index]

    def advance(self, token: int) -> bool:
        """`token` was generated (and is not an end id): move the matcher past it (the caller then
        prefetches the next mask). Returns whether the grammar is complete, nothing more able to
        follow (the output then ends here, as vLLM ends it, rather than a step later on a forced
        end id)."""
        self.matcher.consume_token(token)
        self.pending = None
        return bool(self.matcher.is_stopped())

    def close(self) -> None:
        self.pending = None
