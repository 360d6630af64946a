"""`make repo`: the generated Triton model repository.

Every config.pbtxt parses into Triton's own `ModelConfig` (tritonclient.grpc.model_config_pb2) and
the ensemble's wiring is checked tensor by tensor. The Python-backend models run in-process against
tests/pb_utils_standin.py, a STAND-IN for `triton_python_backend_utils` and for the server around
it (a real Triton server cannot run here): streaming through the ensemble and through `bls` equals
the unary text equals transformers' greedy output, cancellation frees the KV cache, bad input gets
INVALID_ARG naming the field while the models keep serving, and two requests share steps of the
running batch of the one `llama` engine core.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pb_utils_standin as pb
import pytest
import torch
from google.protobuf import text_format
from tiny_models import load_hf_oracle, train_tiny_sentencepiece, train_tiny_tokenizer
from tritonclient.grpc import model_config_pb2 as mc

from llamaforge import cli
from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig, SpeculativeConfig
from llamaforge.runtime.core.detokenizer import IncrementalDetokenizer, decode_window, resume_point
from llamaforge.runtime.core.engine import EngineError
from llamaforge.runtime.core.tokenizer import load_tokenizer
from llamaforge.runtime.serving.metrics import CORE_GAUGES, METRIC_NAMES, PREFIX
from llamaforge.runtime.serving.model_interface import MAX_BATCH_SIZE, TEXT_MODEL
from llamaforge.triton_repo.repository import PYTHON_MODELS, RepoError, RepoOptions, model_configs, write_repo

pb.install()
from llamaforge.triton_repo.models import llama as llama_model  # noqa: E402 - needs the stand-in installed

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 24
PROMPTS = ("def main(args):\n", "import os\nimport sys\n\nclass Config:")


@pytest.fixture(scope="module")
def built(tiny_hf_checkpoint: Path, tiny_engine: Path) -> tuple[Path, Path]:
    """The session's tiny checkpoint and its fp32 engine (tests/conftest.py); read only."""
    return tiny_hf_checkpoint, tiny_engine


@pytest.fixture(scope="module")
def repo(built: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("repos") / "tiny"
    core = CoreConfig(KVCacheConfig(budget_tokens=2048), SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=128),
                      max_queue=16)
    return write_repo(RepoOptions(engine=built[1], out=out, device="cpu", core=core))


@pytest.fixture(scope="module")
def server(repo: Path) -> Any:
    s = pb.StandInServer(repo)
    yield s
    s.stop()


def configs_of(repo: Path) -> dict[str, mc.ModelConfig]:
    return {p.parent.name: text_format.Parse(p.read_text(), mc.ModelConfig()) for p in repo.glob("*/config.pbtxt")}


def text_request(prompt: str | bytes, max_tokens: int, **extra: Any) -> dict[str, np.ndarray]:
    """Tensors as TensorRT-LLM's end_to_end_grpc_client sends them ([[prompt]], [[n]], ...)."""
    p = prompt.encode("utf-8") if isinstance(prompt, str) else prompt
    t = {"text_input": np.array([[p]], dtype=np.object_), "max_tokens": np.array([[max_tokens]], dtype=np.int32)}
    for name, value in extra.items():
        if isinstance(value, bool):
            t[name] = np.array([[value]], dtype=bool)
        elif isinstance(value, int):
            t[name] = np.array([[value]], dtype=np.uint64 if name == "seed" else np.int32)
        elif isinstance(value, float):
            t[name] = np.array([[value]], dtype=np.float32)
        else:
            t[name] = np.array([[w.encode() for w in value]], dtype=np.object_)
    return t


def text_of(call: pb.Call) -> bytes:
    assert not call.errors, [e.message() for e in call.errors]
    return b"".join(bytes(o["text_output"][0]) for o in call.outputs)


def hf_greedy(hf: torch.nn.Module, ids: list[int], eos: int, n: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0)
    tokens = out[0, len(ids):].tolist()
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


# -- schema and wiring -----------------------------------------------------------------------------------


