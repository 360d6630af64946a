"""A small stand-in for `runtime/core/engine_core.py` `EngineCore` (a helper module, not a test file).

Same front-end API (runtime/serving/engine_client.py `EngineClient`: submit / cancel / stats / start /
stop, observer callbacks, `GenerationOutput` streams; tests/serving/test_engine_client.py has mypy
check it) with no model: the tokenizer is bytes (ids 0-255 = bytes, 256 <s>, 257 </s>) and the
"model" echoes the prompt's bytes, then emits the end token, so

    text_output == prompt (cut at max_tokens bytes, or before the first end_id / stop word)

Multi-byte characters arrive one byte per token, which exercises UTF-8-safe streaming (the real
`IncrementalDetokenizer` does the text). `hold()` freezes the step loop (requests stay queued)
and `release()` resumes it; `step_s` slows it down; `cancelled` lists the request ids that ended
cancelled.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llamaforge.runtime.core.detokenizer import IncrementalDetokenizer
from llamaforge.runtime.core.manifest import EngineManifest, KVCacheInfo, SpecialTokens, TokenizerInfo
from llamaforge.runtime.core.requests import (
    GenerationOutput,
    GenerationRequest,
    OutputSink,
    QueueFullError,
    RequestError,
    RequestHandle,
)
from llamaforge.runtime.core.tokenizer import Tokenizer

BOS, EOS = 256, 257
KV_BLOCK = 16  # tokens per KV block the fake reports its requests hold (perf metrics)


def _ns(perf_counter_s: float | None) -> int | None:
    return None if perf_counter_s is None else int(perf_counter_s * 1e9)


class ByteTokenizer(Tokenizer):
    kind = "bytes"
    vocab_size = 258
    bos_id = BOS
    eos_ids = (EOS,)
    _SPECIAL = {BOS: b"<s>", EOS: b"</s>"}

    def encode(self, text: str, add_bos: bool = True, allow_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        ids: list[int] = []
        i = 0
        while i < len(data):
            for tid, piece in self._SPECIAL.items():
                if allow_special and data.startswith(piece, i):
                    ids.append(tid)
                    i += len(piece)
                    break
            else:
                ids.append(data[i])
                i += 1
        # BOS when asked, never a second one (the Tokenizer contract), without the base class's helpers
        return [BOS, *ids] if add_bos and ids[:1] != [BOS] else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.id_to_bytes(i) for i in ids if not (skip_special_tokens and self.is_special(i))) \
            .decode("utf-8", "replace")

    def id_to_bytes(self, token_id: int) -> bytes:
        self._check_id(token_id)
        return self._SPECIAL.get(token_id, bytes([token_id]) if token_id < 256 else b"")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._SPECIAL


def fake_manifest(model_name: str, context_length: int) -> EngineManifest:
    """The manifest of an engine this fake could have been built as (one layer, byte vocabulary)."""
    kv = KVCacheInfo(layout="bhcd-slots", dtype="float32", num_layers=1, num_kv_heads=1, head_dim=8,
                     max_capacity=context_length, past_inputs=["past_key.{layer}", "past_value.{layer}"],
                     present_outputs=["present_key.{layer}", "present_value.{layer}"], lengths_input="past_lengths")
    return EngineManifest(
        variant=model_name, config={"vocab_size": ByteTokenizer.vocab_size}, precision="fp32", backend="ort",
        weights="checkpoint", model_file="model.onnx", external_data="model.onnx.data", inputs=[], outputs=[],
        kv_cache=kv, special_tokens=SpecialTokens(BOS, [EOS], None),
        tokenizer=TokenizerInfo(kind="bytes", file="", bos_id=BOS, eos_ids=[EOS]), passes=[], source={}, tools={})


@dataclass
class FakeConfig:
    max_num_seqs: int = 4
    max_queue: int = 8
    kv_budget_tokens: int = 4096


@dataclass(eq=False)
class _Req:
    request: GenerationRequest
    handle: RequestHandle
    detok: IncrementalDetokenizer | None
    end_ids: frozenset[int]
    arrived: float
    generated: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    last_at: float = 0.0
    admitted: float | None = None  # perf_counter when the step loop first took it into the batch
    first_at: float | None = None  # perf_counter of its first token
    sequence_index: int = 0  # which of the request's n sequences (each echoes the prompt)
    finished: bool = False


class FakeCore:
    def __init__(self, config: FakeConfig | None = None, observer: Any = None, context_length: int = 256,
                 step_s: float = 0.001, model_name: str = "fake-echo") -> None:
        self.config = config or FakeConfig()
        self.observer = observer
        self.tokenizer = ByteTokenizer()
        self.context_length = context_length
        self.eos_ids = (EOS,)
        self.model_name = model_name
        self.manifest = fake_manifest(model_name, context_length)
        self.step_s = step_s
        self.cancelled: list[str] = []
        self.submitted: list[GenerationRequest] = []
        self.generated_tokens = 0
        self._cv = threading.Condition()
        self._waiting: list[_Req] = []
        self._running: list[_Req] = []
        self._cancels: set[str] = set()
        self._held = False
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- API ----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fake-core", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for r in self._waiting + self._running:
            self._finish(r, "cancelled")
        self._waiting, self._running = [], []

    def submit(self, req: GenerationRequest, sink: OutputSink | None = None) -> RequestHandle:
        if req.max_tokens <= 0:
            raise RequestError("max_tokens", f"must be > 0, got {req.max_tokens}")
        if len(req.prompt_ids) + req.max_tokens > self.context_length:
            raise RequestError("max_tokens", "prompt + max_tokens exceeds the context length")
        handle = RequestHandle(req.request_id, self.cancel, sink, num_sequences=req.n)
        end_ids = frozenset(req.end_ids if req.end_ids is not None else self.eos_ids)
        with self._cv:
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(f"waiting queue is full ({self.config.max_queue} requests)")
            now = time.perf_counter()
            for i in range(req.n):  # n sequences (or the best n beams): each its own echo
                detok = IncrementalDetokenizer(self.tokenizer, req.stop_words) if req.detokenize else None
                self._waiting.append(_Req(req, handle, detok, end_ids, now, sequence_index=i))
            self.submitted.append(req)
            self._cv.notify_all()
        return handle

    def cancel(self, request_id: str) -> None:
        with self._cv:
            self._cancels.add(request_id)
            self._cv.notify_all()

    def stats(self) -> dict[str, float]:
        with self._cv:
            used = sum(len(r.request.prompt_ids) + len(r.generated) for r in self._running)
            total = self.config.kv_budget_tokens
            return {"waiting": len(self._waiting), "running": len(self._running), "kv_total_tokens": total,
                    "kv_used_tokens": used, "kv_free_tokens": total - used, "kv_free_fraction": (total - used) / total,
                    "generated_tokens": self.generated_tokens}

    def hold(self) -> None:
        with self._cv:
            self._held = True

    def release(self) -> None:
        with self._cv:
            self._held = False
            self._cv.notify_all()

    # -- the step loop -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and (self._held or not (self._waiting or self._running or self._cancels)):
                    self._cv.wait()
                if self._stopping:
                    return
                cancels, self._cancels = self._cancels, set()
                for r in [r for r in self._waiting + self._running if r.request.request_id in cancels]:
                    (self._waiting if r in self._waiting else self._running).remove(r)
                    self._finish(r, "cancelled")
                while self._waiting and len(self._running) < self.config.max_num_seqs:
                    admitted = self._waiting.pop(0)
                    admitted.admitted = time.perf_counter()
                    self._running.append(admitted)
                running = list(self._running)
            for r in running:
                self._step(r)
            with self._cv:
                self._running = [r for r in self._running if not r.finished]
            time.sleep(self.step_s)

    def _step(self, r: _Req) -> None:
        req = r.request
        source = [t for t in req.prompt_ids if t != BOS] or [ord("x")]
        i = len(r.generated)
        end = min(r.end_ids)
        token = source[i] if i < len(source) else (end if i >= req.min_tokens else source[i % len(source)])
        now = time.perf_counter()
        if self.observer:
            if i == 0:
                if r.sequence_index == 0:
                    self.observer.on_first_token(req.request_id, now - r.arrived)
            else:
                self.observer.on_token(req.request_id, now - r.last_at)
        r.last_at = now
        if r.first_at is None:
            r.first_at = now
        self.generated_tokens += 1
        if token in r.end_ids and i >= req.min_tokens:
            self._finish(r, "stop")
            return
        r.generated.append(token)
        r.pending.append(token)
        if r.detok is not None:
            piece = r.detok.add([token])
            if piece:
                r.text.append(piece)
            if r.detok.stopped:
                self._finish(r, "stop")
                return
        if len(r.generated) >= req.max_tokens:
            self._finish(r, "length")
        elif req.stream and (r.detok is None or r.text):
            self._emit(r)

    def _emit(self, r: _Req, finished: bool = False, reason: str | None = None) -> None:
        out = GenerationOutput(r.request.request_id, r.pending, "".join(r.text), [-0.5] * len(r.pending), finished,
                               reason, None, len(r.request.prompt_ids), len(r.generated), -0.5 * len(r.generated),
                               queue_s=None if r.admitted is None else r.admitted - r.arrived,
                               arrival_ns=_ns(r.arrived), first_scheduled_ns=_ns(r.admitted),
                               first_token_ns=_ns(r.first_at), last_token_ns=_ns(r.first_at and r.last_at),
                               kv_blocks=-(-(len(r.request.prompt_ids) + len(r.generated)) // KV_BLOCK),
                               sequence_index=r.sequence_index)
        r.pending, r.text = [], []
        r.handle.put(out)

    def _finish(self, r: _Req, reason: str) -> None:
        if r.finished:
            return
        r.finished = True
        if r.detok is not None and reason != "cancelled":
            tail = r.detok.finish()
            if tail:
                r.text.append(tail)
        self._emit(r, True, reason)
        if reason == "cancelled" and r.handle.done.is_set():
            self.cancelled.append(r.request.request_id)
        if self.observer and r.handle.done.is_set():
            self.observer.on_finished(r.request.request_id, reason, len(r.generated))
