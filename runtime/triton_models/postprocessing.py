"""`postprocessing`: one `llama` response -> text_output (+ log probs and token counts passed
through), by stateless incremental detokenization of the response's ids after its `context_ids`
window (runtime/triton_models/text.py `postprocess`). config.pbtxt parameter: `engine_dir`."""

from __future__ import annotations

from typing import Any

import triton_python_backend_utils as pb_utils

from . import backend
from .text import postprocess


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.tokenizer = backend.load_engine_tokenizer(backend.engine_dir(backend.parameters(args), args))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                outputs = postprocess(self.tokenizer, backend.input_tensors(request))
                responses.append(pb_utils.InferenceResponse(output_tensors=backend.output_tensors(outputs)))
            except Exception as e:  # noqa: BLE001 - one bad request must not fail the others
                responses.append(backend.error_response(e))
        return responses
