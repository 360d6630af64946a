"""`bls`: the ensemble's text interface in one model (one hop for the client), decoupled as llama
is (`make repo DECOUPLED=...`; config.pbtxt `model_transaction_policy.decoupled`).

Per row of a request (max_batch_size > 0: each row its own sequence, as TensorRT-LLM's), on its own
thread: `preprocess` in-process, then the `llama` model through a BLS call
(`pb_utils.InferenceRequest(model_name="llama", ...).exec(decoupled=True)`) with that row's
tensors, then `postprocess` in-process on each of llama's responses, each result (with the row's
`batch_index`) sent through the request's response sender; the last response of the last row to
end carries TRITONSERVER_RESPONSE_COMPLETE_FINAL. A row's error is the request's final response
(the other rows' llama calls are cancelled).

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

Non-decoupled (llama is then non-decoupled too): `execute` serves its requests in turn, each row
with one BLS call (`exec()`, one response) postprocessed, the rows stacked into the request's one
response; a stream=true request comes back as llama's INVALID_ARG error.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from llamaforge.runtime.serving.model_interface import TEXT_MODEL
from llamaforge.runtime.serving.protocol import split_rows
from llamaforge.runtime.serving.responses import stack_arrays
from llamaforge.triton_repo.models import backend
from llamaforge.triton_repo.models.interfaces import (
    ECHOED,
    ENSEMBLE_TO_LLAMA,
    INTERFACES,
    LLAMA,
    NOT_FOR_LLAMA,
    POSTPROCESSING,
)
from llamaforge.triton_repo.models.text import postprocess, preprocess

# What postprocessing reads from llama (the echoed inputs bls has itself, per row).
_POSTPROCESSING_LLAMA_OUTPUTS = tuple(t.name for t in INTERFACES[POSTPROCESSING].inputs if t.name not in ECHOED)


def llama_inputs(tensors: Mapping[str, np.ndarray], pre: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The llama request of a text request: the ensemble's wiring (interfaces.py), done by hand."""
    llama_names = {t.name for t in INTERFACES[LLAMA].inputs}
    inputs = {name: arr for name, arr in pre.items()}
    for name, arr in tensors.items():
        target = ENSEMBLE_TO_LLAMA.get(name, name)
        if target in llama_names and name not in NOT_FOR_LLAMA:
            inputs[target] = arr
    return inputs


def _rows(tensors: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """A request's rows, each as a batch of one (what a one-row client would send)."""
    return [{name: arr[None] for name, arr in row.items()} for row in split_rows(tensors, TEXT_MODEL)]


def _sequences(row: Mapping[str, np.ndarray]) -> int:
    """How many sequences llama answers for a row, each ending with its own final response:
    num_return_sequences, or 1 for a beam search (one response holds its beams); llama checks the
    values."""
    def value(name: str) -> int:
        arr = row.get(name)
        return int(arr.reshape(-1)[0]) if arr is not None and arr.size else 1
    return 1 if value("beam_width") > 1 else max(1, value("num_return_sequences"))


class _Request:
    """The sequences of one decoupled request's rows (one a row, n with num_return_sequences): the
    final flag goes with the last response of the last sequence to end; an error ends the request
    (its other rows stop at their next response)."""

    def __init__(self, sender: Any, rows: int) -> None:
        self.sender = sender
        self.open_rows = rows
        self.closed = False
        self._lock = threading.Lock()

    def send(self, response: Any = None, row_done: bool = False) -> None:
        with self._lock:
            if self.closed:
                return
            if row_done:
                self.open_rows -= 1
            final = self.open_rows == 0
            self.closed = final
        if response is None and not final:
            return
        self.sender.send(response, flags=backend.FINAL if final else 0)

    def fail(self, response: Any) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self.sender.send(response, flags=backend.FINAL)


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
            sender = request.get_response_sender()
            try:
                rows = _rows(backend.input_tensors(request))
            except Exception as e:  # noqa: BLE001 - answer the request rather than leave it hanging
                sender.send(backend.error_response(e), flags=backend.FINAL)
                continue
            group = _Request(sender, sum(_sequences(row) for row in rows))
            for index, row in enumerate(rows):
                thread = threading.Thread(target=self._serve, args=(request, group, index, row), name="bls-row",
                                          daemon=True)
                with self._lock:
                    self._threads.add(thread)
                thread.start()
        return None

    def finalize(self) -> None:
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=5)

    def _serve(self, request: Any, group: _Request, index: int, row: dict[str, np.ndarray]) -> None:
        try:
            self._run(request, group, index, row)
        except Exception as e:  # noqa: BLE001 - the client must get its final response
            try:
                group.fail(backend.error_response(e))
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

    def _postprocess(self, row: Mapping[str, np.ndarray], response: Any, index: int) -> dict[str, np.ndarray]:
        outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
        text = postprocess(self.tokenizer, {**row, **outputs})
        # llama saw this row alone, as row 0 (its n sequences stacked, non-decoupled)
        text["batch_index"] = np.full((len(text["text_output"]), 1), index, dtype=np.int32)
        return text

    def _one_response(self, request: Any) -> Any:
        """Non-decoupled: the request's one response (its rows' whole texts stacked, or an error)."""
        try:
            rows = _rows(backend.input_tensors(request))
            texts = []
            for index, row in enumerate(rows):
                response = self._llama_call(request, row).exec()
                if response.has_error():
                    return pb_utils.InferenceResponse(error=response.error())
                texts.append(self._postprocess(row, response, index))
            if len(texts) > 1:
                texts = [stack_arrays(texts)]
            return pb_utils.InferenceResponse(output_tensors=backend.output_tensors(texts[0]))
        except Exception as e:  # noqa: BLE001 - one bad request must not fail the others
            return backend.error_response(e)

    def _run(self, request: Any, group: _Request, index: int, row: dict[str, np.ndarray]) -> None:
        responses = self._llama_call(request, row).exec(decoupled=True)
        open_sequences = _sequences(row)  # each ends with its final response (is_final)
        cancelled = False
        for response in responses:
            if cancelled:
                continue  # drain until llama's final response: then its KV blocks are free
            if request.is_cancelled() or group.closed:
                responses.cancel()
                cancelled = True
                continue
            if response.has_error():
                group.fail(pb_utils.InferenceResponse(error=response.error()))
                return
            outputs = {t.name(): t.as_numpy() for t in response.output_tensors()}
            if not outputs:  # a final flag with no data
                continue
            text = self._postprocess(row, response, index)
            final = bool(outputs["is_final"].reshape(-1)[0])
            group.send(pb_utils.InferenceResponse(output_tensors=backend.output_tensors(text)), row_done=final)
            open_sequences -= final
            if not open_sequences:
                return
        if cancelled:
            group.fail(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"request {request.request_id()} was cancelled", pb_utils.TritonError.CANCELLED)))
        else:
            for _ in range(open_sequences):  # llama ended without their final data responses
                group.send(row_done=True)
