"""KServe v2 / Triton responses of the two model interfaces (`runtime/serving/model_interface.py`)
for requests `runtime/serving/protocol.py` parsed: a row's outputs as stream pieces or one whole
response (`ResponseBuilder`), a beam search's beams stacked in one (`BeamResponseBuilder`, as
TensorRT-LLM answers one), and a batch's rows stacked (`stack_rows`). The semantics (logits
layouts, final-response flags, what a stream carries) are protocol.py's docstring's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from llamaforge.runtime.core.requests import GenerationOutput
from llamaforge.runtime.serving.protocol import ParsedRequest
from llamaforge.runtime.serving.tensor_codec import NP_TYPES, encode_output

__all__ = ["FINAL_PARAM", "ResponseBuilder", "BeamResponseBuilder", "response_builder", "responses_per_row",
           "encode_response", "output_tensors", "stack_arrays", "stack_rows"]

FINAL_PARAM = "triton_final_response"


def responses_per_row(parsed: ParsedRequest) -> int:
    """How many sequences of a row answer apart: its n (num_return_sequences, each tagged by
    sequence_index), or 1 for a beam search, whose beams answer together."""
    return 1 if parsed.generation.beam_width > 1 else parsed.generation.n


class ResponseBuilder:
    """Turns a request's `GenerationOutput`s into ModelInferResponses.

    Streams: `piece(out)` per core output (None when it brings nothing new). Unary: `add(out)` for
    each output, then `whole()`."""

    def __init__(self, parsed: ParsedRequest, model_name: str) -> None:
        self.parsed = parsed
        self.model_name = model_name
        self._ids: list[int] = []
        self._text: list[str] = []
        self._log_probs: list[float] = []
        self._generation_logits: list[np.ndarray] = []
        self.last: GenerationOutput | None = None

    def add(self, out: GenerationOutput) -> None:
        self._ids.extend(out.token_ids)
        self._text.append(out.text)
        self._log_probs.extend(out.log_probs)
        if out.generation_logits is not None:
            self._generation_logits.append(out.generation_logits)
        self.last = out

    def whole(self) -> pb.ModelInferResponse:
        """The unary response: everything generated (after the prompt unless excluded)."""
        return self._encode(self.whole_tensors())

    def whole_tensors(self) -> dict[str, tuple[str, np.ndarray]]:
        """`whole()`'s tensors, every output of either model: name -> (datatype, array)."""
        p, last = self.parsed, self.last
        assert last is not None
        text, ids = "".join(self._text), list(self._ids)
        if not p.exclude_input:
            if p.spec.kind == "text":
                text = (p.prompt_text or "") + text
            else:
                ids = list(p.generation.prompt_ids) + ids
        rows = self._generation_logits
        generation = (rows[0] if len(rows) == 1 else np.concatenate(rows)) if rows else None
        return output_tensors(text, ids, self._log_probs, last, batch_index=self.parsed.batch_index,
                              generation_logits=generation)

    def piece(self, out: GenerationOutput, final: bool | None) -> pb.ModelInferResponse | None:
        """A stream response with only what `out` brings; None if nothing new and not final.
        `final`: the value of triton_final_response to set (None: do not set it)."""
        self.last = out
        if not out.text and not out.token_ids and not final:
            return None
        tensors = output_tensors(out.text, list(out.token_ids), list(out.log_probs), out, self.parsed.outputs,
                                 batch_index=self.parsed.batch_index, generation_logits=out.generation_logits,
                                 streaming=True)
        resp = self._encode(tensors)
        if final is not None:
            resp.parameters[FINAL_PARAM].bool_param = final
        return resp

    def empty_final(self) -> pb.ModelInferResponse:
        resp = pb.ModelInferResponse(model_name=self.model_name, model_version="1", id=self.parsed.client_id)
        resp.parameters[FINAL_PARAM].bool_param = True
        return resp

    def _encode(self, tensors: dict[str, tuple[str, np.ndarray]]) -> pb.ModelInferResponse:
        return encode_response(tensors, self.parsed, self.model_name)


