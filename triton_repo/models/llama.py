"""`llama`: the in-flight batching engine as a decoupled Triton Python-backend model.

One `EngineCore` per model instance (runtime/core/engine_core.py, the step loop the standalone server
runs too) is started in `initialize`. `execute` parses each request (runtime/serving/protocol.py
`parse_inputs`, the server's own validation), submits it and returns at once; a sender thread per
request forwards the core's outputs through the request's `response_sender`, polls
`is_cancelled()` (a cancelled request is cancelled in the core, which frees its KV blocks within
one step) and always ends with TRITONSERVER_RESPONSE_COMPLETE_FINAL: on the last data response, or
on an error response (INVALID_ARG naming the field, UNAVAILABLE when the queue is full, CANCELLED,
INTERNAL). `max_batch_size: 0`: Triton hands requests over as they come and our scheduler batches.

config.pbtxt parameters (all strings; triton_repo/repository.py writes them):

    engine_dir              engine directory (absolute, or relative to the repository root)
    kv_budget_tokens        KV cache size in tokens ("" : kv_budget_bytes, or 16 full-context sequences)
    kv_budget_bytes         KV cache size in bytes ("" : not used)
    max_num_seqs            sequences in the running batch
    max_num_batched_tokens  tokens per engine step (prefill chunking)
    max_queue               waiting requests before UNAVAILABLE
    scheduling_policy       inflight | static
    intra_op_threads        ONNX Runtime threads ("" : ONNX Runtime's default)
    gpu_device_ids          GPUs this model may run on, comma-separated ("" : any); an instance that
                            Triton placed elsewhere (instance_group `gpus`) fails to load

Placement follows `instance_group`: KIND_CPU runs ONNX Runtime's CPU provider, KIND_GPU its CUDA
provider on `args["model_instance_device_id"]` (onnxruntime-gpu required; the CPU-only wheel is
refused with a message saying so). The engine manifest's `backend` picks the runner: "ort" runs
here; "trt" fails to load with a message, as this runtime has no TensorRT runner.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from llamaforge.runtime.core.detokenizer import resume_point
from llamaforge.runtime.core.engine import EngineError, ort_providers
from llamaforge.runtime.core.engine_core import CoreConfig, EngineCore
from llamaforge.runtime.serving.protocol import ModelContext, ParsedRequest, ResponseBuilder, output_tensors, parse_inputs
from llamaforge.runtime.core.requests import GenerationOutput, QueueFullError, RequestError, RequestHandle
from llamaforge.triton_repo.models import backend
from llamaforge.triton_repo.models.interfaces import LLAMA_MODEL
from llamaforge.triton_repo.models.metrics import TritonCoreMetrics

POLL_S = 0.05  # how often a waiting sender checks is_cancelled()


def core_config(params: dict[str, str], providers: list[Any]) -> CoreConfig:
    """CoreConfig from config.pbtxt parameters; a bad value is an error naming the parameter."""

    def integer(key: str) -> int | None:
        value = params.get(key, "").strip()
        if not value:
            return None
        try:
            n = int(value)
        except ValueError:
            raise EngineError(f"config.pbtxt parameter '{key}': {value!r} is not an integer") from None
        if n <= 0:
            raise EngineError(f"config.pbtxt parameter '{key}': must be > 0, got {n}")
        return n

    policy = params.get("scheduling_policy", "inflight").strip() or "inflight"
    if policy not in ("inflight", "static"):
        raise EngineError(f"config.pbtxt parameter 'scheduling_policy': {policy!r} is not 'inflight' or 'static'")
    defaults = CoreConfig()
    return CoreConfig(
        kv_budget_tokens=integer("kv_budget_tokens"), kv_budget_bytes=integer("kv_budget_bytes"),
        max_num_seqs=integer("max_num_seqs") or defaults.max_num_seqs,
        max_num_batched_tokens=integer("max_num_batched_tokens") or defaults.max_num_batched_tokens,
        max_queue=integer("max_queue") or defaults.max_queue, threads=integer("intra_op_threads"),
        policy=policy, providers=tuple(providers),
    )


def placement(params: dict[str, str], args: dict[str, str]) -> list[Any]:
    """ONNX Runtime providers for this instance, from instance_group (kind, device id)."""
    kind = args.get("model_instance_kind", "CPU").upper()
    if kind == "CPU":
        return ort_providers("cpu")
    if kind != "GPU":
        raise EngineError(f"instance_group kind {kind!r} is not supported (KIND_CPU or KIND_GPU)")
    device_id = int(args.get("model_instance_device_id", "0") or 0)
    allowed = [d.strip() for d in params.get("gpu_device_ids", "").split(",") if d.strip()]
    if allowed and str(device_id) not in allowed:
        raise EngineError(f"config.pbtxt parameter 'gpu_device_ids' is {','.join(allowed)} but Triton placed this "
                          f"instance on GPU {device_id} (instance_group gpus); make the two agree")
    return ort_providers("gpu", device_id)


class _ContextWindow:
    """The ids generated so far for one request and the window `postprocessing` needs before each
    response's new ids (runtime/core/detokenizer.py `resume_point`)."""

    def __init__(self, tokenizer: Any, stop_words: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop_words = stop_words
        self.generated: list[int] = []

    def tensors(self, new_ids: list[int], final: bool) -> dict[str, np.ndarray]:
        start, continuing = len(self.generated), False
        if self.tokenizer is not None:
            start, continuing = resume_point(self.tokenizer, self.generated, len(self.generated), self.stop_words)
        context = self.generated[start:]
        self.generated.extend(new_ids)
        return {"context_ids": np.array(context, dtype=np.int32), "context_continues": np.array([continuing]),
                "is_final": np.array([final])}


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = backend.parameters(args)
        providers = placement(params, args)
        config = core_config(params, providers)
        labels = {"model": args.get("model_name", "llama"), "version": args.get("model_version", "1"),
                  "instance": args.get("model_instance_name", "0")}
        self.core = EngineCore(backend.engine_dir(params, args), config)
        self.metrics = TritonCoreMetrics(labels)  # after the core loads: a failed load registers no metrics
        self.core.observer = self.metrics
        self.metrics.attach(self.core)
        self.ctx = ModelContext.from_core(self.core)
        self._senders: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self.core.start()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._submit(request)
        return None

    def finalize(self) -> None:
        self.core.stop()  # what is left finishes as cancelled, which ends every sender
        with self._lock:
            senders = list(self._senders)
        for t in senders:
            t.join(timeout=5)

    # -- per request -------------------------------------------------------------------------------
    def _submit(self, request: Any) -> None:
        sender = request.get_response_sender()
        try:
            parsed = parse_inputs(backend.input_tensors(request), LLAMA_MODEL, self.ctx, uuid.uuid4().hex,
                                  params=backend.request_parameters(request), client_id=request.request_id())
            # Text-aligned chunks: the core emits a stream response when its text grows, so no
            # response of the ensemble carries an empty piece of a split character.
            parsed.generation.detokenize = self.core.tokenizer is not None
            handle = self.core.submit(parsed.generation)
        except (RequestError, QueueFullError) as e:
            self.metrics.on_refused("invalid" if isinstance(e, RequestError) else "rejected")
            sender.send(backend.error_response(e), flags=backend.FINAL)
            return
        except Exception as e:  # noqa: BLE001 - answer the request rather than leave it hanging
            sender.send(backend.error_response(e), flags=backend.FINAL)
            return
        self.metrics.on_admitted(len(parsed.generation.prompt_ids))
        thread = threading.Thread(target=self._send_outputs, args=(request, sender, parsed, handle),
                                  name=f"llama-sender-{parsed.generation.request_id[:8]}", daemon=True)
        with self._lock:
            self._senders.add(thread)
        thread.start()

    def _send_outputs(self, request: Any, sender: Any, parsed: ParsedRequest, handle: RequestHandle) -> None:
        rid = parsed.generation.request_id
        builder = ResponseBuilder(parsed, "llama")
        window = _ContextWindow(self.core.tokenizer, parsed.generation.stop_words)
        last_check = time.monotonic()
        try:
            while True:
                try:
                    out = handle.get(timeout=POLL_S)
                except queue.Empty:
                    out = None
                now = time.monotonic()
                if out is None or now - last_check >= POLL_S:
                    last_check = now
                    if request.is_cancelled():
                        self.core.cancel(rid)
                if out is None:
                    continue
                if self._send(sender, parsed, builder, window, out):
                    return
        except Exception as e:  # noqa: BLE001 - the client must get its final response
            self.core.cancel(rid)
            try:
                sender.send(backend.error_response(e), flags=backend.FINAL)
            except Exception:  # noqa: BLE001 - the request is already gone
                pass
        finally:
            with self._lock:
                self._senders.discard(threading.current_thread())

    def _send(self, sender: Any, parsed: ParsedRequest, builder: ResponseBuilder, window: _ContextWindow,
              out: GenerationOutput) -> bool:
        """Send what `out` brings; True once the final response is sent."""
        if out.finished and out.finish_reason not in ("stop", "length"):
            request_id = parsed.client_id or parsed.generation.request_id
            if out.finish_reason == "cancelled":
                error = pb_utils.TritonError(f"request {request_id} was cancelled", pb_utils.TritonError.CANCELLED)
            else:
                error = pb_utils.TritonError(f"request {request_id} failed: {out.error or out.finish_reason}",
                                             pb_utils.TritonError.INTERNAL)
            sender.send(pb_utils.InferenceResponse(error=error), flags=backend.FINAL)
            return True
        if parsed.stream:
            tensors = {name: arr for name, (_, arr) in output_tensors(out.text, list(out.token_ids),
                                                                       list(out.log_probs), out).items()}
            tensors.update(window.tensors(list(out.token_ids), out.finished))
        elif out.finished:
            builder.add(out)
            tensors = {name: arr for name, (_, arr) in builder.whole_tensors().items()}
            tensors.update(window.tensors([], True))  # the whole text from an empty window
        else:
            builder.add(out)
            return False
        outputs = {t.name: tensors[t.name] for t in LLAMA_MODEL.outputs}
        sender.send(pb_utils.InferenceResponse(output_tensors=backend.output_tensors(outputs)),
                    flags=backend.FINAL if out.finished else 0)
        return out.finished
