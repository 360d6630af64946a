"""OpenAI Triton kernels for `llamaforge::LlamaAttention` (see `schema.py` for the op contract).

Two kernel families, both grouped-query aware and both with RoPE fused:

* `_attention_kernel` -- the op (prefill, chunked prefill, and decode through the op's
  `bhcd-slots` cache): causal flash attention with an online softmax, tiled over keys, causal by
  absolute position `past_lengths[b] + s`. Query rows are packed as (token, head-in-group) pairs,
  so one program serves all query heads of a KV head and each K/V tile is loaded once per group.
  Two modes:
  - FUSED (one launch; what the TensorRT AOT plugin runs, `trt_plugin.py`): keys come from
    `past_key` for positions `< past_lengths[b]` and straight from the `key` input for the new
    tokens, rotated in registers -- never from a buffer this launch writes. The same launch writes
    `present_*`: the past prefix is copied by the tile-0 program as it streams it (no extra
    reads), each new token by the program holding its first query row.
  - two-phase (`_cache_write_kernel`, then the attention over `present_*`): every key is rotated
    once instead of once per query tile, so long prefills spend their time in the matmuls.
  `prefill_attention` picks FUSED when one query tile covers a KV head's rows (decode, short
  chunks), where the two are the same work.

* `_decode_split_kernel` + `_decode_reduce_kernel` -- flash-decoding for one new token per
  sequence over a cache that already holds it: the KV sequence is split across programs
  (split-K), each program handles one KV head and all query heads of its group, and a second
  kernel merges the partial softmaxes. The cache is the op's contiguous `[B, kv_heads, capacity, D]`
  or the runtime's paged pool `[num_blocks, kv_heads, block_size, D]` + `block_tables
  [B, max_blocks]`, in the activation dtype or FP8 (e4m3) with separate per-tensor K and V scales.

Arithmetic follows `reference.py`: RoPE angles are float32 `position * inv_freq` with `inv_freq`
taken bit-exactly from `reference.rope_inv_freq` (baked into the kernel as a constexpr tuple, so
the compiled kernel needs no extra input); sin/cos of that angle are within ~1 ulp (`_sincos`);
cos/sin and the rotated q/k are rounded to the activation dtype like the reference does; the
softmax and accumulators are float32, and float32 activations use IEEE (not TF32) dot products.
FP8 scales are applied to the float32 scores and output (`(q . k_fp8) * k_scale ==
q . (k_fp8.to(float32) * k_scale)`): the reference's dequantization without a pass over the tile.

The wrappers take and return torch tensors. On CPU they run under Triton's interpreter, which
must be switched on before this module is imported (`TRITON_INTERPRET=1`, and kept on); on CUDA
they launch compiled kernels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from llamaforge.plugins.attention.reference import rope_inv_freq
from llamaforge.plugins.attention.schema import AttentionAttrs

LOG2E = 1.4426950408889634

TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float8_e4m3fn: "fp8e4nv",
}


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------
# Inside a @triton.jit function every value that is not a constexpr (pointer, scalar or block) is a
# `tl.tensor`, which is what the untyped parameters are annotated as; Triton reads only `tl.constexpr`
# annotations (and type strings such as "i32"), so `tl.tensor` leaves specialization unchanged.
@triton.jit
def _rope_columns(offs_d: tl.tensor, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INV_FREQ: tl.constexpr,
                  INTERLEAVED: tl.constexpr) -> tuple[tl.tensor, tl.tensor, tl.tensor]:
    """Per column d: its pair's inv_freq, the partner column, and the sign of the partner term.

    rotate-half: out[d] = x[d] cos - x[d + D/2] sin (d < D/2), x[d] cos + x[d - D/2] sin (d >= D/2)
    interleaved: out[d] = x[d] cos - x[d + 1] sin (d even),   x[d] cos + x[d - 1] sin (d odd)
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    if INTERLEAVED:
        pair = offs_d // 2
        partner = offs_d ^ 1
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    else:
        pair = offs_d % HALF
        partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
        sign = tl.where(offs_d < HALF, -1.0, 1.0)
    freq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(HALF):
        freq = tl.where(pair == i, INV_FREQ[i], freq)
    return freq, partner, sign


@triton.jit
def _sincos(x: tl.tensor) -> tuple[tl.tensor, tl.tensor]:
    """sin and cos of float32 x to about 1 ulp, branch-free: the quadrant and the remainder come from
    a float64 reduction (exact enough for any RoPE angle), then Cephes' minimax polynomials on
    [-pi/4, pi/4]. libdevice's sinf/cosf inline a Payne-Hanek slow path per element, which made
    the fused kernel's PTX ~1.7 MB and its key loop slow."""
    k = tl.floor(x * 0.6366197723675814 + 0.5)
    r = (x.to(tl.float64) - k.to(tl.float64) * tl.full([], 1.5707963267948966, tl.float64)).to(tl.float32)
    z = r * r
    s = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4))
    c = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5))
    q = k.to(tl.int32) & 3
    sin = tl.where(q == 0, s, tl.where(q == 1, c, tl.where(q == 2, -s, -c)))
    cos = tl.where(q == 0, c, tl.where(q == 1, -s, tl.where(q == 2, -c, s)))
    return sin, cos


