"""Images in the engine core: a Llama 3.2 Vision request's images, the vision graph run once for
them, and the per-request cross-attention cache its text model's cross-attention layers read.

How a request with images runs (docs/vision.md, "Serving"):

  * `RequestImages` (built at `submit`, on the submitting thread): the request's images preprocessed
    by `mllama_image` (one prompt of the batch layout), and its prompt's cross-attention mask
    [num_prompt, images * max_num_tiles] (`mllama_prompt`). Generated tokens see what the prompt's
    last token sees. A digest of the pixels salts the sequence's prefix-cache blocks: the same
    tokens with another image have other KV.
  * Its first prefill call runs the vision graph on its images and hands the states to the text
    model (`cross_attention_states`); the call's `present_cross_*` outputs are the cross K/V,
    kept in `CrossAttentionCache` under the request id (a request's n sequences share them) until
    the request ends: finished, failed or cancelled (`EngineCore._finish`). A preempted sequence
    keeps them: preemption frees KV *blocks* (the shortage it answers), which the cross cache is no
    part of, so recomputing the prompt re-reads the cache instead of re-running the vision graph.
  * Every later call (the rest of a chunked prompt, decode steps, a prompt recomputed after
    preemption) passes no new states and the cached K/V as `past_cross_*`.
  * A text-only request has one tile of zero K/V that no token sees: the cross-attention layers then
    add exactly nothing (docs/vision.md). Its cross cache is those zeros, never stored.

Batching. One text-model call takes new image states for all of its rows or for none, and its cross
caches must all be as long. A token that sees no tile (text before the first image) attends to every
cached image token unmasked (transformers' rule), so padding its row's cache with extra tiles would
change its output. Hence:

  * a prefill chunk of a request with images runs in a call of its own (exact length, no padding);
  * text-only prefill chunks share calls as before (all have the same one-tile zero cache);
  * decode steps of every row share the one decode call: the caches are padded to the longest with
    zero tiles the row's mask hides. That is exact: a generated token of a request with images sees
    at least its last image's real tiles (so padding tiles get no weight), and a text-only row's
    cache is all zero values whatever its length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from llamaforge.runtime.core.mllama_image import (
    DEFAULT_MAX_PIXELS,
    ImageInput,
    MllamaImageBatch,
    MllamaImageConfig,
    preprocess_images,
)
from llamaforge.runtime.core.mllama_prompt import cross_attention_mask
from llamaforge.runtime.core.requests import RequestError

if TYPE_CHECKING:
    from llamaforge.runtime.core.engine import Engine
    from llamaforge.runtime.core.scheduler import Chunk, Sequence

DEFAULT_MAX_IMAGES = 2  # per request; Meta recommends one (mllama_image.MllamaImageConfig.max_images)


@dataclass(eq=False)
class RequestImages:
    """One request's images: the preprocessed batch (one prompt) and its prompt's mask."""

    request_id: str
    batch: MllamaImageBatch
    mask: np.ndarray  # int64 [num_prompt, max_images * max_num_tiles]: 1 where the token may see the tile
    digest: bytes  # of the pixel values and tile layout: the prefix cache's salt

    @property
    def tiles(self) -> int:
        return int(self.mask.shape[1])

    def mask_rows(self, start: int, count: int) -> np.ndarray:
        """The mask of positions [start, start + count): generated positions see the last prompt row."""
        rows = np.arange(start, start + count).clip(max=len(self.mask) - 1)
        return self.mask[rows]


class CrossAttentionCache:
    """Per request id: its cross K/V, one [kv_heads, image_tokens, head_dim] array per past cross
    input (key.i, value.i, ... in the manifest's order). Requests without images hold none."""

    def __init__(self) -> None:
        self.entries: dict[str, list[np.ndarray]] = {}

    def get(self, request_id: str) -> list[np.ndarray] | None:
        return self.entries.get(request_id)

    def put(self, request_id: str, arrays: list[np.ndarray]) -> None:
        self.entries[request_id] = arrays

    def free(self, request_id: str) -> None:
        self.entries.pop(request_id, None)

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes for arrays in self.entries.values() for a in arrays)

    def __len__(self) -> int:
        return len(self.entries)


