"""An engine directory opened for inference with ONNX Runtime.

Serving hosts need only this package's dependencies (onnxruntime, numpy, tokenizers...): nothing
here imports torch, `export/` or `graphs/`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llamaforge.runtime.core.manifest import EngineManifest, ManifestError
from llamaforge.runtime.core.tokenizer import Tokenizer, load_tokenizer

NP_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class _InPlaceBinding:
    """`Engine.decode_in_place_step`'s ONNX Runtime binding: the cache arrays bound as each layer's
    past and present, and the buffers bound as the other inputs (refilled while shapes stay)."""

    caches: list[np.ndarray]
    binding: Any
    inputs: dict[str, np.ndarray] = field(default_factory=dict)


class EngineError(RuntimeError):
    pass


# ORT's exact-int8 switch: with it, ORT rewrites int8 weights of integer GEMMs (MatMulIntegerToFloat,
# MatMulInteger, ...) to uint8 and runs its u8u8 kernel, because its faster u8s8 kernel adds pairs of
# u8 x s8 products in int16 and saturates on x86 CPUs without VNNI. ORT applies it on every AVX2 CPU,
# VNNI or not; with VNNI (vpdpbusd sums in int32) u8s8 is exact, so there the switch only costs speed.
U8U8_SWITCH = "session.x64quantprecision"
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # /proc/cpuinfo names of the int8 dot-product units


def cpu_flags(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read, which keeps the exact path."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def session_config_for_cpu(config: dict[str, str], flags: frozenset[str] | None = None) -> dict[str, str]:
    """The manifest's ONNX Runtime settings adapted to this CPU: the u8u8 switch an int8-sq engine
    asks for (exactness on CPUs without VNNI) is dropped where VNNI makes the u8s8 kernel exact."""
    flags = cpu_flags() if flags is None else flags
    if config.get(U8U8_SWITCH) == "1" and any(f in flags for f in VNNI_FLAGS):
        return {k: v for k, v in config.items() if k != U8U8_SWITCH}
    return dict(config)


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: np.dtype
    max_capacity: int

    def empty(self, batch: int, capacity: int) -> list[np.ndarray]:
        """Zeroed past caches for every layer, in input order (key.0, value.0, key.1, ...)."""
        shape = (batch, self.num_kv_heads, capacity, self.head_dim)
        return [np.zeros(shape, self.dtype) for _ in range(2 * self.num_layers)]


def read_manifest(engine_dir: str | os.PathLike[str]) -> EngineManifest:
    """The engine directory's manifest, checked field by field (runtime/core/manifest.py); an
    unreadable or invalid one is an EngineError naming the file and the field."""
    try:
        return EngineManifest.read(Path(engine_dir))
    except ManifestError as e:
        raise EngineError(str(e)) from None


def check_runnable(manifest: EngineManifest, engine_dir: Path) -> None:
    """How an engine is picked: the manifest's `backend` says what built it. "ort" engines run here
    under ONNX Runtime. "trt" engines (engine.plan) need a TensorRT runner in the engine core, which
    this runtime does not have yet, so they are refused with this message rather than failing
    somewhere inside ONNX Runtime."""
    backend = manifest.backend
    if backend == "trt":
        raise EngineError(f"{engine_dir}: manifest.json field 'backend' is 'trt', but this runtime has no TensorRT "
                          "runner yet (its engine core runs ONNX Runtime engines only); serve an engine built with BACKEND=ort")
    if backend != "ort":
        raise EngineError(f"{engine_dir}: manifest.json field 'backend' is {backend!r}, which cannot run under "
                          "ONNX Runtime (expected 'ort')")


def engine_tokenizer(manifest: EngineManifest, engine_dir: Path) -> tuple[Tokenizer | None, tuple[int, ...]]:
    """The engine's tokenizer (None: token ids only) and its stop set: config.json's eos ids, then
    the tokenizer's (generation_config.json, eos_token)."""
    tok = manifest.tokenizer
    tokenizer = load_tokenizer(engine_dir, tok.to_json()) if tok is not None else None
    extra = tokenizer.eos_ids if tokenizer is not None else ()
    return tokenizer, tuple(dict.fromkeys((*manifest.special_tokens.eos_token_id, *extra)))