@triton.jit
def _rotate(x: tl.tensor, x_partner: tl.tensor, pos: tl.tensor, freq: tl.tensor, sign: tl.tensor,
            OUT_DTYPE: tl.constexpr) -> tl.tensor:
    """RoPE of rows x [R, D] (float32) at positions pos [R]; result rounded to OUT_DTYPE."""
    angle = pos.to(tl.float32)[:, None] * freq[None, :]
    sin, cos = _sincos(angle)
    cos = cos.to(OUT_DTYPE).to(tl.float32)  # the reference rounds cos/sin to the activation dtype
    sin = sin.to(OUT_DTYPE).to(tl.float32)
    return (x * cos + sign[None, :] * (x_partner * sin)).to(OUT_DTYPE)


@triton.jit
def _dot(a: tl.tensor, b: tl.tensor, DOT_PRECISION: tl.constexpr) -> tl.tensor:
    if DOT_PRECISION == "upcast":
        # Interpreter only: Triton 3.7's interpreter multiplies bf16 operands as their raw uint16
        # bits. Widening bf16 to fp32 is exact, and the product is accumulated in fp32 either way.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _softmax_update(qk: tl.tensor, v: tl.tensor, m_i: tl.tensor, l_i: tl.tensor, acc: tl.tensor,
                    DOT_PRECISION: tl.constexpr) -> tuple[tl.tensor, tl.tensor, tl.tensor]:
    """One online-softmax step; qk [M, N] already in log2 units, masked entries -inf."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(qk - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION)
    return m_new, l_i, acc


# ----------------------------------------------------------------------------------------------
# The op kernel: RoPE + cache write + causal GQA flash attention
# ----------------------------------------------------------------------------------------------
@triton.jit
def _new_token_tile(q: tl.tensor, s_row: tl.tensor, past: tl.tensor, start: tl.tensor, n_end: tl.tensor,
                    w_lo: tl.tensor, w_hi: tl.tensor, offs_n: tl.tensor, offs_d: tl.tensor, d_ok: tl.tensor,
                    freq: tl.tensor, partner: tl.tensor, sign: tl.tensor,
                    k_base: tl.tensor, v_base: tl.tensor, stride_ks: tl.tensor, stride_vs: tl.tensor,
                    PresentK: tl.tensor, PresentV: tl.tensor, cache_off: tl.tensor, stride_cc: tl.tensor,
                    m_i: tl.tensor, l_i: tl.tensor, acc: tl.tensor,
                    QK_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr, DIAGONAL: tl.constexpr,
                    ) -> tuple[tl.tensor, tl.tensor, tl.tensor]:
    """Fused mode: a tile of new keys read from the key/value inputs and rotated in registers."""
    j = start + offs_n  # new-token index of each key
    j_ok = j < n_end
    kv_mask = j_ok[:, None] & d_ok[None, :]
    k_rows = k_base + j[:, None].to(tl.int64) * stride_ks
    k = tl.load(k_rows + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
    kp = tl.load(k_rows + partner[None, :], mask=kv_mask, other=0.0).to(tl.float32)
    k = _rotate(k, kp, past + j, freq, sign, q.dtype)
    v = tl.load(v_base + j[:, None].to(tl.int64) * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    qk = _dot(q, tl.trans(k), DOT_PRECISION) * QK_SCALE
    if DIAGONAL:
        # Causal by absolute position: new key j is visible to new token s iff j <= s. The tokens
        # whose first query row sits in this tile are written to present_* here.
        visible = (j[None, :] <= s_row[:, None]) & j_ok[None, :]
        w_mask = kv_mask & ((j >= w_lo) & (j < w_hi))[:, None]
        c_ptr = cache_off + (past + j)[:, None].to(tl.int64) * stride_cc + offs_d[None, :]
        tl.store(PresentK + c_ptr, k.to(PresentK.dtype.element_ty), mask=w_mask)
        tl.store(PresentV + c_ptr, v.to(PresentV.dtype.element_ty), mask=w_mask)
    else:
        visible = j_ok[None, :]  # strictly before every token of this tile
    qk = tl.where(visible, qk, float("-inf"))
    return _softmax_update(qk, v, m_i, l_i, acc, DOT_PRECISION)


@triton.jit
def _cache_tile(q: tl.tensor, CacheK: tl.tensor, CacheV: tl.tensor, cache_off: tl.tensor, stride_cc: tl.tensor,
                start: tl.tensor, key_end: tl.tensor, row_pos: tl.tensor, offs_n: tl.tensor, offs_d: tl.tensor,
                d_ok: tl.tensor,
                m_i: tl.tensor, l_i: tl.tensor, acc: tl.tensor, QK_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                MASKED: tl.constexpr) -> tuple[tl.tensor, tl.tensor, tl.tensor]:
    """A tile of keys at cache positions [start, start + BLOCK_N) that are already rotated.
    MASKED: keys >= key_end are absent and key p is visible to row r iff p <= row_pos[r]."""
    n = start + offs_n
    c_ptr = cache_off + n[:, None].to(tl.int64) * stride_cc + offs_d[None, :]
    if MASKED:
        kv_mask = (n < key_end)[:, None] & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    k = tl.load(CacheK + c_ptr, mask=kv_mask, other=0.0)
    v = tl.load(CacheV + c_ptr, mask=kv_mask, other=0.0)
    qk = _dot(q, tl.trans(k), DOT_PRECISION) * QK_SCALE
    if MASKED:
        qk = tl.where((n[None, :] < key_end) & (n[None, :] <= row_pos[:, None]), qk, float("-inf"))
    return _softmax_update(qk, v, m_i, l_i, acc, DOT_PRECISION)


@triton.jit
def _attention_kernel(
    # TensorRT AOT calling convention: input pointers, then int32 scalars, then output pointers
    Q: tl.tensor, K: tl.tensor, V: tl.tensor, PastK: tl.tensor, PastV: tl.tensor, PastLen: tl.tensor,
    seq_len: tl.tensor, capacity: tl.tensor,
    stride_qb: tl.tensor, stride_qs: tl.tensor, stride_kb: tl.tensor, stride_ks: tl.tensor, stride_vb: tl.tensor,
    stride_vs: tl.tensor,
    stride_cb: tl.tensor, stride_ch: tl.tensor, stride_cc: tl.tensor,
    stride_ob: tl.tensor, stride_os: tl.tensor,
    Out: tl.tensor, PresentK: tl.tensor, PresentV: tl.tensor,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, QK_SCALE: tl.constexpr, INV_FREQ: tl.constexpr,
    INTERLEAVED: tl.constexpr, DOT_PRECISION: tl.constexpr, FUSED: tl.constexpr,
) -> None:
    """Grid: (cdiv(seq_len * GROUP, BLOCK_M), batch * NUM_KV_HEADS). Row r of a program's tile is
    token r // GROUP of query head kv_head * GROUP + r % GROUP. The head stride inside a token is
    HEAD_DIM and the innermost stride is 1 for every tensor; present_* share past_*'s strides.

    FUSED: the whole op in this launch (keys from past_* and from the key/value inputs, present_*
    written here). Otherwise `_cache_write_kernel` has filled present_* already and every key is
    read from there: no RoPE in the key loop, which is what makes long prefills fast."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_KV_HEADS).to(tl.int64)
    kvh = pid_bh % NUM_KV_HEADS
    past = tl.load(PastLen + b)
    act_dtype = Q.dtype.element_ty

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    freq, partner, sign = _rope_columns(offs_d, HEAD_DIM, BLOCK_D, INV_FREQ, INTERLEAVED)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    s_row = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = s_row < seq_len
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_rows = Q + b * stride_qb + s_row[:, None].to(tl.int64) * stride_qs + head[:, None] * HEAD_DIM
    q = tl.load(q_rows + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    qp = tl.load(q_rows + partner[None, :], mask=q_mask, other=0.0).to(tl.float32)
    q = _rotate(q, qp, past + s_row, freq, sign, act_dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    cache_off = b * stride_cb + kvh.to(tl.int64) * stride_ch
    s_lo = (pid_m * BLOCK_M) // GROUP  # the tile's tokens are [s_lo, s_hi)
    s_hi = tl.minimum(((pid_m + 1) * BLOCK_M - 1) // GROUP + 1, seq_len)

    if FUSED:
        # 1. Cached keys: positions < past are before every new token, so all are visible.
        #    The tile-0 program copies them into present_* on the way.
        past_end = tl.minimum(past, capacity)
        copy_past = pid_m == 0
        for start in range(0, past_end, BLOCK_N):
            n = start + offs_n
            n_ok = n < past_end
            kv_mask = n_ok[:, None] & d_ok[None, :]
            c_ptr = cache_off + n[:, None].to(tl.int64) * stride_cc + offs_d[None, :]
            k = tl.load(PastK + c_ptr, mask=kv_mask, other=0.0)
            v = tl.load(PastV + c_ptr, mask=kv_mask, other=0.0)
            tl.store(PresentK + c_ptr, k, mask=kv_mask & copy_past)
            tl.store(PresentV + c_ptr, v, mask=kv_mask & copy_past)
            qk = _dot(q, tl.trans(k), DOT_PRECISION) * QK_SCALE
            qk = tl.where(n_ok[None, :], qk, float("-inf"))
            m_i, l_i, acc = _softmax_update(qk, v, m_i, l_i, acc, DOT_PRECISION)

        # 2. New tokens, from the key/value inputs, rotated here. New tokens that would land past
        #    `capacity` are dropped, as in the reference.
        n_end = tl.minimum(s_hi, capacity - past)
        w_lo = (pid_m * BLOCK_M + GROUP - 1) // GROUP  # tokens whose first query row is in this tile
        w_hi = ((pid_m + 1) * BLOCK_M + GROUP - 1) // GROUP
        k_base = K + b * stride_kb + kvh * HEAD_DIM
        v_base = V + b * stride_vb + kvh * HEAD_DIM
        diag_start = tl.minimum((s_lo // BLOCK_N) * BLOCK_N, n_end)
        for start in range(0, diag_start, BLOCK_N):  # fully visible: no causal mask, nothing to write
            m_i, l_i, acc = _new_token_tile(
                q, s_row, past, start, n_end, w_lo, w_hi, offs_n, offs_d, d_ok, freq, partner, sign,
                k_base, v_base, stride_ks, stride_vs, PresentK, PresentV, cache_off, stride_cc,
                m_i, l_i, acc, QK_SCALE, DOT_PRECISION, False)
        for start in range(diag_start, n_end, BLOCK_N):  # the diagonal band: causal mask + writes
            m_i, l_i, acc = _new_token_tile(
                q, s_row, past, start, n_end, w_lo, w_hi, offs_n, offs_d, d_ok, freq, partner, sign,
                k_base, v_base, stride_ks, stride_vs, PresentK, PresentV, cache_off, stride_cc,
                m_i, l_i, acc, QK_SCALE, DOT_PRECISION, True)
    else:
        # Keys before the tile's first token are visible to all its rows: whole tiles unmasked.
        key_end = tl.minimum(past + s_hi, capacity)
        full_end = (tl.minimum(past + s_lo, capacity) // BLOCK_N) * BLOCK_N
        row_pos = past + s_row
        for start in range(0, full_end, BLOCK_N):
            m_i, l_i, acc = _cache_tile(q, PresentK, PresentV, cache_off, stride_cc, start, key_end, row_pos,
                                        offs_n, offs_d, d_ok, m_i, l_i, acc, QK_SCALE, DOT_PRECISION, False)
        for start in range(full_end, key_end, BLOCK_N):
            m_i, l_i, acc = _cache_tile(q, PresentK, PresentV, cache_off, stride_cc, start, key_end, row_pos,
                                        offs_n, offs_d, d_ok, m_i, l_i, acc, QK_SCALE, DOT_PRECISION, True)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_rows = Out + b * stride_ob + s_row[:, None].to(tl.int64) * stride_os + head[:, None] * HEAD_DIM
    tl.store(o_rows + offs_d[None, :], out.to(Out.dtype.element_ty), mask=q_mask)


@triton.jit
def _cache_write_kernel(
    K: tl.tensor, V: tl.tensor, PastK: tl.tensor, PastV: tl.tensor, PastLen: tl.tensor,
    seq_len: tl.tensor, capacity: tl.tensor, stride_kb: tl.tensor, stride_ks: tl.tensor, stride_vb: tl.tensor,
    stride_vs: tl.tensor, stride_cb: tl.tensor, stride_ch: tl.tensor, stride_cc: tl.tensor,
    PresentK: tl.tensor, PresentV: tl.tensor,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
    INV_FREQ: tl.constexpr, INTERLEAVED: tl.constexpr,
) -> None:
    """Grid: (cdiv(capacity, BLOCK_P), batch * NUM_KV_HEADS). present_*[p] = past_*[p] for
    p < past, the rotated key / the value of new token p - past for past <= p < past + seq_len,
    p < capacity. Later positions are left as they are (the contract leaves them unspecified)."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_KV_HEADS).to(tl.int64)
    kvh = pid_bh % NUM_KV_HEADS
    past = tl.load(PastLen + b)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    end = tl.minimum(past + seq_len, capacity)
    old = (p < tl.minimum(past, capacity))[:, None] & d_ok[None, :]
    new = ((p >= past) & (p < end))[:, None] & d_ok[None, :]
    c_ptr = b * stride_cb + kvh.to(tl.int64) * stride_ch + p[:, None].to(tl.int64) * stride_cc + offs_d[None, :]
    k_old = tl.load(PastK + c_ptr, mask=old, other=0.0)
    v_old = tl.load(PastV + c_ptr, mask=old, other=0.0)
    j = (p - past).to(tl.int64)[:, None]
    k_rows = K + b * stride_kb + j * stride_ks + kvh * HEAD_DIM
    freq, partner, sign = _rope_columns(offs_d, HEAD_DIM, BLOCK_D, INV_FREQ, INTERLEAVED)
    k_new = tl.load(k_rows + offs_d[None, :], mask=new, other=0.0).to(tl.float32)
    kp_new = tl.load(k_rows + partner[None, :], mask=new, other=0.0).to(tl.float32)
    k_new = _rotate(k_new, kp_new, p, freq, sign, K.dtype.element_ty)
    v_new = tl.load(V + b * stride_vb + j * stride_vs + kvh * HEAD_DIM + offs_d[None, :], mask=new, other=0.0)
    tl.store(PresentK + c_ptr, tl.where(new, k_new.to(PresentK.dtype.element_ty), k_old), mask=old | new)
    tl.store(PresentV + c_ptr, tl.where(new, v_new.to(PresentV.dtype.element_ty), v_old), mask=old | new)


# ----------------------------------------------------------------------------------------------
# Flash-decoding: split-K over the cache, then a merge
# ----------------------------------------------------------------------------------------------
@triton.jit
def _decode_split_kernel(
    Q: tl.tensor, KCache: tl.tensor, VCache: tl.tensor, SeqLens: tl.tensor, BlockTables: tl.tensor,
    KScale: tl.tensor, VScale: tl.tensor,
    MidO: tl.tensor, MidLse: tl.tensor,
    stride_qb: tl.tensor, stride_kb: tl.tensor, stride_kh: tl.tensor, stride_kc: tl.tensor, stride_vb: tl.tensor,
    stride_vh: tl.tensor, stride_vc: tl.tensor, stride_bt: tl.tensor,
    split_size: tl.tensor, num_splits: tl.tensor,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, HAS_SCALES: tl.constexpr,
    APPLY_ROPE: tl.constexpr, INV_FREQ: tl.constexpr, INTERLEAVED: tl.constexpr,
    QK_SCALE: tl.constexpr, DOT_PRECISION: tl.constexpr,
) -> None:
    """Grid: (num_splits, batch * NUM_KV_HEADS). Program (split, b, kv_head) attends the rows
    GROUP query heads of token seq_lens[b] - 1 over cache positions
    [split * split_size, min(seq_lens[b], (split + 1) * split_size)) and writes the normalized
    partial output and its log2-sum-exp to MidO [B, H, num_splits, D] / MidLse [B, H, num_splits]."""
    pid_split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_KV_HEADS).to(tl.int64)
    kvh = pid_bh % NUM_KV_HEADS
    seq_len = tl.load(SeqLens + b)
    act_dtype = Q.dtype.element_ty

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    head = kvh * GROUP + g
    q_mask = g_ok[:, None] & d_ok[None, :]
    q_rows = Q + b * stride_qb + head[:, None] * HEAD_DIM
    q = tl.load(q_rows + offs_d[None, :], mask=q_mask, other=0.0)
    if APPLY_ROPE:
        freq, partner, sign = _rope_columns(offs_d, HEAD_DIM, BLOCK_D, INV_FREQ, INTERLEAVED)
        qp = tl.load(q_rows + partner[None, :], mask=q_mask, other=0.0).to(tl.float32)
        pos = tl.zeros([BLOCK_G], dtype=tl.int32) + (seq_len - 1)
        q = _rotate(q.to(tl.float32), qp, pos, freq, sign, act_dtype)

    if HAS_SCALES:
        k_scale = tl.load(KScale)
        v_scale = tl.load(VScale)
    else:
        k_scale = 1.0
        v_scale = 1.0
    qk_scale = QK_SCALE * k_scale

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    start = pid_split * split_size
    end = tl.minimum(seq_len, start + split_size)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_ok = n < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        if PAGED:
            block = tl.load(BlockTables + b * stride_bt + n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
            slot = (n % PAGE_SIZE).to(tl.int64)
            k_off = block * stride_kb + slot * stride_kc
            v_off = block * stride_vb + slot * stride_vc
        else:
            k_off = b * stride_kb + n.to(tl.int64) * stride_kc
            v_off = b * stride_vb + n.to(tl.int64) * stride_vc
        k = tl.load(KCache + k_off[:, None] + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(VCache + v_off[:, None] + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
        # FP8 -> activation dtype is exact (e4m3 fits fp16/bf16/fp32); the scales go on the scores/output.
        qk = _dot(q, tl.trans(k.to(act_dtype)), DOT_PRECISION) * qk_scale
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_i, l_i, acc = _softmax_update(qk, v.to(act_dtype), m_i, l_i, acc, DOT_PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc * (v_scale / l_safe)[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    mid = (b * (NUM_KV_HEADS * GROUP) + head).to(tl.int64) * num_splits + pid_split
    tl.store(MidO + mid[:, None] * HEAD_DIM + offs_d[None, :], out, mask=q_mask)
    tl.store(MidLse + mid, lse, mask=g_ok)


@triton.jit
def _decode_reduce_kernel(MidO: tl.tensor, MidLse: tl.tensor, Out: tl.tensor, num_splits: tl.tensor,
                          stride_ob: tl.tensor,
                          NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_S: tl.constexpr) -> None:
    """Grid: (batch * NUM_HEADS,). Merges the partial softmaxes of one (sequence, query head)."""
    pid = tl.program_id(0)
    b = pid // NUM_HEADS
    h = pid % NUM_HEADS
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    base = pid.to(tl.int64) * num_splits
    lse = tl.load(MidLse + base + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_use)
    o = tl.load(MidO + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(den == 0.0, 1.0, den)
    tl.store(Out + b.to(tl.int64) * stride_ob + h * HEAD_DIM + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Tactics the TensorRT plugin offers its autotuner, and the GPU wrapper's defaults.
OP_CONFIGS: dict[int, KernelConfig] = {
    1: KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    2: KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    3: KernelConfig(block_m=128, block_n=32, num_warps=4, num_stages=3),
    4: KernelConfig(block_m=16, block_n=64, num_warps=4, num_stages=3),  # decode-shaped: rows = group
    5: KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=2),  # float32 (IEEE dots, 2x the smem)
}
FP16_TACTICS = (1, 2, 3, 4)
FP32_TACTICS = (5,)
INTERPRETER_CONFIG = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)


def interpreting() -> bool:
    """True when this module's kernels were built for Triton's CPU interpreter."""
    return not isinstance(_attention_kernel, triton.runtime.jit.JITFunction)


def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {t.device} and {device}")
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {device}); for CPU tensors set TRITON_INTERPRET=1 "
            "before plugins.attention.triton_kernels is first imported")


def require_dense_attrs(attrs: AttentionAttrs) -> None:
    """These kernels implement the dense-LLaMA op; Llama 4's flags are not in them yet."""
    flags = attrs.non_default_llama4_flags()
    if flags:
        raise NotImplementedError(
            f"LlamaAttention attribute(s) {', '.join(flags)} are not implemented by the OpenAI Triton kernels "
            "(Llama 4 NoPE / QK norm / chunked attention); use the ONNX Runtime lowering")
    if attrs.kv_cache_quant != "none":
        raise NotImplementedError(
            f"LlamaAttention kv_cache_quant={attrs.kv_cache_quant!r} (KV_CACHE=fp8) is not wired into the op's "
            "OpenAI Triton kernels yet; use the ONNX Runtime lowering")


def inv_freq_constexpr(attrs: AttentionAttrs) -> tuple[float, ...]:
    """`reference.rope_inv_freq` as Python floats: each is the float32 value exactly."""
    return tuple(float(x) for x in rope_inv_freq(attrs).tolist())


def dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16 and interpreting():
        return "upcast"  # see _dot
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


def op_constexprs(attrs: AttentionAttrs, dtype: torch.dtype, config: KernelConfig, fused: bool) -> dict[str, Any]:
    """The compile-time parameters of `_attention_kernel` for one op instance."""
    return {
        "FUSED": fused,
        "NUM_KV_HEADS": attrs.num_kv_heads,
        "GROUP": attrs.group_size,
        "HEAD_DIM": attrs.head_dim,
        "BLOCK_D": triton.next_power_of_2(attrs.head_dim),
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "QK_SCALE": float(attrs.scale) * LOG2E,
        "INV_FREQ": inv_freq_constexpr(attrs),
        "INTERLEAVED": bool(attrs.rope_interleaved),
        "DOT_PRECISION": dot_precision(dtype),
    }


OP_SCALAR_ARGS = ("seq_len", "capacity", "stride_qb", "stride_qs", "stride_kb", "stride_ks", "stride_vb",
                  "stride_vs", "stride_cb", "stride_ch", "stride_cc", "stride_ob", "stride_os")
OP_INPUT_ARGS = ("Q", "K", "V", "PastK", "PastV", "PastLen")
OP_OUTPUT_ARGS = ("Out", "PresentK", "PresentV")


def compile_op_kernel(attrs: AttentionAttrs, dtype: torch.dtype, config: KernelConfig,
                      target: Any = None) -> Any:
    """Ahead-of-time compile the single-launch (FUSED) `_attention_kernel`: what the TensorRT
    plugin embeds, since an AOT plugin runs exactly one kernel.

    `target` is a `triton.backends.compiler.GPUTarget`; None means the current device. Pointers
    are declared 16-byte aligned (TensorRT's allocations are 256-byte aligned); the int32 scalars
    carry no divisibility assumption, so any runtime shape is valid.
    """
    require_dense_attrs(attrs)
    if interpreting():
        raise RuntimeError("compile_op_kernel needs the compiled Triton frontend: unset TRITON_INTERPRET")
    ty = TORCH_TO_TRITON[dtype]
    signature = {name: f"*{ty}" for name in OP_INPUT_ARGS + OP_OUTPUT_ARGS}
    signature["PastLen"] = "*i32"
    signature.update({name: "i32" for name in OP_SCALAR_ARGS})
    constexprs = op_constexprs(attrs, dtype, config, fused=True)
    signature.update({name: "constexpr" for name in constexprs})
    arg_names = _attention_kernel.arg_names
    attrs_ = {(arg_names.index(name),): [["tt.divisibility", 16]] for name in OP_INPUT_ARGS + OP_OUTPUT_ARGS}
    src = triton.compiler.ASTSource(fn=_attention_kernel, signature=signature, constexprs=constexprs, attrs=attrs_)
    if target is None:
        target = triton.runtime.driver.active.get_current_target()
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": config.num_warps, "num_stages": config.num_stages})
    return triton.compile(src, target=target, options=options.__dict__)


def default_op_config(attrs: AttentionAttrs, dtype: torch.dtype, seq_len: int, device: torch.device) -> KernelConfig:
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    if dtype == torch.float32:
        return OP_CONFIGS[5]
    if seq_len * attrs.group_size <= 16:
        return OP_CONFIGS[4]
    if attrs.head_dim <= 64:
        return OP_CONFIGS[1]
    return OP_CONFIGS[2]


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    past_lengths: torch.Tensor,
    attrs: AttentionAttrs,
    *,
    config: KernelConfig | None = None,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op; same arguments and results as `reference.llama_attention`.

    query [B, S, H*D], key/value [B, S, KVH*D], past_* [B, KVH, C, D] (all one dtype: fp32, fp16
    or bf16), past_lengths int32 [B]. Returns (output, present_key, present_value); as the contract
    allows, present_* are only defined below past_lengths[b] + S (clipped to C).

    fused=True is one launch (what TensorRT runs); fused=False first writes present_* (RoPE'd
    keys, once per key) and then attends over it, which long prefills want. None picks fused
    exactly when one query tile covers all rows of a KV head (decode and short chunks), where
    nothing is rotated twice.
    """
    require_dense_attrs(attrs)
    batch, seq, _ = query.shape
    h, kvh, d = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim
    capacity = past_key.shape[2]
    if query.shape[2] != h * d or key.shape != (batch, seq, kvh * d) or value.shape != key.shape:
        raise ValueError(f"query/key/value shapes {tuple(query.shape)}/{tuple(key.shape)}/{tuple(value.shape)} "
                         f"do not match heads {h}/{kvh} x {d}")
    if past_key.shape != (batch, kvh, capacity, d) or past_value.shape != past_key.shape:
        raise ValueError(f"past caches must be [{batch}, {kvh}, capacity, {d}], got {tuple(past_key.shape)}")
    if len({query.dtype, key.dtype, value.dtype, past_key.dtype, past_value.dtype}) != 1:
        raise TypeError("query, key, value and the caches must share one dtype")
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported activation dtype {query.dtype}")
    _check_device(query, key, value, past_key, past_value, past_lengths)
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    past_key, past_value = past_key.contiguous(), past_value.contiguous()
    past_lengths = past_lengths.to(torch.int32).contiguous()

    out = torch.empty_like(query)
    present_key, present_value = torch.empty_like(past_key), torch.empty_like(past_value)
    if batch == 0 or seq == 0:
        return out, present_key.copy_(past_key), present_value.copy_(past_value)
    config = config or default_op_config(attrs, query.dtype, seq, query.device)
    m_tiles = triton.cdiv(seq * attrs.group_size, config.block_m)
    if fused is None:
        fused = m_tiles == 1
    block_d = triton.next_power_of_2(d)
    inv_freq = inv_freq_constexpr(attrs)
    if not fused:
        block_p = 16 if interpreting() else max(16, 8192 // block_d)
        _cache_write_kernel[(triton.cdiv(capacity, block_p), batch * kvh)](
            key, value, past_key, past_value, past_lengths,
            seq, capacity, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            past_key.stride(0), past_key.stride(1), past_key.stride(2),
            present_key, present_value,
            NUM_KV_HEADS=kvh, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_P=block_p,
            INV_FREQ=inv_freq, INTERLEAVED=bool(attrs.rope_interleaved), num_warps=4,
        )
    _attention_kernel[(m_tiles, batch * kvh)](
        query, key, value, past_key, past_value, past_lengths,
        seq, capacity,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        past_key.stride(0), past_key.stride(1), past_key.stride(2),
        out.stride(0), out.stride(1),
        out, present_key, present_value,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **op_constexprs(attrs, query.dtype, config, fused),
    )
    return out, present_key, present_value


def _scale_tensor(scale: float | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if scale is None:
        return torch.ones(1, dtype=torch.float32, device=device)
    return torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(1)


@functools.cache
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def default_num_splits(batch_kv_heads: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Enough splits to give every SM about two programs, without splits shorter than 4 tiles."""
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        want = triton.cdiv(2 * sms, max(batch_kv_heads, 1))
    else:
        want = 2
    return max(1, min(want, triton.cdiv(max_len, 4 * block_n)))


def decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    attrs: AttentionAttrs,
    block_tables: torch.Tensor | None = None,
    k_scale: float | torch.Tensor | None = None,
    v_scale: float | torch.Tensor | None = None,
    *,
    apply_rope: bool = True,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Attention of one new token per sequence over a cache that already holds it (flash-decoding).

    q: [B, H*D], [B, 1, H*D] or [B, H, D], the token's projected query; with `apply_rope` it is
    rotated here at position seq_lens[b] - 1 (as the op does), otherwise it must be rotated already.
    Caches hold rotated keys, in the activation dtype or float8_e4m3fn (then `k_scale`/`v_scale`
    are the per-tensor dequantization scales: real = stored * scale):
      contiguous: key_cache/value_cache [B, KVH, capacity, D], block_tables None;
      paged:      key_cache/value_cache [num_blocks, KVH, block_size, D], block_tables int32
                  [B, max_blocks] (position p of row b is in block block_tables[b, p // block_size]).
    seq_lens: int32 [B], the number of valid cache positions per sequence (>= 1).
    Returns the attention output in q's shape and dtype.
    """
    require_dense_attrs(attrs)
    h, kvh, d, group = attrs.num_heads, attrs.num_kv_heads, attrs.head_dim, attrs.group_size
    batch = q.shape[0]
    if q.numel() != batch * h * d:
        raise ValueError(f"q must hold {h} heads x {d} per sequence, got shape {tuple(q.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"unsupported activation dtype {q.dtype}")
    if key_cache.dtype != value_cache.dtype or key_cache.dtype not in (q.dtype, torch.float8_e4m3fn):
        raise TypeError(f"caches must be {q.dtype} or float8_e4m3fn, got {key_cache.dtype}/{value_cache.dtype}")
    if key_cache.shape != value_cache.shape or key_cache.shape[1] != kvh or key_cache.shape[3] != d:
        raise ValueError(f"caches must be [*, {kvh}, *, {d}], got {tuple(key_cache.shape)}/{tuple(value_cache.shape)}")
    paged = block_tables is not None
    if paged:
        assert block_tables is not None
        if block_tables.dim() != 2 or block_tables.shape[0] != batch:
            raise ValueError(f"block_tables must be [{batch}, max_blocks], got {tuple(block_tables.shape)}")
        page_size = key_cache.shape[2]
        max_len = block_tables.shape[1] * page_size
        tables = block_tables.to(torch.int32).contiguous()
    else:
        if key_cache.shape[0] != batch:
            raise ValueError(f"contiguous caches must have batch {batch}, got {key_cache.shape[0]}")
        page_size = 1
        max_len = key_cache.shape[2]
        tables = torch.zeros((1, 1), dtype=torch.int32, device=q.device)
    _check_device(q, key_cache, value_cache, seq_lens, tables)
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("caches must be contiguous in head_dim")
    q2 = q.reshape(batch, h * d).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    fp8 = key_cache.dtype == torch.float8_e4m3fn

    if block_n is None:
        block_n = 16 if interpreting() else 64
    if num_splits is None:
        num_splits = default_num_splits(batch * kvh, max_len, block_n, q.device)
    split_size = triton.cdiv(triton.cdiv(max_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_len, split_size)

    mid_o = torch.empty((batch, h, num_splits, d), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((batch, h, num_splits), dtype=torch.float32, device=q.device)
    out = torch.empty((batch, h * d), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out.view(q.shape)
    _decode_split_kernel[(num_splits, batch * kvh)](
        q2, key_cache, value_cache, seq_lens, tables,
        _scale_tensor(k_scale, q.device), _scale_tensor(v_scale, q.device),
        mid_o, mid_lse,
        q2.stride(0), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), tables.stride(0),
        split_size, num_splits,
        NUM_KV_HEADS=kvh, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_N=block_n,
        PAGED=paged, PAGE_SIZE=page_size, HAS_SCALES=fp8 or k_scale is not None or v_scale is not None,
        APPLY_ROPE=apply_rope, INV_FREQ=inv_freq_constexpr(attrs), INTERLEAVED=bool(attrs.rope_interleaved),
        QK_SCALE=float(attrs.scale) * LOG2E, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    _decode_reduce_kernel[(batch * h,)](
        mid_o, mid_lse, out, num_splits, out.stride(0),
        NUM_HEADS=h, HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_S=triton.next_power_of_2(num_splits), num_warps=4 if d >= 128 else 2,
    )
    return out.view(q.shape)


def decode_bytes(key_cache: torch.Tensor, seq_lens: torch.Tensor, num_kv_heads: int, head_dim: int) -> int:
    """HBM bytes decode_attention must read for K and V: the roofline numerator of `make bench-kernels`."""
    return int(seq_lens.sum().item()) * num_kv_heads * head_dim * key_cache.element_size() * 2


def attention_flops(batch: int, seq: int, past: int, num_heads: int, head_dim: int) -> float:
    """Matmul FLOPs of causal attention of `seq` new tokens over `past` cached ones (QK^T + PV)."""
    pairs = seq * past + seq * (seq + 1) / 2
    return 4.0 * batch * num_heads * head_dim * pairs


__all__ = [
    "KernelConfig", "OP_CONFIGS", "FP16_TACTICS", "FP32_TACTICS", "compile_op_kernel", "decode_attention",
    "prefill_attention", "interpreting", "op_constexprs", "attention_flops", "decode_bytes",
]