def test_every_config_parses_against_tritons_schema(repo: Path, built: tuple[Path, Path]) -> None:
    configs = configs_of(repo)
    assert set(configs) == {"preprocessing", "llama", "postprocessing", "ensemble", "bls"}
    for name, cfg in configs.items():
        # A batch dimension as TensorRT-LLM's models declare (perf_analyzer's -b N needs one).
        assert cfg.name == name and cfg.max_batch_size == MAX_BATCH_SIZE > 0
        assert (cfg.platform, cfg.backend) == (("ensemble", "") if name == "ensemble" else ("", "python"))
        if name in PYTHON_MODELS:
            assert (repo / name / "1" / "model.py").is_file() and (repo / name / "1" / "llamaforge" / "runtime" / "core" / "engine_core.py").is_file()
            assert cfg.parameters["engine_dir"].string_value == str(built[1].resolve())
    llama = configs["llama"]
    assert llama.model_transaction_policy.decoupled and configs["bls"].model_transaction_policy.decoupled
    assert not configs["preprocessing"].model_transaction_policy.decoupled
    params = {k: v.string_value for k, v in llama.parameters.items()}
    assert params["kv_budget_tokens"] == "2048" and params["max_num_seqs"] == "4"
    assert params["scheduling_policy"] == "inflight" and params["max_num_batched_tokens"] == "128"
    assert params["enable_kv_cache_reuse"] == "true"
    assert [(g.kind, list(g.gpus)) for g in llama.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, [])]
    # A GPU repository: instance_group places llama on the GPUs, and the parameter agrees.
    gpu = model_configs(RepoOptions(engine=Path("unused"), device="gpu", gpus=(0, 1), instances=2), "/engines/x")
    g = gpu["llama"].instance_group[0]
    assert (g.kind, list(g.gpus), g.count) == (mc.ModelInstanceGroup.KIND_GPU, [0, 1], 2)
    assert gpu["llama"].parameters["gpu_device_ids"].string_value == "0,1"
    assert gpu["preprocessing"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    text = text_format.MessageToString(gpu["llama"])
    assert text_format.Parse(text, mc.ModelConfig()) == gpu["llama"]


def test_ensemble_interface_is_tensorrt_llms(repo: Path) -> None:
    """The external tensors TensorRT-LLM's ensemble clients send and read, by name and dtype."""
    trtllm_inputs = {"text_input": "TYPE_STRING", "max_tokens": "TYPE_INT32", "stream": "TYPE_BOOL",
                     "temperature": "TYPE_FP32", "top_p": "TYPE_FP32", "top_k": "TYPE_INT32",
                     "repetition_penalty": "TYPE_FP32", "min_tokens": "TYPE_INT32", "end_id": "TYPE_INT32",
                     "pad_id": "TYPE_INT32", "seed": "TYPE_UINT64", "stop_words": "TYPE_STRING",
                     "bad_words": "TYPE_STRING", "exclude_input_in_output": "TYPE_BOOL", "return_log_probs": "TYPE_BOOL",
                     # TensorRT-LLM's names of min_tokens and seed (genai-perf sends min_length)
                     "min_length": "TYPE_INT32", "random_seed": "TYPE_UINT64"}
    trtllm_outputs = {"text_output": "TYPE_STRING", "output_log_probs": "TYPE_FP32", "cum_log_probs": "TYPE_FP32",
                      "context_logits": "TYPE_FP32", "generation_logits": "TYPE_FP32", "batch_index": "TYPE_INT32",
                      "sequence_index": "TYPE_INT32", "kv_cache_alloc_new_blocks": "TYPE_INT32",
                      "kv_cache_reused_blocks": "TYPE_INT32", "kv_cache_alloc_total_blocks": "TYPE_INT32",
                      "arrival_time_ns": "TYPE_INT64", "first_scheduled_time_ns": "TYPE_INT64",
                      "first_token_time_ns": "TYPE_INT64", "last_token_time_ns": "TYPE_INT64",
                      "acceptance_rate": "TYPE_FP32", "total_accepted_draft_tokens": "TYPE_INT32",
                      "total_draft_tokens": "TYPE_INT32", "num_input_tokens": "TYPE_INT32",
                      "num_output_tokens": "TYPE_INT32"}
    for name in ("ensemble", "bls"):
        cfg = configs_of(repo)[name]
        inputs = {i.name: mc.DataType.Name(i.data_type) for i in cfg.input}
        outputs = {o.name: mc.DataType.Name(o.data_type) for o in cfg.output}
        assert trtllm_inputs.items() <= inputs.items() and trtllm_outputs.items() <= outputs.items()
        assert [i.name for i in cfg.input] == [t.name for t in TEXT_MODEL.inputs]  # model_interface.py is the source
        assert [i.name for i in cfg.input if not i.optional] == ["text_input", "max_tokens"]


def _compatible(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == -1 or y == -1 or x == y for x, y in zip(a, b))


def test_ensemble_wiring_maps_every_tensor_with_matching_dtype(repo: Path) -> None:
    configs = configs_of(repo)
    ens = configs["ensemble"]
    available = {i.name: (i.data_type, list(i.dims)) for i in ens.input}
    consumed: set[str] = set()
    for step in ens.ensemble_scheduling.step:
        model = configs[step.model_name]
        model_inputs = {i.name: i for i in model.input}
        model_outputs = {o.name: o for o in model.output}
        for model_input, tensor in step.input_map.items():
            assert model_input in model_inputs, (step.model_name, model_input)
            assert tensor in available, f"{step.model_name}.{model_input} reads {tensor}, which nothing produced yet"
            dtype, dims = available[tensor]
            spec = model_inputs[model_input]
            assert dtype == spec.data_type, (step.model_name, model_input)
            assert _compatible(dims, list(spec.dims)), (step.model_name, model_input, dims, list(spec.dims))
            consumed.add(tensor)
        missing = [i.name for i in model.input if not i.optional and i.name not in step.input_map]
        assert not missing, (step.model_name, missing)
        for model_output, tensor in step.output_map.items():
            assert model_output in model_outputs, (step.model_name, model_output)
            assert tensor not in available, f"{tensor} is produced twice"
            available[tensor] = (model_outputs[model_output].data_type, list(model_outputs[model_output].dims))
    for o in ens.output:
        assert o.name in available and available[o.name][0] == o.data_type, o.name
        assert _compatible(available[o.name][1], list(o.dims)), o.name
    assert {i.name for i in ens.input} <= consumed, "every ensemble input is used by a step"


def test_generated_models_import_their_own_runtime_copy(repo: Path, tmp_path: Path) -> None:
    """As in Triton: the version directory appended to sys.path, `triton_python_backend_utils` given,
    no llama-forge installed. model.py must load the runtime copy and need neither torch nor the
    build stages."""
    shutil.copy(Path(pb.__file__), tmp_path / "triton_python_backend_utils.py")
    version = repo / "preprocessing" / "1"
    code = f"""
import json, sys
sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r})]
sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]
sys.path.insert(0, {str(tmp_path)!r}); sys.path.append({str(version)!r})
import numpy as np, triton_python_backend_utils as pb, model, llamaforge
assert llamaforge.__file__.startswith({str(version)!r}), llamaforge.__file__
cfg = open({str(repo / 'preprocessing' / 'config.pbtxt')!r}).read()
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc
m = model.TritonPythonModel()
m.initialize({{"model_config": json.dumps(json_format.MessageToDict(text_format.Parse(cfg, mc.ModelConfig()),
              preserving_proto_field_name=True)), "model_repository": {str(repo / 'preprocessing')!r}}})
req = pb.InferenceRequest(inputs=[pb.Tensor("text_input", np.array([[b"def main("]], dtype=object))])
out = m.execute([req])[0]
assert not out.has_error(), out.error()
print(out.output_tensors()[0].as_numpy().tolist())
import llamaforge.triton_repo.models.llama, llamaforge.triton_repo.models.bls, llamaforge.triton_repo.models.postprocessing
bad = [n for n in sys.modules if n.split('.')[0] in ('torch', 'transformers', 'onnx')
       or n.split('.')[:2] in (['llamaforge', 'export'], ['llamaforge', 'graphs'], ['llamaforge', 'build'])]
assert not bad, bad
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])[0][0] == 1  # BOS first


# -- stateless streaming detokenization -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("toks")
    (root / "bpe").mkdir()
    train_tiny_tokenizer().save(str(root / "bpe" / "tokenizer.json"))
    (root / "sp").mkdir()
    (root / "sp" / "tokenizer.model").write_bytes(train_tiny_sentencepiece())
    return {"bpe": load_tokenizer(root / "bpe", {"kind": "hf", "file": "tokenizer.json", "bos_id": 1, "eos_ids": [2]}),
            "sp": load_tokenizer(root / "sp", {"kind": "sentencepiece", "file": "tokenizer.model", "bos_id": 1,
                                                 "eos_ids": [2]})}


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_window_decoding_gives_the_stateful_streams_pieces(tokenizers: dict[str, Any], kind: str) -> None:
    """What postprocessing does per response (a fresh detokenizer over a resume window) gives, piece
    by piece, what one detokenizer over the whole stream gives: random ids (split characters, invalid
    bytes, specials), random chunking, SentencePiece leading spaces, stop words."""
    tok = tokenizers[kind]
    rng = random.Random(3)
    texts = ["naïve café — 日本語のテキスト 🙂 Ünïcödé", "  leading spaces and END marks", "def f(x):\n    return x"]
    cases = [(tok.encode(t, add_bos=False), ()) for t in texts]
    cases += [([rng.randrange(tok.vocab_size) for _ in range(60)], ()) for _ in range(20)]
    cases += [(tok.encode(texts[1], add_bos=False), ("END", "s a")), (tok.encode(texts[0], add_bos=False), ("テキ",))]
    for ids, stops in cases:
        for _ in range(5):
            chunks, i = [], 0
            while i < len(ids):
                n = rng.randint(0, 3)
                chunks.append(ids[i:i + n])
                i += n
            ref = IncrementalDetokenizer(tok, stops)
            generated: list[int] = []
            for j, chunk in enumerate(chunks):
                final = j == len(chunks) - 1
                want = ref.add(chunk)
                start, continuing = resume_point(tok, generated, len(generated), stops)
                assert len(generated) - start <= 4 * max((len(w) for w in stops), default=0) + 8
                got = decode_window(tok, generated[start:], chunk, continuing, stops, final=final or ref.stopped)
                if final or ref.stopped:
                    want += ref.finish()
                assert got == want, (kind, ids, chunks, j)
                generated.extend(chunk)
                if ref.stopped:
                    break


# -- the models, through the stand-in -------------------------------------------------------------------------


def test_streams_equal_unary_equal_transformers(server: Any, built: tuple[Path, Path]) -> None:
    ckpt, _ = built
    hf = load_hf_oracle(ckpt)
    core = server.models["llama"].core
    for prompt in PROMPTS:
        ids = core.tokenizer.encode(prompt, add_bos=True, allow_special=True)
        want = core.tokenizer.decode(hf_greedy(hf, ids, core.eos_ids[0])).encode()
        for model in ("ensemble", "bls"):
            unary = server.infer(model, text_request(prompt, NEW_TOKENS, exclude_input_in_output=True)).wait()
            assert len(unary.outputs) == 1 and text_of(unary) == want, model
            full = server.infer(model, text_request(prompt, NEW_TOKENS)).wait()
            assert text_of(full) == prompt.encode() + want, model  # exclude_input_in_output false: prompt first
            stream = server.infer(model, text_request(prompt, NEW_TOKENS, stream=True)).wait()
            assert len(stream.outputs) > 3, "a stream answers piece by piece"
            assert text_of(stream) == want, model
            assert int(stream.outputs[-1]["num_output_tokens"][0][0]) == len(hf_greedy(hf, ids, core.eos_ids[0]))
    assert core.kv.all_free()


def test_cancellation_frees_the_kv_cache(server: Any) -> None:
    core = server.models["llama"].core
    for model in ("ensemble", "bls"):
        call = server.infer(model, text_request(PROMPTS[0], 400, stream=True, min_tokens=400))
        call.wait_for(3)
        assert core.stats()["running"] == 1
        call.cancel()
        call.wait(30)
        assert call.errors and call.errors[-1].code() == pb.TritonError.CANCELLED, model
        assert "cancelled" in call.errors[-1].message()
        assert sum(len(o["text_output"][0]) for o in call.outputs) > 0
        assert core.kv.all_free() and core.stats()["running"] == 0, model
        assert pb.metric(PREFIX + "kv_cache_free_fraction").value() == 1.0
    assert text_of(server.infer("ensemble", text_request("ok", 4)).wait())  # still serving


def test_concurrent_requests_start_no_thread_each_and_a_cancelled_one_is_freed(server: Any) -> None:
    """The llama model forwards outputs from the core's thread through each request's sink and
    polls cancellation for all requests from one thread: N requests in flight, no new thread."""
    llama = server.models["llama"]
    core = llama.core
    n = 6  # more than max_num_seqs (4): some run, some wait
    before = threading.active_count()
    calls = [server.infer("ensemble", text_request(PROMPTS[i % 2], 120, stream=True, min_tokens=120),
                          request_id=f"r{i}") for i in range(n)]
    calls[0].wait_for(2)
    assert threading.active_count() <= before, [t.name for t in threading.enumerate()]
    assert sorted(e.parsed.client_id for e in llama._in_flight.values()) == [f"r{i}" for i in range(n)]
    calls[1].cancel()
    calls[1].wait(30)
    assert calls[1].errors and calls[1].errors[-1].code() == pb.TritonError.CANCELLED
    assert "r1" not in {e.parsed.client_id for e in llama._in_flight.values()}
    for i, call in enumerate(calls):
        if i != 1:
            assert len(text_of(call.wait(120))) > 0
    assert not llama._in_flight and core.kv.all_free() and core.stats()["running"] == 0


@pytest.mark.parametrize("model, tensors, field", [
    ("ensemble", text_request("hi", 0), "max_tokens"),
    ("ensemble", text_request(b"\xff\xfe", 4), "text_input"),
    ("ensemble", text_request("hi", 600), "max_tokens"),  # past the 512-token context
    ("ensemble", text_request("hi", 4, top_p=1.5), "top_p"),
    ("ensemble", text_request("hi", 4, temperature=-1.0), "temperature"),
    ("ensemble", text_request("hi", 4, min_tokens=9), "min_tokens"),
    ("bls", text_request("hi", 0), "max_tokens"),
    ("bls", text_request(b"\xc3", 4), "text_input"),
    ("llama", {"input_ids": np.array([[1, 5000]], np.int32), "request_output_len": np.array([[4]], np.int32)},
     "input_ids"),
    ("llama", {"input_ids": np.array([[1, 5]], np.int32), "request_output_len": np.array([[4]], np.int32),
               "beam_width": np.array([[0]], np.int32)}, "beam_width"),
    ("ensemble", text_request("hi", 4, beam_width=2, stream=True), "stream"),  # beams are never streamed
    ("llama", {"input_ids": np.array([[1, 5]], np.int32), "request_output_len": np.array([[4]], np.int32),
               "num_return_sequences": np.array([[0]], np.int32)}, "num_return_sequences"),
])
def test_bad_input_is_invalid_arg_naming_the_field(server: Any, model: str, tensors: dict[str, np.ndarray],
                                                    field: str) -> None:
    call = server.infer(model, tensors).wait(30)
    assert not call.outputs and len(call.errors) == 1
    error = call.errors[0]
    assert error.code() == pb.TritonError.INVALID_ARG and field in error.message(), error.message()
    assert server.models["llama"].core.kv.all_free()
    assert text_of(server.infer(model if model != "llama" else "ensemble", text_request("ok", 4)).wait())


def test_num_return_sequences_each_sequence_its_own_responses(server: Any) -> None:
    """n = 3, seeded sampling, through ensemble, bls (streamed and not) and llama: every sequence's
    responses are tagged by sequence_index, each sequence's text is its own (the first the n = 1
    text with the seed), the request ends once, and the KV cache is all free after."""
    core = server.models["llama"].core
    # TensorRT-LLM's semantics: temperature alone stays greedy; top_p 1.0 samples the distribution.
    sampled = {"temperature": 1.0, "top_p": 1.0, "seed": 7, "exclude_input_in_output": True}
    single = text_of(server.infer("ensemble", text_request(PROMPTS[0], 12, **sampled)).wait())
    texts_of = {}
    for model in ("ensemble", "bls"):
        for stream in (False, True):
            call = server.infer(model, text_request(PROMPTS[0], 12, num_return_sequences=3, stream=stream,
                                                    **sampled)).wait()
            assert not call.errors and call.finals == 1, (model, [e.message() for e in call.errors])
            texts: dict[int, bytes] = {}
            for o in call.outputs:
                i = int(o["sequence_index"][0][0])
                texts[i] = texts.get(i, b"") + bytes(o["text_output"][0])
            assert sorted(texts) == [0, 1, 2] and texts[0] == single, (model, stream)
            assert len(set(texts.values())) > 1, "each sequence samples on its own"
            if not stream:
                assert len(call.outputs) == 3, "one whole answer per sequence"
            texts_of[(model, stream)] = texts
    assert len({tuple(sorted(t.items())) for t in texts_of.values()}) == 1, "the same seed, the same sequences"
    ids = core.tokenizer.encode(PROMPTS[0], add_bos=True, allow_special=True)
    call = server.infer("llama", {"input_ids": np.array([ids], np.int32), "request_output_len": np.array([[12]], np.int32),
                                  "num_return_sequences": np.array([[2]], np.int32),
                                  "random_seed": np.array([[7]], np.uint64), "temperature": np.array([[1.0]], np.float32),
                                  "runtime_top_p": np.array([[1.0]], np.float32),
                                  "exclude_input_in_output": np.array([[True]])}).wait()
    assert not call.errors and {int(o["sequence_index"][0][0]) for o in call.outputs} == {0, 1}
    assert core.kv.all_free()


def test_beam_search_answers_once_with_the_beams_stacked(server: Any, built: tuple[Path, Path]) -> None:
    """beam_width 3, num_return_sequences 2 (TensorRT-LLM's inputs) through ensemble, bls and llama:
    one response with the best two beams, transformers' beams token for token, text_output [2] their
    texts (after the prompt unless excluded), cum_log_probs [1, 2]."""
    ckpt, _ = built
    core = server.models["llama"].core
    ids = core.tokenizer.encode(PROMPTS[1], add_bos=True, allow_special=True)
    hf = load_hf_oracle(ckpt)
    eos = core.eos_ids[0]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                          num_beams=3, num_return_sequences=2, max_new_tokens=10, eos_token_id=eos, pad_token_id=eos)
    want = [row[: row.index(eos)] if eos in row else row for row in out[:, len(ids):].tolist()]
    call = server.infer("llama", {"input_ids": np.array([ids], np.int32), "request_output_len": np.array([[10]], np.int32),
                                  "beam_width": np.array([[3]], np.int32), "num_return_sequences": np.array([[2]], np.int32),
                                  "exclude_input_in_output": np.array([[True]])}).wait()
    assert not call.errors and len(call.outputs) == 1, [e.message() for e in call.errors]
    o = call.outputs[0]
    got = [o["output_ids"][0, b, : o["sequence_length"][0, b]].tolist() for b in range(2)]
    assert got == want and o["cum_log_probs"].shape == (1, 2)
    texts = [core.tokenizer.decode(w).encode() for w in want]
    for model in ("ensemble", "bls"):
        for exclude in (True, False):
            call = server.infer(model, text_request(PROMPTS[1], 10, beam_width=3, num_return_sequences=2,
                                                    exclude_input_in_output=exclude)).wait()
            assert not call.errors and len(call.outputs) == 1, (model, [e.message() for e in call.errors])
            prefix = b"" if exclude else PROMPTS[1].encode()
            assert [bytes(t) for t in call.outputs[0]["text_output"]] == [prefix + t for t in texts], (model, exclude)
    assert core.kv.all_free()


def test_trtllm_names_min_length_and_random_seed_reach_llama(server: Any) -> None:
    """genai-perf --output-tokens-mean-deterministic sends `min_length` (TensorRT-LLM's name of
    min_tokens): ensemble and bls declare it (the stand-in, as Triton, refuses an undeclared input)
    and hand it to llama, which holds back the end id until that many tokens are out."""
    core = server.models["llama"].core
    ids = core.tokenizer.encode(PROMPTS[0], add_bos=True, allow_special=True)
    first = server.infer("llama", {"input_ids": np.array([ids], np.int32), "request_output_len": np.array([[1]], np.int32),
                                   "exclude_input_in_output": np.array([[True]]),
                                   "temperature": np.array([[0.0]], np.float32)}).wait()
    assert not first.errors, [e.message() for e in first.errors]
    (end,) = [t for o in first.outputs for t in o["output_ids"].reshape(-1).tolist()]  # the greedy first token
    for model in ("ensemble", "bls"):
        greedy = text_request(PROMPTS[0], 6, exclude_input_in_output=True, end_id=end, temperature=0.0)
        stopped = server.infer(model, greedy).wait()
        assert not stopped.errors and int(stopped.outputs[-1]["num_output_tokens"][0][0]) == 0, model
        call = server.infer(model, {**greedy, "min_length": np.array([[6]], np.int32),
                                    "random_seed": np.array([[7]], np.uint64)}).wait()
        assert not call.errors, (model, [e.message() for e in call.errors])
        assert int(call.outputs[-1]["num_output_tokens"][0][0]) == 6, model
    assert core.kv.all_free()


def _guided(kind: str, guide: str = "") -> dict[str, np.ndarray]:
    t = {"guided_decoding_guide_type": np.array([[kind.encode()]], dtype=np.object_)}
    if guide:
        t["guided_decoding_guide"] = np.array([[guide.encode()]], dtype=np.object_)
    return t


def test_guided_decoding_and_penalties_reach_llama(server: Any) -> None:
    """TensorRT-LLM's guided_decoding_guide_type / guided_decoding_guide and presence_penalty /
    frequency_penalty: ensemble and bls declare them and hand them to llama, which holds the output
    to the guide; a guide that does not compile is INVALID_ARG naming guided_decoding_guide."""
    pattern = r"[a-z]{3}-[0-9]{2}"
    for model in ("ensemble", "bls"):
        for stream in (False, True):
            tensors = {**text_request(PROMPTS[0], 24, exclude_input_in_output=True, temperature=1.0, top_p=1.0,
                                      seed=3, stream=stream, presence_penalty=0.5, frequency_penalty=0.5),
                       **_guided("regex", pattern)}
            text = text_of(server.infer(model, tensors).wait(60))
            assert re.fullmatch(pattern, text.decode()), (model, stream, text)
        schema = '{"type": "object", "properties": {"k": {"enum": ["a", "b"]}}, "required": ["k"], ' \
                 '"additionalProperties": false}'
        tensors = {**text_request(PROMPTS[1], 24, exclude_input_in_output=True), **_guided("json_schema", schema)}
        assert json.loads(text_of(server.infer(model, tensors).wait(60)))["k"] in ("a", "b")
        call = server.infer(model, {**text_request("hi", 4), **_guided("regex", "[a-")}).wait(30)
        assert len(call.errors) == 1 and call.errors[0].code() == pb.TritonError.INVALID_ARG
        assert "guided_decoding_guide" in call.errors[0].message() and "unclosed" in call.errors[0].message()
    assert server.models["llama"].core.kv.all_free()


def test_unknown_request_parameter_is_refused(server: Any) -> None:
    call = server.infer("llama", {"input_ids": np.array([[1, 5]], np.int32),
                                  "request_output_len": np.array([[4]], np.int32)}, parameters={"bogus": 1}).wait()
    assert call.errors[0].code() == pb.TritonError.INVALID_ARG and "parameters.bogus" in call.errors[0].message()


class _StepRecorder:
    """Tees the core's observer callbacks and notes the step in which each request got each token."""

    def __init__(self, core: Any) -> None:
        self.core, self.inner = core, core.observer
        self.steps: dict[str, list[int]] = defaultdict(list)

    def on_first_token(self, request_id: str, ttft_s: float) -> None:
        self.steps[request_id].append(self.core.steps)
        self.inner.on_first_token(request_id, ttft_s)

    def on_token(self, request_id: str, itl_s: float) -> None:
        self.steps[request_id].append(self.core.steps)
        self.inner.on_token(request_id, itl_s)

    def on_finished(self, request_id: str, reason: str, n: int) -> None:
        self.inner.on_finished(request_id, reason, n)


def test_two_requests_join_the_same_running_batch(server: Any) -> None:
    core = server.models["llama"].core
    a_req = text_request(PROMPTS[0], 200, stream=True, min_tokens=200, exclude_input_in_output=True)
    b_req = text_request(PROMPTS[1], NEW_TOKENS, exclude_input_in_output=True)
    a_alone = text_of(server.infer("ensemble", {**a_req, "stream": np.array([[False]])}).wait())
    b_alone = text_of(server.infer("bls", b_req).wait())
    recorder = _StepRecorder(core)
    core.observer = recorder
    try:
        a = server.infer("ensemble", a_req)
        a.wait_for(3)  # A is in the running batch, decoding
        b = server.infer("bls", b_req)
        b.wait()
        a.wait()
    finally:
        core.observer = recorder.inner
    assert text_of(a) == a_alone and text_of(b) == b_alone  # batching does not change greedy output
    (a_steps, b_steps) = sorted(recorder.steps.values(), key=lambda s: s[0])
    assert set(b_steps) <= set(a_steps), "every step that gave B a token gave A one too: one running batch"
    assert a_steps[0] < b_steps[0] < a_steps[-1], "B joined while A was running"
    assert core.kv.all_free()


def test_metrics_mirror_the_standalone_servers_names(server: Any) -> None:
    before = len(pb.metric(PREFIX + "time_to_first_token_seconds").observations)
    stops = pb.metric(PREFIX + "requests_total", outcome="length").value()
    server.infer("ensemble", text_request(PROMPTS[0], 5, min_tokens=5)).wait()
    names = set(pb.MetricFamily.registry)
    assert names <= set(METRIC_NAMES) and {PREFIX + name for name, _, _ in CORE_GAUGES} <= names
    assert len(pb.metric(PREFIX + "time_to_first_token_seconds").observations) == before + 1
    assert pb.metric(PREFIX + "requests_total", outcome="length").value() == stops + 1
    assert pb.metric(PREFIX + "kv_cache_free_fraction").value() == 1.0
    assert pb.metric(PREFIX + "kv_cache_total_tokens").value() == 2048
    assert pb.metric(PREFIX + "queue_depth").value() == 0


# -- placement, engine kinds, generator -----------------------------------------------------------------


def test_config_parameters_are_read_and_checked(server: Any) -> None:
    cfg = server.models["llama"].core.config  # from llama/config.pbtxt, written by the repo fixture
    assert cfg == CoreConfig(KVCacheConfig(budget_tokens=2048), SchedulerConfig(4, 128, "inflight"), max_queue=16,
                             providers=cfg.providers)
    assert llama_model.core_config({"scheduling_policy": "static"}, []).scheduler.policy == "static"
    assert llama_model.core_config({"enable_kv_cache_reuse": "false"}, []).kv.prefix_caching is False
    assert llama_model.core_config({"enable_kv_cache_reuse": "True"}, []).kv.prefix_caching is True
    assert llama_model.core_config({}, []).kv.prefix_caching is KVCacheConfig.prefix_caching
    for key, value in (("max_num_seqs", "many"), ("kv_budget_tokens", "0"), ("scheduling_policy", "fifo"),
                       ("enable_kv_cache_reuse", "yes"), ("speculative", "medusa"), ("num_speculative_tokens", "0"),
                       ("speculative_disable_by_batch_size", "-1")):
        with pytest.raises(EngineError, match=key):
            llama_model.core_config({key: value}, [])
    with pytest.raises(EngineError, match="draft_engine_dir"):
        llama_model.core_config({"speculative": "draft"}, [])


@pytest.mark.parametrize("spec", [SpeculativeConfig(), SpeculativeConfig("ngram", 3, 1, 5, None, 0),
                                  SpeculativeConfig("draft", 2, draft_engine="/engines/draft", disable_by_batch_size=4)],
                         ids=["off", "ngram", "draft"])
def test_speculative_settings_round_trip_through_config_pbtxt(spec: SpeculativeConfig) -> None:
    core = CoreConfig(speculative=spec)
    llama = model_configs(RepoOptions(engine=Path("unused"), device="cpu", core=core), "/engines/x")["llama"]
    llama = text_format.Parse(text_format.MessageToString(llama), mc.ModelConfig())
    params = {k: v.string_value for k, v in llama.parameters.items()}
    assert llama_model.core_config(params, []).speculative == spec


def test_the_generator_refuses_speculative_settings_a_server_would_refuse() -> None:
    for spec, message in ((SpeculativeConfig("draft"), "draft engine"), (SpeculativeConfig("lookahead"), "lookahead"),
                          (SpeculativeConfig("ngram", prompt_lookup_min=3, prompt_lookup_max=2), "prompt_lookup_min"),
                          (SpeculativeConfig("ngram", disable_by_batch_size=-1), "speculative_disable_by_batch_size"),
                          (SpeculativeConfig("ngram", num_speculative_tokens=0), "num_speculative_tokens")):
        with pytest.raises(RepoError, match=message):
            model_configs(RepoOptions(engine=Path("unused"), core=CoreConfig(speculative=spec)), "/engines/x")


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_a_repository_generated_with_speculation_speculates_and_keeps_greedy_output(
        built: tuple[Path, Path], server: Any, tmp_path: Path, method: str) -> None:
    """Prompt lookup, and a draft engine given relative to the repository's root (the target's own
    engine: its drafts are the target's greedy tokens)."""
    out = tmp_path / "spec"
    flags = ["--prompt-lookup-min", "1"] if method == "ngram" else ["--draft-engine", os.path.relpath(built[1], out)]
    assert cli.main(["repo", str(built[1]), "--out", str(out), "--device", "cpu", "--max-num-seqs", "4",
                     "--speculative", method, "--num-speculative-tokens", "3", *flags]) == 0
    spec_server = pb.StandInServer(out)
    try:
        core = spec_server.models["llama"].core
        assert core.speculator is not None and core.speculator.k == 3
        if method == "draft":
            assert core.speculator.proposer.engine.dir.resolve() == built[1].resolve()
        ids = core.tokenizer.encode(PROMPTS[1] * 3, add_bos=True, allow_special=True)  # repeats: something to look up
        request = {"input_ids": np.array([ids], np.int32), "request_output_len": np.array([[NEW_TOKENS]], np.int32),
                   "exclude_input_in_output": np.array([[True]]), "return_perf_metrics": np.array([[True]])}
        calls = {name: s.infer("llama", request).wait() for name, s in (("plain", server), ("spec", spec_server))}
        for name, call in calls.items():
            assert not call.errors, (name, [e.message() for e in call.errors])
        tokens = {name: [t for o in call.outputs for t in o["output_ids"].reshape(-1).tolist()]
                  for name, call in calls.items()}
        assert tokens["spec"] == tokens["plain"] and len(tokens["plain"]) == NEW_TOKENS
        last = calls["spec"].outputs[-1]
        assert int(last["total_draft_tokens"][0][0]) > 0 and int(last["total_accepted_draft_tokens"][0][0]) > 0
        assert int(calls["plain"].outputs[-1]["total_draft_tokens"][0][0]) == 0
    finally:
        spec_server.stop()


def test_gpu_placement_needs_cuda_onnxruntime_and_agreeing_device_ids() -> None:
    args = {"model_instance_kind": "GPU", "model_instance_device_id": "1"}
    with pytest.raises(EngineError, match="gpu_device_ids"):
        llama_model.placement({"gpu_device_ids": "0"}, args)
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert llama_model.placement({}, args)[0] == ("CUDAExecutionProvider", {"device_id": 1})
    else:
        with pytest.raises(EngineError, match="onnxruntime-gpu"):
            llama_model.placement({"gpu_device_ids": "0,1"}, args)
    assert llama_model.placement({}, {"model_instance_kind": "CPU"}) == ["CPUExecutionProvider"]


def test_trt_engine_fails_to_load_with_a_clear_message(built: tuple[Path, Path], tmp_path: Path) -> None:
    engine = tmp_path / "trt-engine"
    shutil.copytree(built[1], engine, ignore=shutil.ignore_patterns("*.data", "*.onnx"))
    manifest = json.loads((engine / "manifest.json").read_text())
    (engine / "manifest.json").write_text(json.dumps({**manifest, "backend": "trt"}))
    cfg = {"parameters": {"engine_dir": {"string_value": str(engine)}}}
    with pytest.raises(EngineError, match="'trt'.*no TensorRT runner"):
        llama_model.TritonPythonModel().initialize({"model_config": json.dumps(cfg), "model_instance_kind": "CPU",
                                                    "model_repository": str(tmp_path)})


def test_repo_cli_replaces_atomically_and_refuses_bad_engines(built: tuple[Path, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r" / "tiny"
    for _ in range(2):  # the second run replaces the first
        assert cli.main(["repo", str(built[1]), "--out", str(out), "--device", "cpu", "--engine-path", "/engines/t"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"], "no temporary directory is left"
    cfg = text_format.Parse((out / "llama" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.parameters["engine_dir"].string_value == "/engines/t"
    assert "onnxruntime==" in (out / "llama" / "1" / "requirements.txt").read_text()
    capsys.readouterr()
    assert cli.main(["repo", str(tmp_path / "nope"), "--out", str(tmp_path / "bad")]) == 2
    assert "ENGINE=" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert cli.main(["repo", str(built[1]), "--out", str(tmp_path / "bad"), "--gpus", ""]) == 2
    assert "GPUS" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_make_repo_passes_its_variables() -> None:
    r = subprocess.run(["make", "-n", "repo", "ENGINE=engines/x", "NAME=n", "OUT=/tmp/o", "DEVICE=cpu",
                        "REPO_ARGS=--speculative ngram"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "llamaforge repo engines/x --name n --out /tmp/o" in r.stdout and "--device cpu" in r.stdout
    assert "--speculative ngram" in r.stdout