def ort_providers(device: str, device_id: int = 0) -> list[Any]:
    """ONNX Runtime execution providers for a device: "cpu", or "gpu" on CUDA device `device_id`
    (which needs the onnxruntime-gpu build; the CPU-only wheel is refused with a message saying so)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "gpu":
        raise EngineError(f"device {device!r} is not 'cpu' or 'gpu'")
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise EngineError(f"a GPU instance needs ONNX Runtime's CUDAExecutionProvider, but this onnxruntime "
                          f"{ort.__version__} has only {available}: install onnxruntime-gpu (built for the "
                          "container's CUDA major version) instead of onnxruntime")
    return [("CUDAExecutionProvider", {"device_id": int(device_id)}), "CPUExecutionProvider"]


class Engine:
    """One ONNX Runtime session over an engine directory, plus its tokenizer and KV-cache spec."""

    def __init__(self, engine_dir: str | os.PathLike[str], threads: int | None = None,
                 providers: Sequence[Any] | None = None, *, session_options: Any = None,
                 tokenizer_dir: str | os.PathLike[str] | None = None) -> None:
        """`providers`: ONNX Runtime execution providers (default CPU; see `ort_providers`).
        `session_options`: ONNX Runtime session options to start from (a tensor-parallel rank's graph
        needs the all-reduce op's library); `tokenizer_dir`: the engine directory whose manifest and
        files give the tokenizer (a tensor-parallel rank's: the engine's top level)."""
        import onnxruntime as ort

        self.dir = Path(engine_dir)
        self.manifest = read_manifest(self.dir)
        check_runnable(self.manifest, self.dir)
        tp = self.manifest.tensor_parallel
        if tp is not None and tp.rank is None:
            raise EngineError(f"{self.dir}: a tensor-parallel engine of {tp.size} ranks; serve it as {tp.size} rank "
                              f"processes: mpiexec -n {tp.size} llamaforge serve {self.dir} (docs/tensor_parallel.md)")
        if self.manifest.weights == "none":
            raise EngineError(f"{self.dir}: built with WEIGHTS=none (graph only); it has no weights to run")
        kv = self.manifest.kv_cache
        if kv.dtype not in NP_DTYPES:
            raise EngineError(f"{self.dir}: KV dtype {kv.dtype!r} has no NumPy type for ONNX Runtime on this host")
        # The layers with a self-attention KV cache: every layer of a text model. A Llama 3.2 Vision
        # text model's cross-attention layers have a cross cache instead (runtime/core/cross_attention.py
        # feeds it, with the image states and the cross-attention mask, through `extra_feeds`).
        self.vision = self.manifest.vision
        cross = set(self.vision.cross_attention_layers) if self.vision is not None else set()
        self.kv_layers = [layer for layer in range(kv.num_layers) if layer not in cross]
        self.kv = KVSpec(len(self.kv_layers), kv.num_kv_heads, kv.head_dim, np.dtype(NP_DTYPES[kv.dtype]), kv.max_capacity)
        self.past_names = [p.format(layer=layer) for layer in self.kv_layers for p in kv.past_inputs]
        self.present_names = [p.format(layer=layer) for layer in self.kv_layers for p in kv.present_outputs]
        self.config = self.manifest.config
        self.vocab_size = self.manifest.vocab_size
        home = self.dir if tokenizer_dir is None else Path(tokenizer_dir)
        self.tokenizer, self.eos_ids = engine_tokenizer(self.manifest if tokenizer_dir is None else read_manifest(home), home)
        options = session_options if session_options is not None else ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Quantized engines name the session settings their Q/DQ graph needs to run as written (e.g.
        # no approximate int8 MatMulNBits); see graphs/quantization/recipes.py `ort_session_config`.
        # The int8 GEMM's exactness switch depends on this CPU (VNNI or not): session_config_for_cpu.
        self.session_config: dict[str, str] = session_config_for_cpu(dict(self.manifest.ort_session_config or {}))
        for key, value in self.session_config.items():
            options.add_session_config_entry(str(key), str(value))
        self.session = ort.InferenceSession(str(self.dir / self.manifest.model_file), options,
                                            providers=list(providers or ["CPUExecutionProvider"]))
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.has_logits_index = any(i.name == "logits_index" for i in self.session.get_inputs())
        # Decode calls may update the cache arrays in place (see `decode_in_place`): only on the
        # CPU provider, where the arrays the engine core owns are the memory ORT reads and writes.
        self.decode_in_place = kv.decode_in_place and self.session.get_providers() == ["CPUExecutionProvider"]
        self.batched_continuation = kv.batched_continuation is not False
        self._in_place_binding: _InPlaceBinding | None = None  # see decode_in_place_step
        # The logits' element type and vocabulary width, where the graph fixes both (every engine we
        # build): decode_in_place_step then binds the logits output to an array of its own.
        logits_out = self.session.get_outputs()[0]
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(logits_out.type)
        width = logits_out.shape[-1] if logits_out.shape else None
        self._logits_out: tuple[np.dtype, int] | None = (np.dtype(dtype), width) if dtype and isinstance(width, int) else None

    def _feeds(self, input_ids: np.ndarray, past_lengths: np.ndarray,
               logits_index: np.ndarray | None, copy: bool = True) -> dict[str, np.ndarray]:
        """The graph's token inputs in its types; C-contiguous unless not `copy` (then possibly a
        broadcast view, for a caller that copies them into buffers of its own)."""
        as_input = np.ascontiguousarray if copy else np.asarray
        feeds: dict[str, np.ndarray] = {
            "input_ids": as_input(input_ids, dtype=np.int64),
            "past_lengths": as_input(past_lengths, dtype=np.int32),
        }
        if self.has_logits_index:
            if logits_index is None:  # every position
                batch, seq = input_ids.shape
                logits_index = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq))
            feeds["logits_index"] = as_input(logits_index, dtype=np.int64)
        return feeds

    def _select(self, logits: np.ndarray, logits_index: np.ndarray | None) -> np.ndarray:
        """Engines built before `logits_index` return every position: pick the asked-for ones."""
        if self.has_logits_index or logits_index is None:
            return logits
        return logits[np.arange(logits.shape[0])[:, None], logits_index]

    def step(self, input_ids: np.ndarray, past_lengths: np.ndarray, past: list[np.ndarray],
             logits_index: np.ndarray | None = None,
             extra_feeds: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward call: logits [B, N, V] at positions `logits_index` [B, N] (default: all S
        positions) and the updated caches. `extra_feeds`: the model's other inputs (a vision model's
        image states, cross-attention mask and cross caches)."""
        logits, presents, _ = self.step_with(input_ids, past_lengths, past, logits_index, extra_feeds)
        return logits, presents

    def step_with(self, input_ids: np.ndarray, past_lengths: np.ndarray, past: list[np.ndarray],
                  logits_index: np.ndarray | None, extra_feeds: dict[str, np.ndarray] | None,
                  extra_outputs: Sequence[str] = ()) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """`step`, also returning the named `extra_outputs` (e.g. a vision model's present cross caches)."""
        if not self.batched_continuation and input_ids.ndim == 2 and input_ids.shape[0] > 1 and input_ids.shape[1] > 1 \
                and np.any(np.asarray(past_lengths) > 0):
            return self._step_rows(input_ids, past_lengths, past, logits_index, extra_feeds, extra_outputs)
        feeds = self._feeds(input_ids, past_lengths, logits_index)
        feeds.update(zip(self.past_names, past))
        self._check_extra(extra_feeds)
        feeds.update(extra_feeds or {})
        outputs = self.session.run(["logits", *self.present_names, *extra_outputs], feeds)
        count = len(self.present_names)
        return self._select(outputs[0], logits_index), outputs[1 : 1 + count], outputs[1 + count :]

    def _step_rows(self, input_ids: np.ndarray, past_lengths: np.ndarray, past: list[np.ndarray],
                   logits_index: np.ndarray | None, extra_feeds: dict[str, np.ndarray] | None,
                   extra_outputs: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """A call of several rows that continue after a past, on a graph whose attention is ORT's GQA
        kernel alone (manifest `kv_cache.batched_continuation` false; the kernel refuses the call):
        one call per row, the results stacked. Such calls are rare (a chunk after a cached prefix
        runs alone; several speculative rows verified together), and each row still gets the fast
        kernel."""
        if extra_feeds or extra_outputs:  # built with the fallback (graphs/passes/lower_attention.py)
            raise EngineError(f"{self.dir}: a batched continuation with per-row extra inputs needs an engine built "
                              "with the attention fallback")
        lengths = np.asarray(past_lengths)
        batch, seq = input_ids.shape
        index = np.broadcast_to(np.arange(seq), (batch, seq)) if logits_index is None else np.asarray(logits_index)
        capacity = past[0].shape[2]
        logits: np.ndarray | None = None
        presents = [np.array(p) for p in past]
        for b in range(batch):
            # The op drops a row's tokens past the cache's capacity (a row padded to the call's widest
            # one), and their logits are undefined; the kernel refuses them, so the row runs without.
            n = min(seq, capacity - int(lengths[b]))
            if n <= 0:
                continue
            row_logits, row_present, _ = self.step_with(input_ids[b : b + 1, :n], lengths[b : b + 1],
                                                        [p[b : b + 1] for p in past], np.minimum(index[b : b + 1], n - 1),
                                                        None, ())
            if logits is None:
                logits = np.zeros((batch, *row_logits.shape[1:]), row_logits.dtype)
            logits[b] = row_logits[0]
            for whole, row in zip(presents, row_present):
                whole[b] = row[0]
        if logits is None:
            raise EngineError(f"{self.dir}: no row of the call has room in its cache ({capacity} positions)")
        return logits, presents, []

    def _check_extra(self, extra_feeds: dict[str, np.ndarray] | None) -> None:
        if self.vision is not None and not extra_feeds:
            raise EngineError(f"{self.dir}: a Llama 3.2 Vision engine's text model also takes image states and cross "
                              "caches: run it through the engine core (runtime/core/cross_attention.py feeds them)")

    def decode_in_place_step(self, input_ids: np.ndarray, past_lengths: np.ndarray, caches: list[np.ndarray],
                             logits_index: np.ndarray | None = None,
                             extra_feeds: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """One call that writes each row's new keys/values into `caches` (C-contiguous, key.0,
        value.0, ...) at its past length, and returns the logits [B, N, V] at `logits_index` [B, N]
        (default: every position). input_ids [B, 1] (a decode step), or [1, S] (one row's S tokens:
        a speculative verify row): the shapes the attention op runs on ORT's GroupQueryAttention
        kernel (plugins/attention/ort_lowering.py).

        `step` hands ORT the past and gets a fresh present back: a copy of every row's whole cache,
        every step, which costs as much as the matmuls once contexts are long. Bound as one buffer
        (input and output), ORT's GroupQueryAttention kernel appends in place instead. Only for
        engines whose manifest says every layer's decode update is that kernel (`decode_in_place`).
        `extra_feeds`: as for `step` (a vision model's cross inputs; its present cross caches, equal to
        the past ones in a decode step, are not fetched)."""
        import onnxruntime as ort

        if not self.decode_in_place:
            raise EngineError(f"{self.dir}: this engine cannot update its KV cache in place (manifest kv_cache."
                              "decode_in_place is not true, or the provider is not the CPU)")
        if input_ids.ndim != 2 or (input_ids.shape[1] != 1 and input_ids.shape[0] != 1):
            raise EngineError("decode_in_place_step takes input_ids [batch, 1] or [1, seq], got shape "
                              f"{list(input_ids.shape)}")
        # The caches' binding is kept while the same arrays come back (the decode batch's, step after
        # step): wrapping and binding two OrtValues a layer costs about 5 us each, which on a small
        # model is several percent of a step. The binding holds the arrays, so they outlive it.
        bound = self._in_place_binding
        if bound is None or len(bound.caches) != len(caches) or not all(a is b for a, b in zip(bound.caches, caches)):
            binding = self.session.io_binding()
            binding.bind_output(self.output_names[0])  # first, so it is get_outputs()[0]; rebound below
            for past, present, cache in zip(self.past_names, self.present_names, caches):
                if not cache.flags.c_contiguous or cache.dtype != self.kv.dtype:
                    raise EngineError(f"{past}: in-place caches must be C-contiguous {self.kv.dtype}")
                value = ort.OrtValue.ortvalue_from_numpy(cache)
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            bound = self._in_place_binding = _InPlaceBinding(list(caches), binding)
        binding = bound.binding
        self._check_extra(extra_feeds)
        # The token inputs go into buffers bound once and refilled while their shapes stay (every
        # decode step of a batch): binding new arrays each call costs about 0.1 ms a step in ONNX
        # Runtime, over 3% of a 125M model's int4 decode step on 2 cores (make bench-quant-speed).
        for name, value in self._feeds(input_ids, past_lengths, logits_index, copy=False).items():
            buffer = bound.inputs.get(name)
            if buffer is not None and buffer.shape == value.shape and buffer.dtype == value.dtype:
                np.copyto(buffer, value)
            else:
                buffer = bound.inputs[name] = np.array(value, order="C")
                binding.bind_cpu_input(name, buffer)
        extra = {k: np.ascontiguousarray(v) for k, v in (extra_feeds or {}).items()}  # kept alive until the run is over
        for name, array in extra.items():
            binding.bind_cpu_input(name, array)
        # The logits go into a fresh array of this call's shape: binding it is cheaper than fetching
        # every output's OrtValue back (get_outputs wraps the 2 x layers caches too), and a new array
        # each call means no caller's logits are overwritten by the next one.
        if self._logits_out is None:
            binding.bind_output(self.output_names[0])
            self.session.run_with_iobinding(binding)
            return self._select(binding.get_outputs()[0].numpy(), logits_index)
        dtype, width = self._logits_out
        logits = np.empty((input_ids.shape[0], self._logits_rows(input_ids, logits_index), width), dtype)
        binding.bind_output(self.output_names[0], "cpu", 0, dtype, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return self._select(logits, logits_index)

    def _logits_rows(self, input_ids: np.ndarray, logits_index: np.ndarray | None) -> int:
        """The logits output's positions for this call: `logits_index`'s, else every input position."""
        return int(np.shape(logits_index)[1]) if self.has_logits_index and logits_index is not None else int(input_ids.shape[1])
