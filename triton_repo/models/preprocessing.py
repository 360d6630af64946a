"""`preprocessing`: text_input (+ bad_words) -> input_ids, input_lengths, bad_words_list with the
engine's tokenizer (triton_repo/models/text.py `preprocess`). config.pbtxt parameter:
`engine_dir` (where the tokenizer is read from). A bad input is an INVALID_ARG error naming it."""

from __future__ import annotations

from llamaforge.triton_repo.models import backend
from llamaforge.triton_repo.models.text import preprocess


class TritonPythonModel(backend.TokenizerModel):
    transform = staticmethod(preprocess)
