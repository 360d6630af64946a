"""The tensors of each model in a generated Triton repository and how the ensemble wires them.

Everything is derived from the `TensorSpec`s of `runtime/serving/model_interface.py` (the one source of truth for
the TensorRT-LLM-compatible interfaces):

* `ensemble` and `bls` expose `TEXT_MODEL` (text_input, max_tokens, stream, ... -> text_output, ...);
* `llama` is `TOKEN_MODEL` (TensorRT-LLM's `tensorrt_llm` tensors: input_ids, request_output_len,
  streaming, ... -> output_ids, ...) plus text `stop_words`, the prompt `text_input` and the image
  inputs (`image_url_input`, `image_bytes_input`: Llama 3.2 Vision engines), and
  outputs that let the stateless `postprocessing` step make each row's text exactly (see
  runtime/core/detokenizer.py): `context_ids` (the generated ids before this response's, from a
  resume point), `context_continues` (text was generated before them), `is_final` (the row's last
  response), and the row's own request inputs that postprocessing reads, echoed (`echo_text_input`,
  `echo_stop_words`, `echo_stream`, `echo_exclude_input_in_output`): a response of llama is one
  row's, so postprocessing must not read the ensemble's (B-row) inputs;
* `preprocessing`: text_input (+ bad_words) -> input_ids, input_lengths, bad_words_list;
* `postprocessing`: llama's outputs (with the echoed text_input, stop_words, stream,
  exclude_input_in_output under those names) -> the ensemble's outputs; log probs, logits, batch
  and sequence index, perf metrics and token counts passed through so that every ensemble response
  comes out of one step. The logits are optional inputs: llama sends them only to a request that
  asked (return_*_logits), and Triton's ensemble leaves an optional input out when the step before
  did not produce it.

Every model declares `max_batch_size` MAX_BATCH_SIZE (> 0, as TensorRT-LLM's models), so Triton
puts the batch dimension before the declared dims: a client sends `[[prompt]]` ([1, 1]), `[[64]]`,
`[[ids...]]` for one row, `[B, 1]` ... for B rows (TensorRT-LLM's `--batch-inputs`), and checks
that every input of a request has the same batch size. Each of `llama`'s responses is one row's
(`[1, ...]` tensors with its `batch_index`), so every step after it runs on batch-1 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llamaforge.runtime.serving.model_interface import TEXT_MODEL, TOKEN_MODEL, ModelSpec, TensorSpec

__all__ = [
    "PREPROCESSING", "LLAMA", "POSTPROCESSING", "ENSEMBLE", "BLS", "LLAMA_MODEL", "ENSEMBLE_TO_LLAMA",
    "LLAMA_TO_ENSEMBLE", "NOT_FOR_LLAMA", "ECHOED", "INTERFACES", "Step", "ENSEMBLE_STEPS", "ModelInterface",
]

PREPROCESSING, LLAMA, POSTPROCESSING, ENSEMBLE, BLS = "preprocessing", "llama", "postprocessing", "ensemble", "bls"


@dataclass(frozen=True)
class ModelInterface:
    """A model's inputs and outputs with their config.pbtxt dims."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    decoupled: bool

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


_TEXT_STOP_WORDS = next(t for t in TEXT_MODEL.inputs if t.name == "stop_words")
_TEXT_INPUT = replace(next(t for t in TEXT_MODEL.inputs if t.name == "text_input"), optional=True,
                      doc="the prompt's text (ensemble, bls): echoed per row for postprocessing")
# Llama 3.2 Vision engines: the images go from the ensemble straight to `llama` (its engine core
# preprocesses them), under TensorRT-LLM's multimodal names.
_IMAGE_INPUTS = tuple(t for t in TEXT_MODEL.inputs if t.name in ("image_url_input", "image_bytes_input"))
_CONTEXT_OUTPUTS = (
    TensorSpec("context_ids", "INT32", (-1,), doc="generated ids before this response's, from a resume point"),
    TensorSpec("context_continues", "BOOL", (1,), doc="text was generated before context_ids"),
    TensorSpec("is_final", "BOOL", (1,), doc="the row's last response"),
)
# The text model's inputs that postprocessing reads, which llama echoes per row as echo_<name>.
ECHOED = ("text_input", "stop_words", "stream", "exclude_input_in_output")
_ECHO_OUTPUTS = tuple(replace(t, name=f"echo_{t.name}", optional=True) for t in TEXT_MODEL.inputs if t.name in ECHOED)