# The outputs that hold one entry per beam, and the axis of it: TensorRT-LLM's [batch, beam, ...]
# (text_output, flat, is postprocessing's one string per beam). The rest describe the row (first beam's).
_BEAM_AXIS = {"text_output": 0, "output_ids": 1, "sequence_length": 1, "cum_log_probs": 1, "output_log_probs": 1,
              "generation_logits": 1}


class BeamResponseBuilder:
    """One row's beams in one response, as TensorRT-LLM answers a beam search (never streamed: the
    engine core refuses stream with beams): `add(out)` for each beam's output (by sequence_index),
    then `whole()` with the beams stacked along the beam axis, best first."""

    def __init__(self, parsed: ParsedRequest, model_name: str) -> None:
        self.parsed = parsed
        self.model_name = model_name
        self.beams = [ResponseBuilder(parsed, model_name) for _ in range(parsed.generation.n)]

    def add(self, out: GenerationOutput) -> None:
        self.beams[out.sequence_index].add(out)

    def whole(self) -> pb.ModelInferResponse:
        return encode_response(self.whole_tensors(), self.parsed, self.model_name)

    def whole_tensors(self) -> dict[str, tuple[str, np.ndarray]]:
        rows = [b.whole_tensors() for b in self.beams]
        tensors = dict(rows[0])
        for name, axis in _BEAM_AXIS.items():
            if name in tensors:
                beams = [np.moveaxis(row[name][1], axis, 0) for row in rows]
                tensors[name] = (tensors[name][0], np.moveaxis(stack_arrays([{name: a} for a in beams])[name], 0, axis))
        return tensors

    def piece(self, out: GenerationOutput, final: bool | None) -> pb.ModelInferResponse | None:
        raise AssertionError("beam search is never streamed")

    def empty_final(self) -> pb.ModelInferResponse:
        return self.beams[0].empty_final()


def response_builder(parsed: ParsedRequest, model_name: str) -> ResponseBuilder | BeamResponseBuilder:
    """The builder of one row's response (one sequence's, or the row's beams')."""
    return BeamResponseBuilder(parsed, model_name) if parsed.generation.beam_width > 1 else \
        ResponseBuilder(parsed, model_name)


def encode_response(tensors: Mapping[str, tuple[str, np.ndarray]], parsed: ParsedRequest,
                    model_name: str) -> pb.ModelInferResponse:
    """A ModelInferResponse with the outputs `parsed` asks for, in its order; a requested output
    that was not computed (context_logits or generation_logits without its return_* flag) is left
    out, as TensorRT-LLM leaves out the outputs a request did not ask it to compute."""
    resp = pb.ModelInferResponse(model_name=model_name, model_version="1", id=parsed.client_id)
    for name in parsed.outputs:
        if name not in tensors:
            continue
        dtype, arr = tensors[name]
        tensor, data = encode_output(name, dtype, arr)
        resp.outputs.append(tensor)
        resp.raw_output_contents.append(data)
    return resp


