"""`postprocessing`: one `llama` response -> text_output (+ log probs and token counts passed
through), by stateless incremental detokenization of the response's ids after its `context_ids`
window (runtime/triton_models/text.py `postprocess`). config.pbtxt parameter: `engine_dir`."""

from __future__ import annotations

from . import backend
from .text import postprocess


class TritonPythonModel(backend.TokenizerModel):
    transform = staticmethod(postprocess)
