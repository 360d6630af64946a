"""The OpenAI Triton kernel of `llamaforge::CrossAttention` against the reference, and its TensorRT
plugin's contract (plugins/cross_attention/triton_kernels.py, trt_plugin.py).

Without a GPU the kernel runs under Triton's CPU interpreter (switched on here before the kernel
modules are imported, as tests/plugins/test_triton_kernels.py does); with a GPU the same tests run
the compiled kernel on CUDA tensors. The AOT path is driven without TensorRT or a GPU: a subprocess
runs the plugin's decorated functions through a stand-in for `tensorrt.plugin`, compiles the kernel
for sm_90 and has Triton's bundled ptxas assemble the PTX TensorRT would embed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from llamaforge.plugins.cross_attention import reference
from llamaforge.plugins.cross_attention.schema import INPUTS, OUTPUTS, CrossAttentionAttrs, single_op_model

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()


def _import_kernels() -> tuple[Any, str]:
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit runs and at each launch: kept on
    try:
        import triton  # noqa: F401

        from llamaforge.plugins.cross_attention import triton_kernels
    except ImportError as exc:
        return None, f"OpenAI Triton is not importable ({exc}); install the 'test' extra"
    if not CUDA and not triton_kernels.interpreting():
        return None, ("the Triton kernel modules were imported before TRITON_INTERPRET was set, and there is no "
                      "GPU to run their compiled kernels")
    return triton_kernels, ""


tk, _SKIP_REASON = _import_kernels()
needs_triton = pytest.mark.skipif(tk is None, reason=_SKIP_REASON)
DEVICE = "cuda" if CUDA and tk is not None and not tk.interpreting() else "cpu"

ATTRS = CrossAttentionAttrs(num_heads=4, num_kv_heads=2, head_dim=16, tokens_per_tile=5)


def case(batch: int, seq: int, new: int, capacity: int, attrs: CrossAttentionAttrs = ATTRS, seed: int = 0,
         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    tiles = max(capacity // attrs.tokens_per_tile, 1)
    mask = (torch.rand(batch, seq, tiles, generator=gen) > 0.5).long()
    mask[:, 0] = 0  # a row that sees no tile: it attends to every position
    floats = {"query": torch.randn(batch, seq, h * d, generator=gen), "key": torch.randn(batch, new, kvh * d, generator=gen),
              "value": torch.randn(batch, new, kvh * d, generator=gen),
              "past_key": torch.randn(batch, kvh, capacity, d, generator=gen),
              "past_value": torch.randn(batch, kvh, capacity, d, generator=gen)}
    return {**{k: v.to(dtype) for k, v in floats.items()}, "cross_attention_mask": mask}


def run_both(feeds: dict[str, torch.Tensor], attrs: CrossAttentionAttrs = ATTRS) -> tuple[tuple[torch.Tensor, ...], ...]:
    want = reference.cross_attention(*feeds.values(), attrs)
    got = tk.cross_attention(*(v.to(DEVICE) for v in feeds.values()), attrs)
    return tuple(g.cpu() for g in got), want


@needs_triton
@pytest.mark.parametrize("batch, seq, new, capacity", [(2, 7, 30, 30), (3, 1, 0, 30), (2, 1, 10, 30), (1, 40, 20, 45)],
                         ids=["prefill", "decode", "partial-write", "many-tiles"])
def test_kernel_matches_reference(batch: int, seq: int, new: int, capacity: int) -> None:
    got, want = run_both(case(batch, seq, new, capacity))
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), "present_* is a copy, exact"


@needs_triton
def test_empty_cache_gives_zero_output() -> None:
    got, want = run_both(case(1, 4, 0, 0))
    assert torch.equal(got[0], torch.zeros_like(want[0])) and torch.equal(want[0], torch.zeros_like(want[0]))


@needs_triton
def test_mqa_and_wide_heads() -> None:
    attrs = CrossAttentionAttrs(num_heads=8, num_kv_heads=1, head_dim=32, tokens_per_tile=7)
    got, want = run_both(case(2, 5, 21, 21, attrs, seed=3), attrs)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision(dtype: torch.dtype, atol: float) -> None:
    """16-bit inputs: the probabilities are rounded to the value type before the P.V product (a
    tensor-core dot); the reference keeps them in float32. Outputs are O(1), so `atol` is a few ulps."""
    got, want = run_both(case(2, 6, 30, 30, dtype=dtype, seed=1))
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=atol, rtol=atol)
    assert torch.equal(got[1], want[1])


@needs_triton
def test_bad_shapes_are_named() -> None:
    feeds = case(1, 2, 30, 10)
    with pytest.raises(ValueError, match="30 new keys do not fit a cache of capacity 10"):
        tk.cross_attention(*feeds.values(), ATTRS)
    feeds = case(1, 2, 10, 10)
    feeds["cross_attention_mask"] = feeds["cross_attention_mask"].int()
    with pytest.raises(ValueError, match="cross_attention_mask must be int64"):
        tk.cross_attention(*feeds.values(), ATTRS)


# ---------------------------------------------------------------------------------------------
# The TensorRT plugin, without TensorRT
# ---------------------------------------------------------------------------------------------
def test_trt_plugin_refuses_the_type_stubs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # what tensorrt-stubs gives
    from llamaforge.plugins.cross_attention import trt_plugin

    with pytest.raises(trt_plugin.TensorRTUnavailable, match="stubs are not enough"):
        trt_plugin.register()
    assert not trt_plugin.is_registered()


def test_trt_plugin_identity_matches_the_node() -> None:
    from llamaforge.plugins.cross_attention import trt_plugin

    node = single_op_model(ATTRS).graph.node[0]
    assert node.op_type == trt_plugin.PLUGIN_NAME and trt_plugin.PLUGIN_ID == "llamaforge::CrossAttention"
    values = {a.name: a.s.decode() for a in node.attribute if a.name.startswith("plugin_")}
    assert values == {"plugin_namespace": "llamaforge", "plugin_version": trt_plugin.QDP_PLUGIN_VERSION}


def test_trt_scalar_args_are_the_contiguous_strides() -> None:
    from llamaforge.plugins.cross_attention import trt_plugin

    b, s, n, c, t = 3, 5, 10, 20, 4
    feeds = case(b, s, n, c)
    q, k, cache = feeds["query"], feeds["key"], feeds["past_key"]
    mask = torch.empty(b, s, t, dtype=torch.int64)
    expected = [s, n, c, t, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(0), k.stride(1),
                cache.stride(0), cache.stride(1), cache.stride(2), mask.stride(0), mask.stride(1), q.stride(0), q.stride(1)]
    assert trt_plugin.scalar_args(s, n, c, t, ATTRS) == expected
    if tk is not None:
        assert len(expected) == len(tk.CROSS_SCALAR_ARGS)
        assert list(tk.CROSS_INPUT_ARGS) == tk._cross_attention_kernel.arg_names[:6]


AOT_SCRIPT = r"""
import inspect, json, re, subprocess, tempfile, types
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from llamaforge.plugins.cross_attention import trt_plugin, triton_kernels as tk
from llamaforge.plugins.cross_attention.schema import CrossAttentionAttrs

