"""Llama 3.2 Vision through the serving engine core and both front ends, against transformers.

The tiny random `MllamaForConditionalGeneration` (tests/helpers/tiny_mllama.py, engine built once per
session) serves requests with 1-2 images of 1-4 tiles, text before and after the `<|image|>` tokens,
and a text-only request, all in one batch: prefill logits within 1e-4 of transformers' forward
(through the core, as context logits) and 32 greedy tokens equal to transformers' `generate`, through
the engine core, the OpenAI chat endpoint (official `openai` client, `image_url` data: URLs) and gRPC
(stock tritonclient, TensorRT-LLM's `image_url_input` / `image_bytes_input`). Also: chunked prefill
across the image, preemption, seeded sampling in a mixed batch, cancellation freeing the
cross-attention cache, the chat template against transformers', and the refusals naming the field.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image
from server_utils import grpc_client, running_server, tensor
from tiny_mllama import load_mllama_oracle, tiny_mllama_configs
from tritonclient.utils import InferenceServerException

from llamaforge.runtime.core.config import CoreConfig, KVCacheConfig, SchedulerConfig, SpeculativeConfig
from llamaforge.runtime.core.engine import EngineError
from llamaforge.runtime.core.engine_core import EngineCore, run_to_completion
from llamaforge.runtime.core.mllama_image import ImageInput, MllamaImageConfig, preprocess_images
from llamaforge.runtime.core.requests import GenerationRequest, RequestError
from llamaforge.runtime.core.sampling import SamplingParams
from llamaforge.runtime.core.validation import RequestLimits
from llamaforge.runtime.serving.openai_protocol import parse_chat
from llamaforge.runtime.serving.openai_server import HttpServer, OpenAIFrontend

TOLERANCE = 1e-4
IMAGE = tiny_mllama_configs()[0].image_token_index
TILE = tiny_mllama_configs()[0].image_size
# (prompt ids, image sizes (width, height)): 2, 2 + 4 tiles, and a text-only prompt.
PROMPTS = {
    "one-image": ([1, 45, 67, IMAGE, 88, 99, 100, 120, 7], [(60, 30)]),
    "two-images": ([1, IMAGE, 8, 9, IMAGE, 12, 300, 12], [(50, 20), (60, 60)]),
    "text-only": ([1, 45, 67, 88, 99, 100, 120, 7], []),
}
NEW = 32


def png(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def images_of(sizes: list[tuple[int, int]], field: str = "images") -> tuple[ImageInput, ...]:
    return tuple(ImageInput(f"{field}[{i}]", png(s, i)) for i, s in enumerate(sizes))


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def request(name: str, **kw: Any) -> GenerationRequest:
    ids, sizes = PROMPTS[name]
    kw.setdefault("sampling", SamplingParams(temperature=0.0))
    return GenerationRequest(kw.pop("request_id", name), list(ids), NEW, images=images_of(sizes), end_ids=(), **kw)


@pytest.fixture(scope="module")
def oracle(tiny_mllama_checkpoint: Path) -> Any:
    return load_mllama_oracle(tiny_mllama_checkpoint)


def oracle_inputs(ids: list[int], sizes: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    if not sizes:
        return {"input_ids": torch.tensor([ids])}
    batch = preprocess_images([list(images_of(sizes))], MllamaImageConfig(tile_size=TILE, max_images=2))
    mask = convert_sparse_cross_attention_mask_to_dense([get_cross_attention_token_mask(ids, IMAGE)], batch.num_tiles,
                                                        batch.pixel_values.shape[2], len(ids))
    return {"input_ids": torch.tensor([ids]), "pixel_values": torch.from_numpy(batch.pixel_values),
            "aspect_ratio_ids": torch.from_numpy(batch.aspect_ratio_ids),
            "aspect_ratio_mask": torch.from_numpy(batch.aspect_ratio_mask), "cross_attention_mask": torch.from_numpy(mask)}


@pytest.fixture(scope="module")
def expected(oracle: Any) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Per prompt: transformers' prefill logits and its 32 greedy tokens."""
    out = {}
    for name, (ids, sizes) in PROMPTS.items():
        inputs = oracle_inputs(ids, sizes)
        with torch.no_grad():
            logits = oracle(**inputs).logits[0].numpy()
            gen = oracle.generate(**inputs, attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                                  max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
        out[name] = (logits, gen[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module")
def core(tiny_mllama_engine: Path) -> Iterator[EngineCore]:
    core = EngineCore(tiny_mllama_engine, CoreConfig(threads=1))
    yield core
    core.stop()


def test_engine_core_batch_matches_transformers(core: EngineCore, expected: dict[str, Any]) -> None:
    """Two image requests (2 and 2 + 4 tiles) and a text-only one in one batch: the decode call pads
    the cross caches to the longest; the image prefills run alone."""
    outs = run_to_completion(core, [request(name, return_context_logits=True) for name in PROMPTS])
    for out in outs:
        logits, tokens = expected[out.request_id]
        assert out.context_logits is not None
        diff = float(np.abs(out.context_logits - logits).max())
        print(f"{out.request_id}: prefill max abs diff {diff:.3g}")
        assert diff <= TOLERANCE
        assert out.token_ids == tokens, out.request_id
    assert len(core.runner.cross.cache) == 0 and core.kv.all_free()  # type: ignore[union-attr]


def test_chunked_prefill_and_preemption(tiny_mllama_engine: Path, expected: dict[str, Any]) -> None:
    """3-token prefill chunks (the image's chunk and those after it read the cached cross K/V) and a
    KV cache of 8 blocks of 8 for 6 requests of 40 tokens: sequences are preempted and recomputed."""
    config = CoreConfig(threads=1, scheduler=SchedulerConfig(max_num_batched_tokens=3),
                        kv=KVCacheConfig(budget_tokens=64, block_size=8))
    core = EngineCore(tiny_mllama_engine, config)
    preempted: list[str] = []
    preempt = core.scheduler._preempt_last

    def counting(*args: Any, **kw: Any) -> Any:
        victim = preempt(*args, **kw)
        preempted.append(victim.seq_id)
        return victim

    core.scheduler._preempt_last = counting  # type: ignore[method-assign]
    try:
        outs = run_to_completion(core, [request(name, request_id=f"{name}#{j}") for j in range(2) for name in PROMPTS])
    finally:
        core.stop()
    assert preempted, "the KV budget was meant to force preemption"
    assert any(PROMPTS[p.split("#")[0]][1] for p in preempted), "an image request was meant to be preempted"
    for out in outs:
        assert out.token_ids == expected[out.request_id.split("#")[0]][1], out.request_id


def test_n_sequences_share_the_requests_cross_cache(core: EngineCore, expected: dict[str, Any]) -> None:
    """n = 2: the prompt (and its cross K/V) computed once, both sequences decode from them."""
    outs = run_to_completion(core, [request("two-images", n=2)])
    assert [o.token_ids for o in outs] == [expected["two-images"][1]] * 2
    assert len(core.runner.cross.cache) == 0  # type: ignore[union-attr]


def test_speculative_decoding_is_refused_on_a_vision_engine(tiny_mllama_engine: Path) -> None:
    with pytest.raises(EngineError, match="speculative decoding"):
        EngineCore(tiny_mllama_engine, CoreConfig(threads=1, speculative=SpeculativeConfig("ngram")))


def test_seeded_sampling_is_the_same_alone_and_in_a_mixed_batch(core: EngineCore) -> None:
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=11)
    alone = run_to_completion(core, [request("two-images", sampling=sampling)])[0].token_ids
    mixed = run_to_completion(core, [request("one-image", request_id="a"), request("two-images", sampling=sampling),
                                     request("text-only", request_id="b")])
    assert mixed[1].token_ids == alone
    other = SamplingParams(temperature=1.0, top_p=0.95, seed=12)
    assert run_to_completion(core, [request("two-images", sampling=other)])[0].token_ids != alone


def test_cancellation_frees_the_cross_attention_cache(core: EngineCore) -> None:
    cross = core.runner.cross
    assert cross is not None
    handle = core.submit(GenerationRequest("long", PROMPTS["two-images"][0], 400, images=images_of([(50, 20), (60, 60)]),
                                           end_ids=(), stream=True))
    core.start()
    first = handle.get(timeout=60)
    assert not first.finished and len(cross.cache) == 1 and cross.cache.num_bytes > 0
    handle.cancel()
    outs = [first, *handle]
    assert outs[-1].finish_reason == "cancelled"
    core.drain()
    assert len(cross.cache) == 0 and cross.cache.num_bytes == 0 and core.kv.all_free()


def test_bad_images_are_refused_naming_the_field(core: EngineCore) -> None:
    ids = PROMPTS["one-image"][0]
    out = io.BytesIO()
    Image.new("1", (9000, 6000)).save(out, format="PNG")  # 54 million pixels, over the default 50 million
    big = out.getvalue()
    cases = [
        (images_of([(60, 30), (20, 20)]), "images[0]", "2 image"),  # one <|image|> token, two images
        ((ImageInput("images[0]", b"not an image"),), "images[0]", "not an image"),
        ((ImageInput("images[0]", png((60, 30), 0)[:60]),), "images[0]", "truncated|unreadable"),
        ((ImageInput("images[0]", big),), "images[0]", "more than the limit"),
    ]
    for images, field, match in cases:
        with pytest.raises(RequestError, match=match) as e:
            core.submit(GenerationRequest("bad", ids, 4, images=images))
        assert e.value.field == field
    three = [1, IMAGE, 5, IMAGE, 6, IMAGE, 7]
    with pytest.raises(RequestError, match="too many images") as e:
        core.submit(GenerationRequest("bad", three, 4, images=images_of([(30, 30)] * 3)))
    assert e.value.field == "images[2]"
    with pytest.raises(RequestError, match="carries no image"):
        core.submit(GenerationRequest("bad", ids, 4))


def test_a_text_engine_refuses_images(tiny_engine: Path) -> None:
    core = EngineCore(tiny_engine, CoreConfig(threads=1))
    with pytest.raises(RequestError, match="text-only model") as e:
        core.submit(GenerationRequest("x", [1, 2, 3], 4, images=images_of([(30, 30)], "image_url_input")))
    assert e.value.field == "image_url_input[0]"


# -- the chat template ------------------------------------------------------------------------------------


def test_chat_template_renders_as_transformers(core: EngineCore, tiny_mllama_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_mllama_checkpoint))
    assert core.tokenizer is not None
    conversations = [
        [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"},
                                      {"type": "text", "text": " what is it?"}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]},
         {"role": "assistant", "content": "Two pictures."}, {"role": "user", "content": "Which?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    ]
    for messages in conversations:
        want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, date_string="3 Dec 2026",
                                      return_dict=False)
        got = core.tokenizer.encode_chat(messages, add_generation_prompt=True, date_string="3 Dec 2026")
        assert got == list(want)
    assert core.tokenizer.encode_chat(conversations[0]).count(IMAGE) == 1
    with pytest.raises(Exception, match="incompatible with system messages"):
        core.tokenizer.encode_chat([{"role": "system", "content": "x"}, *conversations[0]])


# -- the front ends ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(core: EngineCore) -> Iterator[tuple[openai.OpenAI, grpcclient.InferenceServerClient]]:
    with running_server(core) as grpc_server:
        http = HttpServer(OpenAIFrontend(core), "127.0.0.1", 0).start()
        try:
            yield (openai.OpenAI(base_url=f"http://127.0.0.1:{http.port}/v1", api_key="unused", max_retries=0, timeout=60),
                   grpc_client(grpc_server))
        finally:
            http.stop()


def _chat_ids(core: EngineCore, parts: list[dict[str, Any]]) -> list[int]:
    assert core.tokenizer is not None
    return core.tokenizer.encode_chat([{"role": "user", "content": parts}])


def test_openai_chat_with_images_matches_transformers(servers: tuple[openai.OpenAI, Any], core: EngineCore,
                                                      oracle: Any) -> None:
    client = servers[0]
    sizes = [(50, 20), (60, 60)]
    text = [{"type": "text", "text": "Compare "}, {"type": "text", "text": " with "}, {"type": "text", "text": " now."}]
    parts: list[dict[str, Any]] = [text[0], {"type": "image_url", "image_url": {"url": data_url(png(sizes[0], 0))}},
                                   text[1], {"type": "image_url", "image_url": {"url": data_url(png(sizes[1], 1))}},
                                   text[2]]
    ids = _chat_ids(core, [text[0], {"type": "image"}, text[1], {"type": "image"}, text[2]])
    assert ids.count(IMAGE) == 2 and ids.index(IMAGE) > 1 and ids[-1] != IMAGE
    inputs = oracle_inputs(ids, sizes)
    with torch.no_grad():
        want = oracle.generate(**inputs, attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                               max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    response = client.chat.completions.create(model=core.model_name, messages=[{"role": "user", "content": parts}],  # type: ignore[misc]
                                              max_tokens=NEW, temperature=0, extra_body={"ignore_eos": None} if False else None)
    assert response.usage is not None and response.usage.prompt_tokens == len(ids)
    assert core.tokenizer is not None
    stop = set(core.eos_ids)
    cut = next((i for i, t in enumerate(want) if t in stop), len(want))
    assert cut >= 8, "the oracle stops at once: the text would compare nothing"
    assert response.usage.completion_tokens == cut
    assert response.choices[0].message.content == core.tokenizer.decode(want[:cut])


def test_openai_text_only_chat_on_the_vision_model_matches_transformers(servers: tuple[openai.OpenAI, Any],
                                                                       core: EngineCore, oracle: Any) -> None:
    messages = [{"role": "user", "content": "Say something about the sea."}]
    assert core.tokenizer is not None
    ids = core.tokenizer.encode_chat(messages)
    assert IMAGE not in ids
    with torch.no_grad():
        tokens = oracle.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(tokens) if t in set(core.eos_ids)), len(tokens))
    assert cut >= 8, "the oracle stops at once: the text would compare nothing"
    response = servers[0].chat.completions.create(model=core.model_name, messages=messages, max_tokens=NEW,  # type: ignore[arg-type]
                                                  temperature=0)
    assert response.usage is not None and response.usage.prompt_tokens == len(ids)
    assert response.usage.completion_tokens == cut
    assert response.choices[0].message.content == core.tokenizer.decode(tokens[:cut])


