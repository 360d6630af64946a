"""The Triton kernels of the attention op against the reference, and the TensorRT plugin's contract.

Without a GPU the kernels run under Triton's CPU interpreter, which must be on before the kernel
module is imported (the decision is taken when `@triton.jit` runs): this module sets
TRITON_INTERPRET=1 itself when there is no GPU. With a GPU the same tests run the compiled kernels
on CUDA tensors, and a shape grid runs as well.

The AOT path of the TensorRT plugin is exercised without TensorRT or a GPU: a subprocess (the
interpreter cannot compile) drives `trt_plugin`'s decorated functions through a stand-in for
`tensorrt.plugin`, compiles the kernel for sm_90, and has Triton's bundled ptxas assemble the PTX
that TensorRT would embed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
from attention_inputs import random_inputs

from llamaforge.plugins.attention import reference
from llamaforge.plugins.attention.schema import (
    INPUTS,
    OP_TYPE,
    OUTPUTS,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    AttentionAttrs,
    single_op_model,
)

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()


def _import_kernels() -> tuple[Any, str]:
    if not CUDA:
        # Read when @triton.jit runs (at the kernel module's import) and again when a kernel is
        # first launched, so it stays set; nothing else in the suite uses Triton.
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401

        from llamaforge.plugins.attention import triton_kernels
    except ImportError as exc:
        return None, f"OpenAI Triton is not importable ({exc}); install the 'test' extra"
    if not CUDA and not triton_kernels.interpreting():
        return None, ("llamaforge.plugins.attention.triton_kernels was imported before TRITON_INTERPRET was set, and "
                      "there is no GPU to run its compiled kernels")
    return triton_kernels, ""


tk, _SKIP_REASON = _import_kernels()
needs_triton = pytest.mark.skipif(tk is None, reason=_SKIP_REASON)
DEVICE = "cuda" if CUDA and tk is not None and not tk.interpreting() else "cpu"

LLAMA3 = dict(rope_theta=500000.0, rope_scaling_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
              rope_high_freq_factor=4.0, rope_original_max_positions=16)
PREFILL_CASES = [
    pytest.param(AttentionAttrs(4, 4, 16), id="mha"),
    pytest.param(AttentionAttrs(8, 2, 16), id="gqa4"),
    pytest.param(AttentionAttrs(4, 1, 32, rope_theta=1e6), id="mqa-d32"),
    pytest.param(AttentionAttrs(4, 2, 16, **LLAMA3), id="llama3-scaling"),
    pytest.param(AttentionAttrs(4, 2, 16, rope_interleaved=1), id="interleaved"),
]


def to(device: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in feeds.items()}


def assert_op_close(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], past: list[int], seq: int,
                    atol: float, rtol: float) -> None:
    """Compare where the contract defines values: output rows whose token fits in the cache, and
    cache positions below past + seq (clipped to capacity); the copied prefix must be exact."""
    capacity = want[1].shape[2]
    for b, p in enumerate(past):
        rows = max(0, min(seq, capacity - p))
        torch.testing.assert_close(got[0][b, :rows].cpu().float(), want[0][b, :rows].float(), atol=atol, rtol=rtol)
        end = min(p + seq, capacity)
        for i in (1, 2):
            torch.testing.assert_close(got[i][b, :, :p].cpu(), want[i][b, :, :p], atol=0, rtol=0)
            torch.testing.assert_close(got[i][b, :, p:end].cpu().float(), want[i][b, :, p:end].float(),
                                       atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------------------
# Prefill / the op
# ---------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-phase"])
@pytest.mark.parametrize("attrs", PREFILL_CASES)
def test_prefill_matches_reference_mixed_rows(attrs: AttentionAttrs, fused: bool) -> None:
    # Rows at different cache positions in one call, one of them overflowing the capacity.
    past = [0, 7, 21]
    feeds = random_inputs(attrs, batch=3, seq=5, capacity=24, past=past)
    got = tk.prefill_attention(*to(DEVICE, feeds).values(), attrs, fused=fused)
    want = reference.llama_attention(*feeds.values(), attrs)
    assert_op_close(got, want, past, 5, atol=2e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "two-phase"])
def test_prefill_many_tiles(fused: bool) -> None:
    # 37 tokens x 4 heads per KV head = 148 packed rows: many query tiles and key tiles, tokens
    # straddling tile edges, a causal diagonal inside tiles, and a row that fills the cache exactly.
    attrs = AttentionAttrs(8, 2, 16, **LLAMA3)
    past = [0, 5, 59]
    feeds = random_inputs(attrs, batch=3, seq=37, capacity=96, past=past, seed=11)
    got = tk.prefill_attention(*to(DEVICE, feeds).values(), attrs, fused=fused)
    want = reference.llama_attention(*feeds.values(), attrs)
    assert_op_close(got, want, past, 37, atol=2e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)], ids=["fp16", "bf16"])
def test_prefill_half_precision(dtype: torch.dtype, atol: float) -> None:
    attrs = AttentionAttrs(8, 2, 16, rope_interleaved=1)
    past = [3, 0]
    feeds = random_inputs(attrs, batch=2, seq=6, capacity=16, past=past, seed=5, dtype=dtype)
    for fused in (True, False):
        got = tk.prefill_attention(*to(DEVICE, feeds).values(), attrs, fused=fused)
        want = reference.llama_attention(*feeds.values(), attrs)
        assert got[0].dtype == dtype and got[1].dtype == dtype
        assert_op_close(got, want, past, 6, atol=atol, rtol=1e-2)


@needs_triton
def test_prefill_decode_step_through_the_op() -> None:
    # seq = 1 through the op (what a TensorRT engine does while decoding): one tile per KV head.
    attrs = AttentionAttrs(8, 2, 16)
    past = [0, 1, 17, 39]
    feeds = random_inputs(attrs, batch=4, seq=1, capacity=40, past=past, seed=3)
    got = tk.prefill_attention(*to(DEVICE, feeds).values(), attrs)
    want = reference.llama_attention(*feeds.values(), attrs)
    assert_op_close(got, want, past, 1, atol=2e-6, rtol=1e-5)


@needs_triton
def test_prefill_rejects_mismatched_shapes() -> None:
    attrs = AttentionAttrs(8, 2, 16)
    feeds = random_inputs(attrs, batch=1, seq=2, capacity=8, past=[0])
    with pytest.raises(ValueError, match="do not match"):
        tk.prefill_attention(*feeds.values(), AttentionAttrs(4, 2, 16))


# ---------------------------------------------------------------------------------------------
# Decode (flash-decoding)
# ---------------------------------------------------------------------------------------------
def decode_case(attrs: AttentionAttrs, lens: list[int], capacity: int, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """One new token per row at position lens[b] - 1: (feeds, expected output, present_key, present_value)."""
    feeds = random_inputs(attrs, batch=len(lens), seq=1, capacity=capacity, past=[n - 1 for n in lens], seed=seed,
                          dtype=dtype)
    out, present_key, present_value = reference.llama_attention(*feeds.values(), attrs)
    return feeds, out, present_key, present_value


def paginate(cache: torch.Tensor, lens: list[int], block_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The runtime's layout: a pool [1 + blocks, kvh, block_size, d] with block 0 the zero block, and
    block tables [B, max_blocks] whose unused entries point at block 0."""
    batch, kvh, capacity, d = cache.shape
    needed = [-(-n // block_size) for n in lens]
    width = -(-capacity // block_size) + 1  # one spare column, left at the zero block
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(sum(needed), generator=g) + 1
    pool = torch.zeros(1 + sum(needed), kvh, block_size, d, dtype=cache.dtype)
    tables = torch.zeros(batch, width, dtype=torch.int32)
    used = 0
    for b, count in enumerate(needed):
        for i in range(count):
            block = int(order[used])
            used += 1
            tables[b, i] = block
            chunk = cache[b, :, i * block_size:(i + 1) * block_size]
            pool[block, :, :chunk.shape[1]] = chunk
    return pool, tables


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("attrs", [AttentionAttrs(4, 4, 16), AttentionAttrs(8, 2, 16, **LLAMA3)], ids=["mha", "gqa4"])
def test_decode_contiguous_matches_reference(attrs: AttentionAttrs, num_splits: int) -> None:
    lens = [1, 2, 18, 40]
    feeds, want, pk, pv = decode_case(attrs, lens, capacity=40, seed=3)
    got = tk.decode_attention(feeds["query"].to(DEVICE), pk.to(DEVICE), pv.to(DEVICE),
                              torch.tensor(lens, dtype=torch.int32, device=DEVICE), attrs, num_splits=num_splits)
    assert got.shape == want.shape
    torch.testing.assert_close(got.cpu(), want, atol=2e-6, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_paged_matches_reference(block_size: int) -> None:
    attrs = AttentionAttrs(8, 2, 16, rope_interleaved=1)
    lens = [1, 9, 33]
    feeds, want, pk, pv = decode_case(attrs, lens, capacity=40, seed=4)
    pool_k, tables = paginate(pk, lens, block_size, seed=1)
    pool_v, _ = paginate(pv, lens, block_size, seed=1)
    got = tk.decode_attention(feeds["query"].to(DEVICE), pool_k.to(DEVICE), pool_v.to(DEVICE),
                              torch.tensor(lens, dtype=torch.int32, device=DEVICE), attrs,
                              block_tables=tables.to(DEVICE), num_splits=2)
    torch.testing.assert_close(got.cpu(), want, atol=2e-6, rtol=1e-5)


def fp8_reference(query: torch.Tensor, key_fp8: torch.Tensor, value_fp8: torch.Tensor, k_scale: float,
                  v_scale: float, lens: list[int], attrs: AttentionAttrs) -> torch.Tensor:
    """Decode attention over an FP8 cache dequantized as k_fp8.to(float32) * k_scale, with the
    reference's RoPE and float32 softmax."""
    batch = len(lens)
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    cos, sin = reference.rope_cos_sin(torch.tensor(lens)[:, None] - 1, attrs)  # [B, 1, D/2]
    cos, sin = cos[:, None].to(query.dtype).float(), sin[:, None].to(query.dtype).float()
    q = query.view(batch, 1, h, d).transpose(1, 2).float()
    q = reference.apply_rope(q, cos, sin, bool(attrs.rope_interleaved)).to(query.dtype).float()
    k = key_fp8.to(torch.float32) * k_scale
    v = value_fp8.to(torch.float32) * v_scale
    scores = q.view(batch, kvh, attrs.group_size, 1, d) @ k[:, :, None].transpose(-1, -2) * attrs.scale
    visible = torch.arange(k.shape[2])[None, :] < torch.tensor(lens)[:, None]
    scores = scores.masked_fill(~visible[:, None, None, None], float("-inf"))
    out = scores.softmax(-1) @ v[:, :, None]
    return out.reshape(batch, h, 1, d).transpose(1, 2).reshape(batch, 1, h * d).to(query.dtype)


@needs_triton
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
def test_decode_fp8_cache_with_scales(paged: bool, dtype: torch.dtype, atol: float) -> None:
    attrs = AttentionAttrs(8, 2, 16)
    lens = [5, 23, 40]
    feeds, _, pk, pv = decode_case(attrs, lens, capacity=40, seed=6, dtype=dtype)
    k_scale, v_scale = 0.03125, 0.0125  # different K and V scales
    key_fp8 = (pk.float() / k_scale).to(torch.float8_e4m3fn)
    value_fp8 = (pv.float() / v_scale).to(torch.float8_e4m3fn)
    want = fp8_reference(feeds["query"], key_fp8, value_fp8, k_scale, v_scale, lens, attrs)
    tables = None
    kc, vc = key_fp8, value_fp8
    if paged:
        kc, tables = paginate(key_fp8.view(torch.uint8), lens, 8, seed=2)
        vc, _ = paginate(value_fp8.view(torch.uint8), lens, 8, seed=2)
        kc, vc, tables = kc.view(torch.float8_e4m3fn), vc.view(torch.float8_e4m3fn), tables.to(DEVICE)
    got = tk.decode_attention(feeds["query"].to(DEVICE), kc.to(DEVICE), vc.to(DEVICE),
                              torch.tensor(lens, dtype=torch.int32, device=DEVICE), attrs, block_tables=tables,
                              k_scale=k_scale, v_scale=v_scale, num_splits=2)
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu().float(), want.float(), atol=atol, rtol=1e-2 if dtype != torch.float32 else 1e-5)


@needs_triton
def test_decode_without_rope_takes_rotated_queries() -> None:
    attrs = AttentionAttrs(4, 2, 16)
    lens = [3, 12]
    feeds, want, pk, pv = decode_case(attrs, lens, capacity=16, seed=8)
    cos, sin = reference.rope_cos_sin(torch.tensor(lens)[:, None] - 1, attrs)
    q = feeds["query"].view(2, 1, 4, 16).transpose(1, 2)
    q = reference.apply_rope(q, cos[:, None], sin[:, None], False).transpose(1, 2).reshape(2, 64)
    got = tk.decode_attention(q.to(DEVICE), pk.to(DEVICE), pv.to(DEVICE), torch.tensor(lens, dtype=torch.int32,
                              device=DEVICE), attrs, apply_rope=False)
    torch.testing.assert_close(got.cpu(), want.view(2, 64), atol=2e-6, rtol=1e-5)


@needs_triton
def test_decode_rejects_foreign_cache_dtype() -> None:
    attrs = AttentionAttrs(4, 2, 16)
    q = torch.zeros(1, 64)
    cache = torch.zeros(1, 2, 8, 16, dtype=torch.float16)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        tk.decode_attention(q, cache, cache, torch.ones(1, dtype=torch.int32), attrs)


# ---------------------------------------------------------------------------------------------
# GPU: a grid of realistic shapes (skipped without CUDA)
# ---------------------------------------------------------------------------------------------
GRID = [(batch, context, group, d) for batch in (1, 4) for context in (1024, 8192) for group in (1, 4, 8)
        for d in (64, 128)]


@needs_triton
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (the shape grid is too large for the interpreter)")
@pytest.mark.parametrize("batch,context,group,head_dim", GRID)
def test_gpu_grid(batch: int, context: int, group: int, head_dim: int) -> None:
    attrs = AttentionAttrs(2 * group, 2, head_dim, rope_theta=500000.0, rope_scaling_type="llama3",
                           rope_scaling_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                           rope_original_max_positions=8192)
    dtype = torch.float16
    # Prefill: one row from scratch over the whole context, or rows continuing prompts.
    seq = context if batch == 1 else 512
    past = [0] if batch == 1 else [context - seq - 61 * b for b in range(batch)]
    feeds = to("cuda", random_inputs(attrs, batch, seq, context, past, seed=batch + group, dtype=dtype))
    with torch.device("cuda"):  # the reference builds its aranges on the default device
        want = reference.llama_attention(*feeds.values(), attrs)
    for fused in (False, True):
        got = tk.prefill_attention(*feeds.values(), attrs, fused=fused)
        # No atomics and no reads of what a launch writes: a second launch gives the same bits. (On
        # an H200 with Triton 3.6 the fused launch did not, in rows continuing a past: docs/benchmarks.md.)
        again = tk.prefill_attention(*feeds.values(), attrs, fused=fused)
        assert torch.equal(got[0], again[0]), f"fused={fused}: two launches on the same inputs differ"
        assert_op_close(tuple(t.cpu() for t in got), tuple(t.cpu() for t in want), past, seq, atol=2e-2, rtol=2e-2)
    del want, got, again
    # Decode at the end of the context: contiguous, paged, and FP8.
    lens = [context - 13 * b for b in range(max(batch, 2))]
    dfeeds = to("cuda", random_inputs(attrs, len(lens), 1, context, [n - 1 for n in lens], seed=7, dtype=dtype))
    with torch.device("cuda"):
        dwant, pk, pv = reference.llama_attention(*dfeeds.values(), attrs)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    got = tk.decode_attention(dfeeds["query"], pk.cuda(), pv.cuda(), seq_lens, attrs)
    torch.testing.assert_close(got.float().cpu(), dwant.float().cpu(), atol=2e-2, rtol=2e-2)
    pool_k, tables = paginate(pk.cpu(), lens, 16)
    pool_v, _ = paginate(pv.cpu(), lens, 16)
    got = tk.decode_attention(dfeeds["query"], pool_k.cuda(), pool_v.cuda(), seq_lens, attrs, block_tables=tables.cuda())
    torch.testing.assert_close(got.float().cpu(), dwant.float().cpu(), atol=2e-2, rtol=2e-2)
    # Per-tensor amax scales, one for K and one for V (V's amax can exceed K's: one shared scale would
    # overflow e4m3 to NaN), saturated as QuantizeLinear(saturate=1) does.
    k_scale, v_scale = float(pk.abs().max()) / 448.0, float(pv.abs().max()) / 448.0
    k8 = (pk.float() / k_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    v8 = (pv.float() / v_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    want8 = fp8_reference(dfeeds["query"].cpu(), k8.cpu(), v8.cpu(), k_scale, v_scale, lens, attrs)
    got = tk.decode_attention(dfeeds["query"], k8.cuda(), v8.cuda(), seq_lens, attrs, k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(got.float().cpu(), want8.float(), atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# The TensorRT plugin, without TensorRT
# ---------------------------------------------------------------------------------------------
def test_trt_plugin_imports_without_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    monkeypatch.delitem(sys.modules, "llamaforge.plugins.attention.trt_plugin", raising=False)
    from llamaforge.plugins.attention import trt_plugin

    assert not trt_plugin.is_registered()
    with pytest.raises(trt_plugin.TensorRTUnavailable, match="TensorRT is not installed"):
        trt_plugin.register()


def test_trt_plugin_rejects_the_type_stubs(monkeypatch: pytest.MonkeyPatch) -> None:
    # tensorrt-stubs makes `import tensorrt` succeed without the library (no Builder).
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    from llamaforge.plugins.attention import trt_plugin

    with pytest.raises(trt_plugin.TensorRTUnavailable, match="stubs are not enough"):
        trt_plugin.register()
    assert not trt_plugin.is_registered()


def test_trt_plugin_identity_matches_schema() -> None:
    from llamaforge.plugins.attention import trt_plugin

    assert trt_plugin.PLUGIN_NAME == OP_TYPE
    assert trt_plugin.PLUGIN_ID == f"{PLUGIN_NAMESPACE}::{OP_TYPE}"
    assert trt_plugin.QDP_PLUGIN_VERSION == PLUGIN_VERSION
    assert list(trt_plugin.ATTRIBUTE_NAMES) == [f.name for f in fields(AttentionAttrs)]
    # The ONNX parser looks the plugin up by op type, plugin_namespace and plugin_version, and
    # reads the plugin's fields from the node's attributes by name.
    node = single_op_model(AttentionAttrs(8, 2, 16)).graph.node[0]
    attrs = {a.name for a in node.attribute}
    assert node.op_type == trt_plugin.PLUGIN_NAME
    assert set(trt_plugin.ATTRIBUTE_NAMES) <= attrs
    values = {a.name: a.s.decode() for a in node.attribute if a.name.startswith("plugin_")}
    assert values == {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": trt_plugin.QDP_PLUGIN_VERSION}


def test_trt_scalar_args_are_the_contiguous_strides() -> None:
    from llamaforge.plugins.attention import trt_plugin

    attrs = AttentionAttrs(8, 2, 16)
    b, s, c = 3, 5, 24
    q, k = torch.empty(b, s, 8 * 16), torch.empty(b, s, 2 * 16)
    cache = torch.empty(b, 2, c, 16)
    expected = [s, c, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(0), k.stride(1),
                cache.stride(0), cache.stride(1), cache.stride(2), q.stride(0), q.stride(1)]
    assert trt_plugin.op_scalar_args(s, c, attrs) == expected
    if tk is not None:
        assert len(expected) == len(tk.OP_SCALAR_ARGS)
        assert list(tk.OP_INPUT_ARGS) == [n for n in tk._attention_kernel.arg_names[:6]]


AOT_SCRIPT = r"""
import inspect, json, re, subprocess, sys, tempfile, types
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from llamaforge.plugins.attention import trt_plugin, triton_kernels as tk
from llamaforge.plugins.attention.schema import AttentionAttrs

target = GPUTarget("cuda", 90, 32)
real_compile = tk.compile_op_kernel
tk.compile_op_kernel = lambda attrs, dtype, config, target_=None: real_compile(attrs, dtype, config, target=target)

class Desc:  # a TensorDesc whose shape expressions are plain ints
    def __init__(self, shape, dtype): self.shape_expr, self.dtype = shape, dtype
    def like(self): return Desc(self.shape_expr, self.dtype)
class Launch: pass
class Combo:
    def __init__(self, types, layouts=None): self.types, self.layouts, self.ids = types, layouts, None
    def tactics(self, ids): self.ids = ids
class SymIntExprs(list):
    @classmethod
    def from_tuple(cls, items): return cls(items)
registered = {}
def decorator(kind):
    return lambda plugin_id: (lambda f: registered.setdefault(kind, (plugin_id, f))[1])
trtp = types.SimpleNamespace(register=decorator("register"), autotune=decorator("autotune"),
    aot_impl=decorator("aot_impl"), TensorDesc=Desc, AutoTuneCombination=Combo, KernelLaunchParams=Launch,
    SymIntExprs=SymIntExprs, SymExprs=SymIntExprs, SymInt32=int, cdiv=lambda a, b: -(-a // b))
trt = types.SimpleNamespace(float32="fp32", float16="fp16", bfloat16="bf16")
trt_plugin._define(trt, trtp, tk)

attrs = AttentionAttrs(16, 4, 64)
B, S, C = 2, 7, 48
descs = [Desc((B, S, 16 * 64), "fp16"), Desc((B, S, 4 * 64), "fp16"), Desc((B, S, 4 * 64), "fp16"),
         Desc((B, 4, C, 64), "fp16"), Desc((B, 4, C, 64), "fp16"), Desc((B,), "int32")]
values = [getattr(attrs, n) for n in trt_plugin.ATTRIBUTE_NAMES]
outs = registered["register"][1](*descs, *values)
combos = registered["autotune"][1](*descs, outs)
name, ptx, launch, extra = registered["aot_impl"][1](*descs, *values, outs, 4)
ptx = ptx.decode()
params = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S).group(1).count(".param")
# The decode kernel with an FP8 paged cache and bf16 activations (launched by the runtime, not TRT).
import torch, triton
sig = {"Q": "*bf16", "KCache": "*fp8e4nv", "VCache": "*fp8e4nv", "SeqLens": "*i32", "BlockTables": "*i32",
       "KScale": "*fp32", "VScale": "*fp32", "MidO": "*fp32", "MidLse": "*fp32"}
sig.update({n: "i32" for n in ("stride_qb", "stride_kb", "stride_kh", "stride_kc", "stride_vb", "stride_vh",
                                "stride_vc", "stride_bt", "split_size", "num_splits")})
consts = dict(NUM_KV_HEADS=4, GROUP=4, BLOCK_G=16, HEAD_DIM=64, BLOCK_D=64, BLOCK_N=64, PAGED=True, PAGE_SIZE=16,
              HAS_SCALES=True, APPLY_ROPE=True, INV_FREQ=tk.inv_freq_constexpr(attrs), INTERLEAVED=False,
              QK_SCALE=0.18, DOT_PRECISION=tk.dot_precision(torch.bfloat16))
sig.update({k: "constexpr" for k in consts})
decode = triton.compile(triton.compiler.ASTSource(fn=tk._decode_split_kernel, signature=sig, constexprs=consts),
                        target=target)
with tempfile.TemporaryDirectory() as tmp:
    open(tmp + "/k.ptx", "w").write(ptx)
    r = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", tmp + "/k.ptx", "-o", tmp + "/k.cubin"],
                       capture_output=True, text=True)
print(json.dumps({
    "ids": {k: v[0] for k, v in registered.items()},
    "register_params": list(inspect.signature(registered["register"][1]).parameters),
    "aot_params": list(inspect.signature(registered["aot_impl"][1]).parameters),
    "outputs": [[list(o.shape_expr), o.dtype] for o in outs],
    "combos": [[c.types, c.layouts, c.ids] for c in combos],
    "name": name.decode(), "ptx_params": params, "launch": launch.__dict__, "extra": list(extra),
    "ptxas": [r.returncode, r.stderr[-2000:]],
    "decode_ptx": "cvt.rn.bf16x2.e4m3x2" in decode.asm["ptx"] or "e4m3" in decode.asm["ptx"],
}))
"""


@needs_triton
def test_trt_aot_impl_compiles_ptx_that_ptxas_accepts() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", AOT_SCRIPT, str(ROOT)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    plugin_id = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"
    assert info["ids"] == {"register": plugin_id, "autotune": plugin_id, "aot_impl": plugin_id}
    attr_names = [f.name for f in fields(AttentionAttrs)]
    assert info["register_params"] == list(INPUTS) + attr_names
    assert info["aot_params"] == list(INPUTS) + attr_names + ["outputs", "tactic"]
    assert info["outputs"] == [[[2, 7, 1024], "fp16"], [[2, 4, 48, 64], "fp16"], [[2, 4, 48, 64], "fp16"]]
    assert len(info["outputs"]) == len(OUTPUTS)
    assert [c[2] for c in info["combos"]] == [list(tk.FP16_TACTICS), list(tk.FP32_TACTICS)]
    assert all(len(c[0].split(",")) == len(INPUTS) + len(OUTPUTS) for c in info["combos"])
    config = tk.OP_CONFIGS[4]
    assert info["name"] == "_attention_kernel"
    # TensorRT passes 6 inputs, 13 int32 scalars, 3 outputs: Triton's hidden scratch params are gone.
    assert info["ptx_params"] == len(INPUTS) + len(tk.OP_SCALAR_ARGS) + len(OUTPUTS)
    assert info["launch"]["grid_x"] == -(-7 * 4 // config.block_m)
    assert info["launch"]["grid_y"] == 2 * 4
    assert info["launch"]["block_x"] == 32 * config.num_warps
    assert info["extra"][:2] == [7, 48]
    assert info["ptxas"][0] == 0, info["ptxas"][1]
    assert info["decode_ptx"]  # the FP8 decode kernel compiled, converting e4m3 in registers
