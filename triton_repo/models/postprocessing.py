"""`postprocessing`: one `llama` response -> text_output (+ log probs and token counts passed
through), by stateless incremental detokenization of the response's ids after its `context_ids`
window (triton_repo/models/text.py `postprocess`). config.pbtxt parameter: `engine_dir`."""

from __future__ import annotations

from llamaforge.triton_repo.models import backend
from llamaforge.triton_repo.models.text import postprocess


class TritonPythonModel(backend.TokenizerModel):
    transform = staticmethod(postprocess)
