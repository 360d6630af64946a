"""The tensors of each model in a generated Triton repository and how the ensemble wires them.

Everything is derived from the `TensorSpec`s of `runtime/serving/model_interface.py` (the one source of truth for
the TensorRT-LLM-compatible interfaces):

* `ensemble` and `bls` expose `TEXT_MODEL` (text_input, max_tokens, stream, ... -> text_output, ...);
* `llama` is `TOKEN_MODEL` (TensorRT-LLM's `tensorrt_llm` tensors: input_ids, request_output_len,
  streaming, ... -> output_ids, ...) plus text `stop_words`, and three outputs that let the
  stateless `postprocessing` step stream text exactly (see runtime/core/detokenizer.py):
  `context_ids` (the generated ids before this response's, from a resume point),
  `context_continues` (text was generated before them) and `is_final` (the request's last response);
* `preprocessing`: text_input (+ bad_words) -> input_ids, input_lengths, bad_words_list;
* `postprocessing`: llama's outputs (+ text_input, stop_words, stream, exclude_input_in_output)
  -> the ensemble's outputs, log probs and token counts passed through so that every ensemble
  response comes out of one step.

Triton checks request shapes against the declared dims exactly, and with max_batch_size 0 there
is no implicit batch dimension, so client-facing inputs are declared with the leading 1 that
TensorRT-LLM clients send (`[[prompt]]`, `[[64]]`, `[ids]`): `batched()`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from llamaforge.runtime.serving.model_interface import TEXT_MODEL, TOKEN_MODEL, ModelSpec, TensorSpec

__all__ = [
    "PREPROCESSING", "LLAMA", "POSTPROCESSING", "ENSEMBLE", "BLS", "LLAMA_MODEL", "ENSEMBLE_TO_LLAMA",
    "LLAMA_TO_ENSEMBLE", "NOT_FOR_LLAMA", "INTERFACES", "Step", "ENSEMBLE_STEPS", "ModelInterface", "batched",
]

PREPROCESSING, LLAMA, POSTPROCESSING, ENSEMBLE, BLS = "preprocessing", "llama", "postprocessing", "ensemble", "bls"


def batched(t: TensorSpec) -> TensorSpec:
    """The spec as declared in a config.pbtxt: the client's leading batch dimension of 1 added."""
    return replace(t, dims=(1, *t.dims))


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
_CONTEXT_OUTPUTS = (
    TensorSpec("context_ids", "INT32", (-1,), doc="generated ids before this response's, from a resume point"),
    TensorSpec("context_continues", "BOOL", (1,), doc="text was generated before context_ids"),
    TensorSpec("is_final", "BOOL", (1,), doc="the request's last response"),
)

# What `llama` parses requests against: the token model plus text stop words.
LLAMA_MODEL = ModelSpec(
    name=LLAMA, kind="tokens", inputs=(*TOKEN_MODEL.inputs, _TEXT_STOP_WORDS),
    outputs=(*TOKEN_MODEL.outputs, *_CONTEXT_OUTPUTS), aliases=TOKEN_MODEL.aliases,
    default_outputs=TOKEN_MODEL.default_outputs,
)

# Ensemble input -> llama input where TensorRT-LLM's names differ between its ensemble and its
# `tensorrt_llm` model; every other sampling input has the same name in both.
ENSEMBLE_TO_LLAMA = {"max_tokens": "request_output_len", "stream": "streaming", "top_k": "runtime_top_k",
                     "top_p": "runtime_top_p", "length_penalty": "len_penalty"}
LLAMA_TO_ENSEMBLE = {v: k for k, v in ENSEMBLE_TO_LLAMA.items()}
# Ensemble inputs consumed by the pre/postprocessing steps rather than by llama.
NOT_FOR_LLAMA = {"text_input", "bad_words", "exclude_input_in_output"}
_FROM_POSTPROCESSING_INPUTS = ("text_input", "stop_words", "stream", "exclude_input_in_output")

INTERFACES: dict[str, ModelInterface] = {
    PREPROCESSING: ModelInterface(
        PREPROCESSING,
        inputs=tuple(batched(t) for t in TEXT_MODEL.inputs if t.name in ("text_input", "bad_words")),
        outputs=(
            TensorSpec("input_ids", "INT32", (1, -1)),
            TensorSpec("input_lengths", "INT32", (1, 1)),
            TensorSpec("bad_words_list", "INT32", (1, 2, -1)),
        ),
        decoupled=False,
    ),
    LLAMA: ModelInterface(LLAMA, inputs=tuple(batched(t) for t in LLAMA_MODEL.inputs), outputs=LLAMA_MODEL.outputs,
                          decoupled=True),
    POSTPROCESSING: ModelInterface(
        POSTPROCESSING,
        inputs=(
            *(replace(t, optional=False) for t in LLAMA_MODEL.outputs
              if t.name in ("output_ids", "context_ids", "context_continues", "is_final", "cum_log_probs",
                            "output_log_probs", "num_input_tokens", "num_output_tokens")),
            *(batched(t) for t in TEXT_MODEL.inputs if t.name in _FROM_POSTPROCESSING_INPUTS),
        ),
        outputs=TEXT_MODEL.outputs,
        decoupled=False,
    ),
    ENSEMBLE: ModelInterface(ENSEMBLE, inputs=tuple(batched(t) for t in TEXT_MODEL.inputs),
                             outputs=TEXT_MODEL.outputs, decoupled=True),
    BLS: ModelInterface(BLS, inputs=tuple(batched(t) for t in TEXT_MODEL.inputs), outputs=TEXT_MODEL.outputs,
                        decoupled=True),
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
    post_map = {t.name: (t.name if t.name in _FROM_POSTPROCESSING_INPUTS else _internal(LLAMA, t.name))
                for t in post.inputs}
    return (
        Step(PREPROCESSING, {t.name: t.name for t in pre.inputs}, {t.name: _internal(PREPROCESSING, t.name)
                                                                   for t in pre.outputs}),
        Step(LLAMA, llama_map, {t.name: _internal(LLAMA, t.name) for t in INTERFACES[LLAMA].outputs
                                if _internal(LLAMA, t.name) in post_map.values()}),
        Step(POSTPROCESSING, post_map, {t.name: t.name for t in post.outputs}),
    )


ENSEMBLE_STEPS = _steps()