class CrossAttentionInputs:
    """The vision graph of a Llama 3.2 Vision engine, and the extra inputs of its text model's calls."""

    def __init__(self, engine: Engine, threads: int | None = None, providers: Seq[Any] | None = None,
                 max_images: int = DEFAULT_MAX_IMAGES, max_pixels: int | None = None) -> None:
        import onnxruntime as ort

        assert engine.vision is not None
        self.vision = engine.vision
        self.engine = engine
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.encoder = ort.InferenceSession(str(engine.dir / self.vision.model_file), options,
                                            providers=list(providers or ["CPUExecutionProvider"]))
        self.image_config = MllamaImageConfig(tile_size=self.vision.image_size, max_image_tiles=self.vision.max_num_tiles,
                                              max_images=max_images, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
        self.hidden_size = int(engine.manifest.config["hidden_size"])
        self.tokens_per_tile = self.vision.tokens_per_tile
        self.past_names = list(self.vision.past_inputs)
        self.present_names = list(self.vision.present_outputs)
        self.kv_shape = (engine.kv.num_kv_heads, engine.kv.head_dim)
        self.dtype = engine.kv.dtype
        self.cache = CrossAttentionCache()
        self._decode: tuple[tuple[int, ...], dict[str, np.ndarray]] | None = None  # the last decode call's feeds

    # -- requests -------------------------------------------------------------------------------
    def prepare(self, request_id: str, prompt_ids: Seq[int], images: Seq[ImageInput], prompt_field: str,
                images_field: str) -> RequestImages:
        """Preprocess a request's images (RequestError naming the image's field when one is bad) and
        check that its prompt has one `<|image|>` token per image."""
        marks = sum(1 for t in prompt_ids if t == self.vision.image_token_id)
        if marks != len(images):
            raise RequestError(prompt_field if images else images_field,
                               f"the prompt has {marks} <|image|> token(s) (id {self.vision.image_token_id}) but "
                               f"the request carries {len(images)} image(s): one image per <|image|> token")
        batch = preprocess_images([list(images)], self.image_config)
        n, tiles = batch.pixel_values.shape[1], batch.pixel_values.shape[2]
        mask = cross_attention_mask(prompt_ids, self.vision.image_token_id, batch.num_tiles[0], n, tiles)
        digest = hashlib.blake2b(batch.pixel_values.tobytes(), digest_size=16)
        digest.update(batch.aspect_ratio_ids.tobytes())
        return RequestImages(request_id, batch, mask.reshape(len(prompt_ids), n * tiles), digest.digest())

    def encode(self, batch: MllamaImageBatch) -> np.ndarray:
        """The projected image states [batch, max_images * max_num_tiles * tokens_per_tile, hidden]."""
        (states,) = self.encoder.run(None, {"pixel_values": batch.pixel_values, "aspect_ratio_ids": batch.aspect_ratio_ids,
                                            "aspect_ratio_mask": batch.aspect_ratio_mask})
        return np.asarray(states)

    # -- prefill calls --------------------------------------------------------------------------
    @staticmethod
    def split_groups(groups: list[list[Chunk]]) -> list[list[Chunk]]:
        """Prefill call groups with every chunk of a request with images in a call of its own."""
        out: list[list[Chunk]] = []
        for group in groups:
            text = [c for c in group if c.seq.images is None]
            out += ([text] if text else []) + [[c] for c in group if c.seq.images is not None]
        return out

    def prefill_feeds(self, chunks: list[Chunk], width: int) -> tuple[dict[str, np.ndarray], list[str]]:
        """The cross inputs of one prefill call (rows `width` tokens wide) and the outputs to fetch:
        the present cross caches when the call computes a request's cross K/V (its first call)."""
        images: RequestImages | None = chunks[0].seq.images
        if images is None:  # text-only rows: one tile of zeros each, seen by nobody
            assert all(c.seq.images is None for c in chunks)
            return self._feeds(len(chunks), np.zeros((len(chunks), width, 1), np.int64), None), []
        assert len(chunks) == 1, "a chunk with images runs alone"
        chunk = chunks[0]
        mask = np.zeros((1, width, images.tiles), np.int64)
        mask[0, : chunk.count] = images.mask_rows(chunk.start, chunk.count)
        cached = self.cache.get(images.request_id)
        if cached is not None:
            return self._feeds(1, mask, [a[None] for a in cached]), []
        states = self.encode(images.batch).astype(self.dtype, copy=False)
        feeds = self._feeds(1, mask, None, tokens=states.shape[1])
        feeds["cross_attention_states"] = states
        return feeds, self.present_names

    def store(self, chunks: list[Chunk], outputs: list[np.ndarray]) -> None:
        """Keep the cross K/V a prefill call computed (`prefill_feeds` asked for them)."""
        if outputs:
            images = chunks[0].seq.images
            assert images is not None
            self.cache.put(images.request_id, [np.ascontiguousarray(o[0]) for o in outputs])

    def _feeds(self, rows: int, mask: np.ndarray, caches: list[np.ndarray] | None,
               tokens: int | None = None) -> dict[str, np.ndarray]:
        """Feeds with no new image states, `caches` (None: zeros of `tokens`, default one tile)."""
        tokens = tokens if tokens is not None else self.tokens_per_tile
        heads, dim = self.kv_shape
        feeds = {"cross_attention_states": np.zeros((rows, 0, self.hidden_size), self.dtype), "cross_attention_mask": mask}
        for i, name in enumerate(self.past_names):
            feeds[name] = caches[i] if caches is not None else np.zeros((rows, heads, tokens, dim), self.dtype)
        return feeds

    # -- decode calls ---------------------------------------------------------------------------
    def decode_feeds(self, rows: Seq[Sequence | None]) -> dict[str, np.ndarray]:
        """The cross inputs of a decode call whose row i computes `rows[i]`'s next token (None: a dead
        row). Caches are padded to the longest with zero tiles the mask hides (see the module
        docstring: exact). The feeds are kept while the rows hold the same requests."""
        entries = [self.cache.get(s.images.request_id) if s is not None and s.images is not None else None
                   for s in rows]
        key = tuple(id(e) if e is not None else 0 for e in entries)
        if self._decode is not None and self._decode[0] == key:
            return self._decode[1]
        tiles = max([1] + [s.images.tiles for s in rows if s is not None and s.images is not None])
        mask = np.zeros((len(rows), 1, tiles), np.int64)
        caches = [np.zeros((len(rows), *self.kv_shape[:1], tiles * self.tokens_per_tile, self.kv_shape[1]), self.dtype)
                  for _ in self.past_names]
        for r, (seq, entry) in enumerate(zip(rows, entries)):
            if seq is None or seq.images is None:
                continue
            if entry is None:
                raise RuntimeError(f"{seq.seq_id}: decodes before its cross-attention cache was computed")
            mask[r, 0, : seq.images.tiles] = seq.images.mask[-1]
            for cache, array in zip(caches, entry):
                cache[r, :, : array.shape[1]] = array
        feeds = self._feeds(len(rows), mask, caches)
        self._decode = (key, feeds)
        return feeds

    def free(self, request_id: str) -> None:
        self.cache.free(request_id)
        self._decode = None