target = GPUTarget("cuda", 90, 32)
real_compile = tk.compile_cross_kernel
tk.compile_cross_kernel = lambda attrs, dtype, config, target_=None: real_compile(attrs, dtype, config, target=target)

class Desc:
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

attrs = CrossAttentionAttrs(32, 8, 128, 1601)
B, S, N, C, T = 2, 7, 6404, 6404, 4
descs = [Desc((B, S, 32 * 128), "bf16"), Desc((B, N, 8 * 128), "bf16"), Desc((B, N, 8 * 128), "bf16"),
         Desc((B, 8, C, 128), "bf16"), Desc((B, 8, C, 128), "bf16"), Desc((B, S, T), "int64")]
values = [attrs.num_heads, attrs.num_kv_heads, attrs.head_dim, attrs.tokens_per_tile, attrs.scale]
outs = registered["register"][1](*descs, *values)
combos = registered["autotune"][1](*descs, outs)
name, ptx, launch, extra = registered["aot_impl"][1](*descs, *values, outs, 1)
ptx = ptx.decode()
params = re.search(r"\.entry\s+\w+\s*\((.*?)\)", ptx, re.S).group(1).count(".param")
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
}))
"""


@needs_triton
def test_trt_aot_impl_compiles_ptx_that_ptxas_accepts() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", AOT_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    plugin_id = "llamaforge::CrossAttention"
    assert info["ids"] == {"register": plugin_id, "autotune": plugin_id, "aot_impl": plugin_id}
    attr_names = ["num_heads", "num_kv_heads", "head_dim", "tokens_per_tile", "scale"]
    assert info["register_params"] == list(INPUTS) + attr_names
    assert info["aot_params"] == list(INPUTS) + attr_names + ["outputs", "tactic"]
    assert info["outputs"] == [[[2, 7, 4096], "bf16"], [[2, 8, 6404, 128], "bf16"], [[2, 8, 6404, 128], "bf16"]]
    assert len(info["outputs"]) == len(OUTPUTS)
    assert [c[2] for c in info["combos"]] == [list(tk.FP16_TACTICS), list(tk.FP32_TACTICS)]
    assert all(len(c[0].split(",")) == len(INPUTS) + len(OUTPUTS) and "INT64" in c[0] for c in info["combos"])
    config = tk.CROSS_CONFIGS[1]
    assert info["name"] == "_cross_attention_kernel"
    assert info["ptx_params"] == len(INPUTS) + len(tk.CROSS_SCALAR_ARGS) + len(OUTPUTS)
    assert info["launch"]["grid_x"] == -(-7 * 4 // config.block_m) and info["launch"]["grid_y"] == 2 * 8
    assert info["extra"][:4] == [7, 6404, 6404, 4]
    assert info["ptxas"][0] == 0, info["ptxas"][1]
