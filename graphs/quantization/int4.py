"""INT4 weight-only (W4A16) arithmetic, shared by the passes, the ONNX Runtime lowering, the tests'
oracle and the benchmark (numpy only: `graphs/` passes never need torch).

The form is TensorRT's weight-only INT4 (TensorRT-LLM's `int4_awq`, Model Optimizer's W4A16):
symmetric, zero point 0, one scale per block of `block_size` consecutive *input* channels of each
output channel. On a MatMul weight W [in, out] (x @ W) that is

    scale[b, j] = max |W[b*B:(b+1)*B, j]| / 7          (float32, [in / B, out])
    q[i, j]     = clip(round_half_even(W[i, j] / scale[i // B, j]), -8, 7)     (int4)

and in ONNX `DequantizeLinear(q, scale, zero_point=0, axis=0, block_size=B)` feeding the MatMul's
weight input (opset 21+ block quantization: the scale has the weight's rank, dimension `axis`
divided by B). amax / 7 rather than / 8 keeps the grid symmetric (-7..7 for the block's own
values), as Model Optimizer and TensorRT-LLM compute it; -8 stays representable.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

INT4_MAX = 7.0
INT4_MIN = -8.0
INT4_BLOCK_SIZES = (32, 64, 128)
DEFAULT_INT4_BLOCK_SIZE = 128
INT4_PRECISIONS = ("int4-awq", "int4-rtn")


def block_for(inputs: int, block_size: int) -> int | None:
    """The block a weight with `inputs` input channels takes under `--int4-block-size block_size`:
    that size when it divides the width, else the largest smaller INT4 block size that does (a
    model whose FFN width is 576, like stdlib-5m's, takes 64 there and 128 elsewhere); None when
    none does (the build then fails before the export, naming the weight)."""
    return next((b for b in sorted(INT4_BLOCK_SIZES, reverse=True) if b <= block_size and inputs % b == 0), None)


def block_problem(name: str, inputs: int, block_size: int) -> str | None:
    """Why the weight `name` with `inputs` input channels cannot be INT4-quantized (None if it can)."""
    if block_for(inputs, block_size) is not None:
        return None
    sizes = [b for b in INT4_BLOCK_SIZES if b <= block_size]
    return (f"{name} has {inputs} input channels, which no INT4 block size {' / '.join(map(str, sizes))} "
            f"divides (--int4-block-size {block_size})")


def block_amax(w: np.ndarray, block_size: int, axis: int = 0) -> np.ndarray:
    """max |w| over each block of `block_size` along `axis` (the input-channel axis): the weight's
    shape with that dimension divided by the block size."""
    w = np.asarray(w, dtype=np.float32)
    axis = axis % w.ndim
    if w.shape[axis] % block_size:
        raise ValueError(f"dimension {axis} of size {w.shape[axis]} is not a multiple of block size {block_size}")
    blocked = w.reshape(*w.shape[:axis], w.shape[axis] // block_size, block_size, *w.shape[axis + 1:])
    return np.abs(blocked).max(axis=axis + 1)


def int4_scales(w: np.ndarray, block_size: int, axis: int = 0) -> np.ndarray:
    """Per-block scales amax / 7 (float32); an all-zero block gets scale 1 (nothing divides by 0)."""
    amax = block_amax(w, block_size, axis)
    return (np.where(amax > 0, amax, np.float32(INT4_MAX)) / np.float32(INT4_MAX)).astype(np.float32)


def expand_blocks(scale: np.ndarray, block_size: int, axis: int = 0) -> np.ndarray:
    """The per-block scale repeated over its block (the weight's shape)."""
    return np.repeat(scale, block_size, axis=axis)


def quantize_int4(w: np.ndarray, scale: np.ndarray, block_size: int, axis: int = 0) -> np.ndarray:
    """round-half-even(w / scale) saturated to [-8, 7] as ONNX QuantizeLinear does, as int4."""
    q = np.clip(np.rint(np.asarray(w, np.float32) / expand_blocks(scale, block_size, axis)), INT4_MIN, INT4_MAX)
    return q.astype(ml_dtypes.int4)


def dequantize_int4(q: np.ndarray, scale: np.ndarray, block_size: int, axis: int = 0) -> np.ndarray:
    return (q.astype(np.float32) * expand_blocks(scale, block_size, axis)).astype(np.float32)


# -- ONNX Runtime's MatMulNBits layout (com.microsoft, ORT 1.31) ---------------------------------------
#
# MatMulNBits(A [.., K], B, scales[, zero_points]) computes A @ W with W [K, N] stored per output
# column n in blocks of `block_size` along K: B is uint8 [N, ceil(K / block_size), block_size * bits / 8]
# holding unsigned codes, packed low bits first (4 bits: element 2i in the low nibble, 2i+1 in the
# high one), scales are float [N * n_blocks] (column-major over blocks: n * n_blocks + b), and
# without `zero_points` every block's zero point is 2^(bits-1) (8 for 4 bits, 128 for 8 bits), so a
# signed value q is stored as the code q + 2^(bits-1) and dequantizes to (code - 2^(bits-1)) * scale.
# A last, partial block is padded with the zero point's code (value 0).


def matmulnbits_weight(q: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Signed codes q [K, N] (int4 or int8 values) -> MatMulNBits' B, uint8 [N, n_blocks, block_size * bits / 8]."""
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits bits={bits}: only 4 and 8 are produced here")
    k, n = q.shape
    blocks = -(-k // block_size)
    offset = 1 << (bits - 1)
    codes = np.full((n, blocks * block_size), offset, dtype=np.uint8)  # padding: code of value 0
    codes[:, :k] = (q.astype(np.int16).T + offset).astype(np.uint8)
    codes = codes.reshape(n, blocks, block_size)
    if bits == 4:
        codes = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(codes)


def matmulnbits_scales(scale: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """Scales for MatMulNBits, float32 [N * n_blocks]: from per-block scales [n_blocks, N] (INT4's
    axis-0 blocks) or per-output-channel scales [N] (INT8's, the same scale for every block)."""
    blocks = -(-k // block_size)
    scale = np.asarray(scale, np.float32)
    if scale.ndim == 1:
        scale = np.broadcast_to(scale, (blocks, scale.shape[0]))
    if scale.shape[0] != blocks:
        raise ValueError(f"scales of shape {scale.shape} have {scale.shape[0]} blocks, K={k} / block {block_size} "
                         f"needs {blocks}")
    return np.ascontiguousarray(scale.T).reshape(-1)
