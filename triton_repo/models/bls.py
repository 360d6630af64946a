"""`bls`: the ensemble's text interface in one model (one hop for the client), decoupled as llama
is (`make repo DECOUPLED=...`; config.pbtxt `model_transaction_policy.decoupled`).

Per request, on its own thread: `preprocess` in-process, then the `llama` model through a BLS call
(`pb_utils.InferenceRequest(model_name="llama", ...).exec(decoupled=True)`), then `postprocess`
in-process on each of llama's responses, each result sent through the request's response sender;
the last one carries TRITONSERVER_RESPONSE_COMPLETE_FINAL.

Why a thread per request here, when `llama` has none: this model holds no engine core, so there is
no sink to hand outputs to; it reads llama's responses through the iterator that
`exec(decoupled=True)` returns, and that iterator blocks until llama's next response. A request
waiting on it must not hold up the others, so each waits on its own thread (TensorRT-LLM's
`tensorrt_llm_bls` instead serves one request at a time per instance).

Why call `llama` rather than run an engine core here: that is what TensorRT-LLM's
`tensorrt_llm_bls` does, and it matters more than one saved hop: every request, ensemble or BLS,
lands in the one `llama` instance, so they share its running batch, its KV budget and one copy of
the weights on the GPU (a second core would double the memory and split the batch). Tokenization
and detokenization are in-process (the same functions as the `preprocessing` and `postprocessing`
models, so both paths give the same text). A cancelled BLS request cancels its llama call through
the response iterator's `cancel()` (checked between llama's responses), and llama frees its KV.
config.pbtxt parameters: `engine_dir` (tokenizer), `llama_model` (default "llama").

Non-decoupled (llama is then non-decoupled too): `execute` serves its requests in turn, each with
one BLS call (`exec()`, one response) and one postprocessed response, and returns the responses;
a stream=true request comes back as llama's INVALID_ARG error.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from llamaforge.triton_repo.models import backend
from llamaforge.triton_repo.models.interfaces import ENSEMBLE_TO_LLAMA, INTERFACES, LLAMA, NOT_FOR_LLAMA
from llamaforge.triton_repo.models.text import postprocess, preprocess

_POSTPROCESSING_LLAMA_OUTPUTS = ("output_ids", "context_ids", "context_continues", "is_final", "cum_log_probs",
                                 "output_log_probs", "num_input_tokens", "num_output_tokens")


def llama_inputs(tensors: Mapping[str, np.ndarray], pre: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The llama request of a text request: the ensemble's wiring (interfaces.py), done by hand."""
    llama_names = {t.name for t in INTERFACES[LLAMA].inputs}
    inputs = {name: arr for name, arr in pre.items()}
    for name, arr in tensors.items():
        target = ENSEMBLE_TO_LLAMA.get(name, name)
        if target in llama_names and name not in NOT_FOR_LLAMA:
            inputs[target] = arr
    return inputs


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        params = backend.parameters(args)
        self.tokenizer = backend.load_engine_tokenizer(backend.engine_dir(params, args))
        self.llama_model = params.get("llama_model", "").strip() or LLAMA
        self.decoupled = backend.decoupled(args)
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def execute(self, requests: list[Any]) -> list[Any] | None:
        if not self.decoupled:
            return [self._one_response(request) for request in requests]
        for request in requests:
            thread = threading.Thread(target=self._serve, args=(request,), name="bls-request", daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()
        return None

    def finalize(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=5)

    def _serve(self, request: Any) -> None:
        sender = request.get_response_sender()
        try:
            self._run(request, sender)
        except Exception as e:  # noqa: BLE001 - the client must get its final response
            try:
                sender.send(backend.error_response(e), flags=backend.FINAL)
            except Exception:  # noqa: BLE001 - the request is already gone
                pass
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _llama_call(self, request: Any, tensors: Mapping[str, np.ndarray]) -> Any:
        pre = preprocess(self.tokenizer, tensors)  # a bad text_input is INVALID_ARG before llama is called
        return pb_utils.InferenceRequest(
            model_name=self.llama_model, requested_output_names=list(_POSTPROCESSING_LLAMA_OUTPUTS),
            inputs=backend.output_tensors(llama_inputs(tensors, pre)), request_id=request.request_id())

    def _one_response(self, request: Any) -> Any:
        """Non-decoupled: the request's one response (its whole text, or its error)."""
        try:
            tensors = backend.input_tensors(request)
            response = self._llama_call(request, tensors).exec()
            if response.has_error():
                return pb_utils.InferenceResponse(error=response.error())
            outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
            text = postprocess(self.tokenizer, {**tensors, **outputs})
            return pb_utils.InferenceResponse(output_tensors=backend.output_tensors(text))
        except Exception as e:  # noqa: BLE001 - one bad request must not fail the others
            return backend.error_response(e)

    def _run(self, request: Any, sender: Any) -> None:
        tensors = backend.input_tensors(request)
        responses = self._llama_call(request, tensors).exec(decoupled=True)
        cancelled = False
        for response in responses:
            if cancelled:
                continue  # drain until llama's final response: then its KV blocks are free
            if request.is_cancelled():
                responses.cancel()
                cancelled = True
                continue
            if response.has_error():
                sender.send(pb_utils.InferenceResponse(error=response.error()), flags=backend.FINAL)
                return
            outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
            if not outputs:  # a final flag with no data
                continue
            text = postprocess(self.tokenizer, {**tensors, **outputs})
            final = bool(outputs["is_final"].reshape(-1)[0])
            sender.send(pb_utils.InferenceResponse(output_tensors=backend.output_tensors(text)),
                        flags=backend.FINAL if final else 0)
            if final:
                return
        if cancelled:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"request {request.request_id()} was cancelled", pb_utils.TritonError.CANCELLED)), flags=backend.FINAL)
        else:
            sender.send(flags=backend.FINAL)  # llama ended without a final data response