def output_tensors(text: str, ids: list[int], log_probs: list[float], out: GenerationOutput,
                   names: Iterable[str] | None = None, batch_index: int = 0,
                   generation_logits: np.ndarray | None = None,
                   streaming: bool = False) -> dict[str, tuple[str, np.ndarray]]:
    """Output tensors for one row's response: name -> (datatype, array); those in `names`, or every
    output of the text and token models, except the logits a request did not ask for (context
    logits come from `out`; `generation_logits` [N, vocab] are the response's tokens' rows, laid out
    as a stream piece's when `streaming`; see "Logits" in protocol.py). Shapes are one batch row's
    (`[1, ...]`) except text_output, which is `[1]` as TensorRT-LLM's postprocessing sends it (its
    clients read `text_output[0]` as the string). A stream response builds only what its request
    asked for."""

    def one(dtype: str, value: float | int | None) -> Callable[[], tuple[str, np.ndarray]]:
        return lambda: (dtype, np.array([[0 if value is None else value]], dtype=NP_TYPES[dtype]))

    make: dict[str, Callable[[], tuple[str, np.ndarray]]] = {
        "text_output": lambda: ("BYTES", np.array([text.encode("utf-8")], dtype=np.object_)),
        "output_ids": lambda: ("INT32", np.array(ids, dtype=np.int32).reshape(1, 1, -1)),
        "sequence_length": lambda: ("INT32", np.array([[len(ids)]], dtype=np.int32)),
        "cum_log_probs": lambda: ("FP32", np.array([[out.cum_log_prob]], dtype=np.float32)),
        "output_log_probs": lambda: ("FP32", np.array(log_probs, dtype=np.float32).reshape(1, 1, -1)),
        "batch_index": one("INT32", batch_index),
        "sequence_index": one("INT32", out.sequence_index),
        "kv_cache_alloc_new_blocks": one("INT32", out.kv_blocks - out.kv_reused_blocks),
        "kv_cache_reused_blocks": one("INT32", out.kv_reused_blocks),
        "kv_cache_alloc_total_blocks": one("INT32", out.kv_blocks),
        "arrival_time_ns": one("INT64", out.arrival_ns),
        "first_scheduled_time_ns": one("INT64", out.first_scheduled_ns),
        "first_token_time_ns": one("INT64", out.first_token_ns),
        "last_token_time_ns": one("INT64", out.last_token_ns),
        "acceptance_rate": one("FP32", out.num_accepted_draft_tokens / out.num_draft_tokens if out.num_draft_tokens else 0.0),
        "total_accepted_draft_tokens": one("INT32", out.num_accepted_draft_tokens),
        "total_draft_tokens": one("INT32", out.num_draft_tokens),
        "num_input_tokens": one("INT32", out.num_input_tokens),
        "num_output_tokens": one("INT32", out.num_output_tokens),
    }
    context = out.context_logits
    if context is not None:
        make["context_logits"] = lambda: ("FP32", context[None])
    if generation_logits is not None:
        rows = generation_logits  # [N, vocab]: TRT-LLM's [beam, N, vocab] whole, [N, beam, vocab] streamed
        make["generation_logits"] = lambda: ("FP32", rows[None, :, None] if streaming else rows[None, None])
    return {name: make[name]() for name in (make if names is None else names) if name in make}


def stack_arrays(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The rows' tensors (in row order) as one batch: each tensor concatenated along its first
    dimension, shorter trailing dimensions padded with 0 (as a batch's output_ids are padded;
    sequence_length gives each row's real length). A tensor only some rows have (logits that one
    row asked for and another did not) is all 0 in the others."""
    stacked: dict[str, np.ndarray] = {}
    for name in dict.fromkeys(name for row in rows for name in row):
        present = [row[name] for row in rows if name in row]
        first = present[0]
        shape = tuple(max(a.shape[d] for a in present) for d in range(1, first.ndim))
        padded = []
        for row in rows:
            a = row[name] if name in row else np.zeros((1, *shape), first.dtype)
            pad = [(0, 0)] + [(0, want - have) for want, have in zip(shape, a.shape[1:])]
            padded.append(a if not any(p for _, p in pad) else np.pad(a, pad, constant_values=0))
        stacked[name] = np.concatenate(padded, axis=0)
    return stacked


def stack_rows(rows: Sequence[Mapping[str, tuple[str, np.ndarray]]]) -> dict[str, tuple[str, np.ndarray]]:
    """`stack_arrays` for `output_tensors` rows ({name: (datatype, array)})."""
    stacked = stack_arrays([{name: arr for name, (_, arr) in row.items()} for row in rows])
    datatypes = {name: dtype for row in reversed(rows) for name, (dtype, _) in row.items()}
    return {name: (datatypes[name], arr) for name, arr in stacked.items()}