# What `llama` parses requests against: the token model plus text stop words and the prompt text.
LLAMA_MODEL = ModelSpec(
    name=LLAMA, kind="tokens", inputs=(*TOKEN_MODEL.inputs, _TEXT_STOP_WORDS, _TEXT_INPUT, *_IMAGE_INPUTS),
    outputs=(*TOKEN_MODEL.outputs, *_CONTEXT_OUTPUTS, *_ECHO_OUTPUTS), aliases=TOKEN_MODEL.aliases,
    default_outputs=TOKEN_MODEL.default_outputs, perf_metric_outputs=TOKEN_MODEL.perf_metric_outputs,
)

# Ensemble input -> llama input where TensorRT-LLM's names differ between its ensemble and its
# `tensorrt_llm` model; every other sampling input has the same name in both.
ENSEMBLE_TO_LLAMA = {"max_tokens": "request_output_len", "stream": "streaming", "top_k": "runtime_top_k",
                     "top_p": "runtime_top_p", "length_penalty": "len_penalty"}
LLAMA_TO_ENSEMBLE = {v: k for k, v in ENSEMBLE_TO_LLAMA.items()}
# Ensemble inputs consumed by the preprocessing step rather than by llama.
NOT_FOR_LLAMA = {"bad_words"}
# llama's outputs that postprocessing does not read, and those it may not get (sent only when asked).
_NOT_FOR_POSTPROCESSING = {t.name for t in _ECHO_OUTPUTS}
_ONLY_WHEN_ASKED = {"context_logits", "generation_logits"}

INTERFACES: dict[str, ModelInterface] = {
    PREPROCESSING: ModelInterface(
        PREPROCESSING,
        inputs=tuple(t for t in TEXT_MODEL.inputs if t.name in ("text_input", "bad_words")),
        outputs=(
            TensorSpec("input_ids", "INT32", (-1,)),
            TensorSpec("input_lengths", "INT32", (1,)),
            TensorSpec("bad_words_list", "INT32", (2, -1)),
        ),
        decoupled=False,
    ),
    LLAMA: ModelInterface(LLAMA, inputs=LLAMA_MODEL.inputs, outputs=LLAMA_MODEL.outputs, decoupled=True),
    POSTPROCESSING: ModelInterface(
        POSTPROCESSING,
        inputs=(
            *(replace(t, optional=t.name in _ONLY_WHEN_ASKED) for t in LLAMA_MODEL.outputs
              if t.name not in _NOT_FOR_POSTPROCESSING),
            *(t for t in TEXT_MODEL.inputs if t.name in ECHOED),
        ),
        outputs=TEXT_MODEL.outputs,
        decoupled=False,
    ),
    ENSEMBLE: ModelInterface(ENSEMBLE, inputs=TEXT_MODEL.inputs, outputs=TEXT_MODEL.outputs, decoupled=True),
    BLS: ModelInterface(BLS, inputs=TEXT_MODEL.inputs, outputs=TEXT_MODEL.outputs, decoupled=True),
}


@dataclass(frozen=True)
class Step:
    """One ensemble step: model input -> ensemble tensor, model output -> ensemble tensor."""

    model: str
    input_map: dict[str, str]
    output_map: dict[str, str]


def _internal(model: str, name: str) -> str:
    return f"_{model}_{name}"


def _steps() -> tuple[Step, ...]:
    pre = INTERFACES[PREPROCESSING]
    llama_inputs = {t.name for t in INTERFACES[LLAMA].inputs}
    llama_map = {t.name: _internal(PREPROCESSING, t.name) for t in pre.outputs}
    for t in TEXT_MODEL.inputs:
        if t.name not in NOT_FOR_LLAMA:
            target = ENSEMBLE_TO_LLAMA.get(t.name, t.name)
            assert target in llama_inputs, f"ensemble input {t.name} has no llama input {target}"
            llama_map[target] = t.name
    post = INTERFACES[POSTPROCESSING]
    post_map = {t.name: _internal(LLAMA, f"echo_{t.name}" if t.name in ECHOED else t.name) for t in post.inputs}
    return (
        Step(PREPROCESSING, {t.name: t.name for t in pre.inputs}, {t.name: _internal(PREPROCESSING, t.name)
                                                                   for t in pre.outputs}),
        Step(LLAMA, llama_map, {t.name: _internal(LLAMA, t.name) for t in INTERFACES[LLAMA].outputs
                                if _internal(LLAMA, t.name) in post_map.values()}),
        Step(POSTPROCESSING, post_map, {t.name: t.name for t in post.outputs}),
    )


ENSEMBLE_STEPS = _steps()
