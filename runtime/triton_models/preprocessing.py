"""`preprocessing`: text_input (+ bad_words) -> input_ids, input_lengths, bad_words_list with the
engine's tokenizer (runtime/triton_models/text.py `preprocess`). config.pbtxt parameter:
`engine_dir` (where the tokenizer is read from). A bad input is an INVALID_ARG error naming it."""

from __future__ import annotations

from typing import Any

import triton_python_backend_utils as pb_utils

from . import backend
from .text import preprocess


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.tokenizer = backend.load_engine_tokenizer(backend.engine_dir(backend.parameters(args), args))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                outputs = preprocess(self.tokenizer, backend.input_tensors(request))
                responses.append(pb_utils.InferenceResponse(output_tensors=backend.output_tensors(outputs)))
            except Exception as e:  # noqa: BLE001 - one bad request must not fail the others
                responses.append(backend.error_response(e))
        return responses
