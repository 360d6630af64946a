"""OpenAI Triton kernel for `llamaforge::CrossAttention` (see `schema.py` for the op contract).

`_cross_attention_kernel` is the whole op in one launch (what the TensorRT AOT plugin runs,
`trt_plugin.py`): flash attention with an online softmax over the cross cache, tiled over keys,
grouped-query aware (query rows packed as (token, head-in-group) pairs, so one program serves every
query head of a KV head and each K/V tile is loaded once per group), no RoPE and no causal order.

* Keys and values: cache position c < new comes from the `key`/`value` inputs (the image states'
  projections, written at the prefill), c >= new from `past_*`; the program holding a KV head's
  first query tile writes every position of `present_*` as it streams them (no second pass).
* Mask: position c belongs to tile c // tokens_per_tile; row s sees c where
  `cross_attention_mask[b, s, tile] == 1`, and a row that may see no tile sees every position
  (transformers' full-text-row rule). Each program first reduces its rows' mask to that flag.
* Arithmetic: the softmax and the accumulator are float32; the scores are scaled in log2 units
  (exp2); float32 activations use IEEE (not TF32) dot products, 16-bit ones their own type with
  float32 accumulation. The reference (`reference.py`) computes in float32 throughout.

The device helpers (`_dot`, `_softmax_update`) and the tile configurations are the attention op's
(`plugins/attention/triton_kernels.py`). The wrapper takes and returns torch tensors; on CPU it runs
under Triton's interpreter, which must be switched on before the kernel modules are imported
(`TRITON_INTERPRET=1`, and kept on); on CUDA it launches the compiled kernel.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from llamaforge.plugins.attention.triton_kernels import (
    INTERPRETER_CONFIG,
    LOG2E,
    TORCH_TO_TRITON,
    KernelConfig,
    _check_device,
    _dot,
    _softmax_update,
    dot_precision,
    interpreting,
)
from llamaforge.plugins.cross_attention.schema import CrossAttentionAttrs

# Tactics the TensorRT plugin offers its autotuner, and the GPU wrapper's choices.
CROSS_CONFIGS: dict[int, KernelConfig] = {
    1: KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    2: KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    3: KernelConfig(block_m=16, block_n=64, num_warps=4, num_stages=3),  # decode-shaped: rows = group
    4: KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),  # float32 (IEEE dots, 2x the smem)
}
FP16_TACTICS = (1, 2, 3)
FP32_TACTICS = (4,)
BLOCK_T = 16  # mask tiles read per step of the "sees any tile" reduction


@triton.jit
def _cross_attention_kernel(
    # TensorRT AOT calling convention: input pointers, then int32 scalars, then output pointers
    Q: tl.tensor, K: tl.tensor, V: tl.tensor, PastK: tl.tensor, PastV: tl.tensor, Mask: tl.tensor,
    seq_len: tl.tensor, new: tl.tensor, capacity: tl.tensor, num_tiles: tl.tensor,
    stride_qb: tl.tensor, stride_qs: tl.tensor, stride_kb: tl.tensor, stride_ks: tl.tensor, stride_vb: tl.tensor,
    stride_vs: tl.tensor, stride_cb: tl.tensor, stride_ch: tl.tensor, stride_cc: tl.tensor,
    stride_mb: tl.tensor, stride_ms: tl.tensor, stride_ob: tl.tensor, stride_os: tl.tensor,
    Out: tl.tensor, PresentK: tl.tensor, PresentV: tl.tensor,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, TOKENS_PER_TILE: tl.constexpr,
    QK_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
) -> None:
    """Grid: (cdiv(seq_len * GROUP, BLOCK_M), batch * NUM_KV_HEADS). Row r of a program's tile is
    token r // GROUP of query head kv_head * GROUP + r % GROUP. The head stride inside a token is
    HEAD_DIM and the innermost stride is 1 for every tensor; present_* share past_*'s strides."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_KV_HEADS).to(tl.int64)
    kvh = pid_bh % NUM_KV_HEADS

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    s_row = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = s_row < seq_len
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_rows = Q + b * stride_qb + s_row[:, None].to(tl.int64) * stride_qs + head[:, None] * HEAD_DIM
    q = tl.load(q_rows + offs_d[None, :], mask=q_mask, other=0.0)

    # Rows that may see no tile see every cache position.
    m_rows = Mask + b * stride_mb + s_row.to(tl.int64) * stride_ms
    sees_a_tile = tl.zeros([BLOCK_M], dtype=tl.int32)
    for t0 in range(0, num_tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        allowed = tl.load(m_rows[:, None] + t[None, :], mask=row_ok[:, None] & (t < num_tiles)[None, :], other=0)
        sees_a_tile = tl.maximum(sees_a_tile, tl.max((allowed == 1).to(tl.int32), 1))

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    cache_off = b * stride_cb + kvh.to(tl.int64) * stride_ch
    k_base = K + b * stride_kb + kvh * HEAD_DIM
    v_base = V + b * stride_vb + kvh * HEAD_DIM
    writer = pid_m == 0
    for start in range(0, capacity, BLOCK_N):
        n = start + offs_n
        n_ok = n < capacity
        from_input = (n < new)[:, None]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        c_ptr = cache_off + n[:, None].to(tl.int64) * stride_cc + offs_d[None, :]
        k_new = tl.load(k_base + n[:, None].to(tl.int64) * stride_ks + offs_d[None, :], mask=kv_mask & from_input,
                        other=0.0)
        v_new = tl.load(v_base + n[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=kv_mask & from_input,
                        other=0.0)
        k_old = tl.load(PastK + c_ptr, mask=kv_mask & ~from_input, other=0.0)
        v_old = tl.load(PastV + c_ptr, mask=kv_mask & ~from_input, other=0.0)
        k = tl.where(from_input, k_new, k_old)
        v = tl.where(from_input, v_new, v_old)
        tl.store(PresentK + c_ptr, k, mask=kv_mask & writer)
        tl.store(PresentV + c_ptr, v, mask=kv_mask & writer)

        tile = n // TOKENS_PER_TILE
        allowed = tl.load(m_rows[:, None] + tile[None, :],
                          mask=row_ok[:, None] & (n_ok & (tile < num_tiles))[None, :], other=0)
        visible = ((allowed == 1) | (sees_a_tile == 0)[:, None]) & n_ok[None, :]
        qk = _dot(q, tl.trans(k), DOT_PRECISION) * QK_SCALE
        qk = tl.where(visible, qk, float("-inf"))
        m_i, l_i, acc = _softmax_update(qk, v, m_i, l_i, acc, DOT_PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # an empty cache: the output is 0
    out = acc / l_safe[:, None]
    o_rows = Out + b * stride_ob + s_row[:, None].to(tl.int64) * stride_os + head[:, None] * HEAD_DIM
    tl.store(o_rows + offs_d[None, :], out.to(Out.dtype.element_ty), mask=q_mask)


CROSS_SCALAR_ARGS = ("seq_len", "new", "capacity", "num_tiles", "stride_qb", "stride_qs", "stride_kb", "stride_ks",
                     "stride_vb", "stride_vs", "stride_cb", "stride_ch", "stride_cc", "stride_mb", "stride_ms",
                     "stride_ob", "stride_os")
CROSS_INPUT_ARGS = ("Q", "K", "V", "PastK", "PastV", "Mask")
CROSS_OUTPUT_ARGS = ("Out", "PresentK", "PresentV")


def cross_constexprs(attrs: CrossAttentionAttrs, dtype: torch.dtype, config: KernelConfig) -> dict[str, Any]:
    """The compile-time parameters of `_cross_attention_kernel` for one op instance."""
    return {
        "NUM_KV_HEADS": attrs.num_kv_heads,
        "GROUP": attrs.group_size,
        "HEAD_DIM": attrs.head_dim,
        "BLOCK_D": triton.next_power_of_2(attrs.head_dim),
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "BLOCK_T": BLOCK_T,
        "TOKENS_PER_TILE": attrs.tokens_per_tile,
        "QK_SCALE": float(attrs.scale) * LOG2E,
        "DOT_PRECISION": dot_precision(dtype),
    }


def compile_cross_kernel(attrs: CrossAttentionAttrs, dtype: torch.dtype, config: KernelConfig,
                         target: Any = None) -> Any:
    """Ahead-of-time compile `_cross_attention_kernel`: what the TensorRT plugin embeds. `target` is
    a `triton.backends.compiler.GPUTarget` (None: the current device). Pointers are declared 16-byte
    aligned (TensorRT's allocations are 256-byte aligned); the scalars carry no divisibility assumption."""
    if interpreting():
        raise RuntimeError("compile_cross_kernel needs the compiled Triton frontend: unset TRITON_INTERPRET")
    ty = TORCH_TO_TRITON[dtype]
    signature = {name: f"*{ty}" for name in CROSS_INPUT_ARGS + CROSS_OUTPUT_ARGS}
    signature["Mask"] = "*i64"
    signature.update({name: "i32" for name in CROSS_SCALAR_ARGS})
    constexprs = cross_constexprs(attrs, dtype, config)
    signature.update({name: "constexpr" for name in constexprs})
    arg_names = _cross_attention_kernel.arg_names
    attrs_ = {(arg_names.index(name),): [["tt.divisibility", 16]] for name in CROSS_INPUT_ARGS + CROSS_OUTPUT_ARGS}
    src = triton.compiler.ASTSource(fn=_cross_attention_kernel, signature=signature, constexprs=constexprs,
                                    attrs=attrs_)
    if target is None:
        target = triton.runtime.driver.active.get_current_target()
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": config.num_warps, "num_stages": config.num_stages})
    return triton.compile(src, target=target, options=options.__dict__)


def default_cross_config(attrs: CrossAttentionAttrs, dtype: torch.dtype, seq_len: int,
                         device: torch.device) -> KernelConfig:
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        return CROSS_CONFIGS[4]
    return CROSS_CONFIGS[3] if seq_len * attrs.group_size <= 16 else CROSS_CONFIGS[1]


def cross_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                    past_value: torch.Tensor, cross_attention_mask: torch.Tensor, attrs: CrossAttentionAttrs, *,
                    config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op; same arguments and results as `reference.cross_attention`: query [B, S, H*D],
    key/value [B, N, KVH*D] (N new keys, N <= C), past_* [B, KVH, C, D] (one dtype: fp32, fp16 or
    bf16), cross_attention_mask int64 [B, S, tiles]."""
    batch, seq, _ = query.shape
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    new, capacity = key.shape[1], past_key.shape[2]
    if query.shape[2] != h * d or key.shape != (batch, new, kvh * d) or value.shape != key.shape:
        raise ValueError(f"query/key/value shapes {tuple(query.shape)}/{tuple(key.shape)}/{tuple(value.shape)} "
                         f"do not match heads {h}/{kvh} x {d}")
    if past_key.shape != (batch, kvh, capacity, d) or past_value.shape != past_key.shape:
        raise ValueError(f"past caches must be [{batch}, {kvh}, capacity, {d}], got {tuple(past_key.shape)}")
    if new > capacity:
        raise ValueError(f"CrossAttention: {new} new keys do not fit a cache of capacity {capacity}")
    if cross_attention_mask.dtype != torch.int64 or cross_attention_mask.shape[:2] != (batch, seq):
        raise ValueError(f"cross_attention_mask must be int64 [{batch}, {seq}, tiles], got "
                         f"{cross_attention_mask.dtype} {tuple(cross_attention_mask.shape)}")
    if len({query.dtype, key.dtype, value.dtype, past_key.dtype, past_value.dtype}) != 1:
        raise TypeError("query, key, value and the caches must share one dtype")
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported activation dtype {query.dtype}")
    _check_device(query, key, value, past_key, past_value, cross_attention_mask)
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    past_key, past_value = past_key.contiguous(), past_value.contiguous()
    mask = cross_attention_mask.contiguous()

    out = torch.empty_like(query)
    present_key, present_value = torch.empty_like(past_key), torch.empty_like(past_value)
    if batch == 0 or seq == 0:  # no program runs: the cache is still written
        present_key.copy_(past_key)
        present_value.copy_(past_value)
        present_key[:, :, :new] = key.view(batch, new, kvh, d).transpose(1, 2)
        present_value[:, :, :new] = value.view(batch, new, kvh, d).transpose(1, 2)
        return out, present_key, present_value
    config = config or default_cross_config(attrs, query.dtype, seq, query.device)
    grid = (triton.cdiv(seq * attrs.group_size, config.block_m), batch * kvh)
    _cross_attention_kernel[grid](
        query, key, value, past_key, past_value, mask,
        seq, new, capacity, mask.shape[2],
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        past_key.stride(0), past_key.stride(1), past_key.stride(2), mask.stride(0), mask.stride(1),
        out.stride(0), out.stride(1),
        out, present_key, present_value,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **cross_constexprs(attrs, query.dtype, config),
    )
    return out, present_key, present_value
