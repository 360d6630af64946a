"""Guided decoding in the engine core (runtime/core/guided.py) on the trained stdlib-5m checkpoint
(a real byte-level BPE vocabulary of 4096 tokens): sampled at temperature 1, every output of at
least 200 requests over 5 JSON schemas validates with `jsonschema`, and likewise every output of
200 requests over regexes and 200 over grammars (GBNF and Lark) matches; a seed gives the same
output in any batch; a guide that does not compile is refused at submit naming the field, with
llguidance's message. Each group is one batch through one EngineCore (seconds)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from tiny_models import TinyBuilds

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig
from llamaforge.runtime.core.engine_core import EngineCore, run_to_completion
from llamaforge.runtime.core.guided import GuidedSpec
from llamaforge.runtime.core.requests import GenerationOutput, GenerationRequest, RequestError
from llamaforge.runtime.core.sampling import SamplingParams

STDLIB_5M = Path(__file__).resolve().parents[2] / "checkpoints" / "stdlib-5m"
PER_KIND = 200
MAX_TOKENS = 96

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"kind": {"enum": ["file", "dir", "link"]},
                                      "size": {"type": "integer", "minimum": 0, "maximum": 9999},
                                      "meta": {"type": "object", "properties": {"ro": {"type": "boolean"}},
                                               "required": ["ro"], "additionalProperties": False}},
     "required": ["kind", "size", "meta"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[a-f0-9]{4}$"},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
     "required": ["id", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "null"}, {"type": "boolean"},
                                                          {"type": "integer", "minimum": -50, "maximum": 50}]},
                                      "label": {"type": "string", "minLength": 1, "maxLength": 6}},
     "required": ["value", "label"], "additionalProperties": False},
]

REGEXES = [r"(yes|no|maybe)", r"[0-9]{3}-[0-9]{4}", r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)", r"v[0-9]\.[0-9]{1,2}"]

# A context-free grammar in GBNF (xgrammar's and TensorRT-LLM's EBNF flavour) and one in Lark, with a
# Python check of the language each defines.
GBNF = """root ::= expr
expr ::= term (("+" | "-") term)?
term ::= num | "(" inner ")"
inner ::= num (("*" | "/") num)?
num ::= [0-9] | [1-9] [0-9]
"""
_NUM = r"(?:[0-9]|[1-9][0-9])"
_TERM = rf"(?:{_NUM}|\({_NUM}(?:[*/]{_NUM})?\))"
GBNF_LANGUAGE = re.compile(rf"{_TERM}(?:[+-]{_TERM})?")
LARK = """start: pair ("," pair)~0..2
pair: KEY "=" VALUE
KEY: /[a-z]{1,4}/
VALUE: /[0-9]{1,3}/
"""
LARK_LANGUAGE = re.compile(r"[a-z]{1,4}=[0-9]{1,3}(?:,[a-z]{1,4}=[0-9]{1,3}){0,2}")


@pytest.fixture(scope="module")
def core(tiny_builds: TinyBuilds) -> Iterator[EngineCore]:
    if not (STDLIB_5M / "config.json").exists():
        pytest.skip("checkpoints/stdlib-5m is not here")
    engine = tiny_builds.engine(STDLIB_5M)
    c = EngineCore(engine, CoreConfig(KVCacheConfig(budget_tokens=48 * 192),
                                      SchedulerConfig(max_num_seqs=48, max_num_batched_tokens=2048), max_queue=1024))
    yield c
    c.stop()


def _requests(core: EngineCore, specs: list[GuidedSpec], prompts: tuple[str, ...] = ("def main(", "# config\n")
              ) -> list[GenerationRequest]:
    """PER_KIND requests at temperature 1, spread over `specs` and `prompts`, each with its own seed."""
    assert core.tokenizer is not None
    ids = [core.tokenizer.encode(p, add_bos=True) for p in prompts]
    return [GenerationRequest(f"g{i}", ids[i % len(ids)], MAX_TOKENS, SamplingParams(temperature=1.0, seed=i),
                              guided=specs[i % len(specs)]) for i in range(PER_KIND)]


def _all_stop(outs: list[GenerationOutput]) -> None:
    reasons = [o.finish_reason for o in outs]
    assert reasons == ["stop"] * len(outs), [(o.text, o.finish_reason) for o in outs if o.finish_reason != "stop"][:3]


def test_json_schemas_validate_every_sampled_output(core: EngineCore) -> None:
    specs = [GuidedSpec("json_schema", json.dumps(s)) for s in SCHEMAS]
    requests = _requests(core, specs)
    outs = run_to_completion(core, requests)
    _all_stop(outs)
    for request, out in zip(requests, outs):
        assert request.guided is not None
        jsonschema.validate(json.loads(out.text), json.loads(request.guided.guide))
    assert len({o.text for o in outs}) > PER_KIND // 2  # sampled, not one answer per schema


def test_any_json_is_an_object_or_an_array(core: EngineCore) -> None:
    requests = _requests(core, [GuidedSpec("json")])[:40]
    for out in run_to_completion(core, requests):
        if out.finish_reason == "stop":  # unbounded: an output may run to max_tokens
            assert isinstance(json.loads(out.text), (dict, list)), out.text
        else:
            assert out.text[:1] in ("{", "[")


def test_regexes_match_every_sampled_output(core: EngineCore) -> None:
    requests = _requests(core, [GuidedSpec("regex", r) for r in REGEXES])
    outs = run_to_completion(core, requests)
    _all_stop(outs)
    for request, out in zip(requests, outs):
        assert request.guided is not None and re.fullmatch(request.guided.guide, out.text), out.text


def test_grammars_match_every_sampled_output(core: EngineCore) -> None:
    requests = _requests(core, [GuidedSpec("ebnf_grammar", GBNF), GuidedSpec("ebnf_grammar", LARK)])
    outs = run_to_completion(core, requests)
    _all_stop(outs)
    for request, out in zip(requests, outs):
        assert request.guided is not None
        language = GBNF_LANGUAGE if request.guided.guide == GBNF else LARK_LANGUAGE
        assert language.fullmatch(out.text), out.text
    assert any("(" in o.text for o in outs) and any("," in o.text for o in outs)  # both grammars' branches


def test_a_seed_gives_the_same_guided_output_in_any_batch(core: EngineCore) -> None:
    spec = GuidedSpec("json_schema", json.dumps(SCHEMAS[0]))
    assert core.tokenizer is not None
    prompt = core.tokenizer.encode("def main(", add_bos=True)

    def one(rid: str) -> GenerationRequest:
        return GenerationRequest(rid, prompt, MAX_TOKENS, SamplingParams(temperature=1.0, seed=42, top_p=0.9), guided=spec)

    (alone,) = run_to_completion(core, [one("alone")])
    others = [GenerationRequest(f"o{i}", prompt, 20, SamplingParams(temperature=1.0, seed=i),
                                guided=GuidedSpec("regex", REGEXES[i % 4]) if i % 2 else None) for i in range(6)]
    batch = run_to_completion(core, [*others[:3], one("in-batch"), *others[3:]])
    assert batch[3].token_ids == alone.token_ids and batch[3].text == alone.text


@pytest.mark.parametrize(("spec", "message"), [
    (GuidedSpec("json_schema", '{"type": "objectx"}', field="response_format"), "objectx"),
    (GuidedSpec("json_schema", '{"type": ', field="response_format"), "not valid JSON"),
    (GuidedSpec("regex", "[a-"), "unclosed character class"),
    (GuidedSpec("ebnf_grammar", "root ::= foo"), "foo"),
    (GuidedSpec("ebnf_grammar", "start: foo"), "unknown name"),
])
def test_a_guide_that_does_not_compile_is_refused_naming_the_field(core: EngineCore, spec: GuidedSpec,
                                                                   message: str) -> None:
    assert core.tokenizer is not None
    with pytest.raises(RequestError) as e:
        core.submit(GenerationRequest("bad", core.tokenizer.encode("x"), 4, guided=spec))
    assert e.value.field == spec.field and message in str(e.value)
    with pytest.raises(RequestError, match="^guided_decoding_guide_type"):
        GuidedSpec("xml", "<a/>")
    assert core.idle()