@pytest.mark.parametrize("url, match", [
    ("https://example.com/cat.png", "not fetched"), ("data:image/png;base64,@@@", "not valid base64"),
    (data_url(b"GIF89a" + b"\0" * 10), "unreadable|truncated|not an image")])
def test_openai_bad_image_urls_are_400_naming_the_field(servers: tuple[openai.OpenAI, Any], core: EngineCore,
                                                        url: str, match: str) -> None:
    parts = [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(openai.BadRequestError, match=match) as e:
        servers[0].chat.completions.create(model=core.model_name, messages=[{"role": "user", "content": parts}],  # type: ignore[misc,list-item]
                                           max_tokens=4)
    assert e.value.body["param"] == "messages[0].content[1].image_url"  # type: ignore[index]


def test_openai_images_on_a_text_model_are_refused_naming_the_part(core: EngineCore) -> None:
    """A text-only engine's limits have no image token: its chat parser refuses image parts (400)."""
    parts = [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": data_url(png((9, 9), 0))}}]
    body = {"model": "m", "messages": [{"role": "user", "content": parts}], "max_tokens": 4}
    with pytest.raises(RequestError, match="text-only") as e:
        parse_chat(body, core.tokenizer, RequestLimits(512, 640))
    assert e.value.field == "messages[0].content[1]"
    assert parse_chat(body, core.tokenizer, RequestLimits(512, 640, image_token_id=IMAGE)).jobs[0].generation.images[0].field \
        == "messages[0].content[1].image_url"


def test_grpc_image_inputs_match_transformers(servers: tuple[Any, grpcclient.InferenceServerClient],
                                             core: EngineCore, oracle: Any) -> None:
    """TensorRT-LLM's multimodal ensemble inputs: `image_url_input` (data: URLs) and `image_bytes_input`
    (RGB pixels, channels last or first); the prompt text carries the `<|image|>` token."""
    grpc = servers[1]
    assert core.tokenizer is not None
    prompt, size = "Look at this:<|image|> it is a", (60, 30)
    ids = core.tokenizer.encode(prompt, add_bos=True, allow_special=True)  # as the server tokenizes text_input
    assert ids.count(IMAGE) == 1 and 0 < ids.index(IMAGE) < len(ids) - 1
    inputs = oracle_inputs(ids, [size])
    with torch.no_grad():
        tokens = oracle.generate(**inputs, attention_mask=torch.ones(1, len(ids), dtype=torch.long), do_sample=False,
                                 max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    end = next(i for i in range(3, IMAGE) if i not in tokens)  # an end id the greedy path never meets
    want = core.tokenizer.decode(tokens)
    pixels = np.asarray(Image.open(io.BytesIO(png(size, 0))))
    for image in (tensor("image_url_input", [[data_url(png(size, 0))]]),
                  tensor("image_bytes_input", pixels[None, None]),
                  tensor("image_bytes_input", pixels.transpose(2, 0, 1)[None, None])):
        request = [tensor("text_input", [[prompt]]), tensor("max_tokens", [[NEW]], np.int32),
                   tensor("exclude_input_in_output", [[True]]), tensor("end_id", [[end]], np.int32), image]
        out = grpc.infer("ensemble", request).as_numpy("text_output")
        assert out is not None and out.reshape(-1)[0].decode() == want


def test_grpc_bad_images_are_invalid_argument_naming_the_tensor(servers: tuple[Any, grpcclient.InferenceServerClient],
                                                                core: EngineCore) -> None:
    grpc = servers[1]
    prompt = "a<|image|>b"
    for image, match in [(tensor("image_url_input", [["http://example.com/a.png"]]), r"image_url_input\[0\].*not fetched"),
                         (tensor("image_url_input", [[data_url(b"nope")]]), r"image_url_input\[0\].*not an image"),
                         (tensor("image_bytes_input", np.zeros((1, 1, 5, 5, 4), np.uint8)), "image_bytes_input.*channels")]:
        with pytest.raises(InferenceServerException, match=match) as e:
            grpc.infer("ensemble", [tensor("text_input", [[prompt]]), tensor("max_tokens", [[4]], np.int32), image])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
