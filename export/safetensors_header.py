"""Read safetensors files without the safetensors library: `read_safetensors_header` parses and
sanity-checks a file's header into one `TensorInfo` per tensor (reading only the header bytes), and
`_read_tensor` reads one tensor's data.

Data is read with plain `seek`/`readinto` into a buffer of exactly the tensor's size (no mmap of the
whole file), so nothing stays resident once the caller drops the tensor. Problems are raised as
`CheckpointError`s that start with the file's name (and name the tensor where one is involved).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from llamaforge.export.checkpoint_errors import CheckpointError, fmt_shape

__all__ = ["TensorInfo", "read_safetensors_header"]

# safetensors' own parser refuses headers above 100 MB.
MAX_HEADER_BYTES = 100_000_000

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (from the header; no data read)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and sanity-check a safetensors header: reads only the first 8 + N bytes."""

    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{name}: file not found in {path.parent}") from None
    if size < 8:
        raise CheckpointError(f"{name}: only {size} bytes, too short for a safetensors file (truncated?)")
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(
                    f"{name}: corrupt safetensors header: header length {n} bytes exceeds "
                    f"{'the 100 MB limit' if n > MAX_HEADER_BYTES else f'the file size ({size} bytes)'}"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: corrupt safetensors header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupt safetensors header: expected a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_len = size - data_start
    out: dict[str, TensorInfo] = {}
    for tname, info in header.items():
        where = f"{name}: tensor '{tname}'"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: corrupt header entry")
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))  # type: ignore[arg-type]
        if dtype is None:
            raise CheckpointError(f"{where}: unsupported or missing dtype {info.get('dtype')!r}")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if (not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: corrupt header entry (shape={shape!r}, data_offsets={offsets!r})")
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(
                f"{where}: corrupt header: data_offsets span {offsets[1] - offsets[0]} bytes but "
                f"shape {fmt_shape(shape)} of {info['dtype']} needs {nbytes}"
            )
        if offsets[1] > data_len:
            raise CheckpointError(
                f"{where}: data ends at byte {data_start + offsets[1]} but the file has only "
                f"{size} bytes (truncated?)"
            )
        out[tname] = TensorInfo(path, dtype, tuple(shape), data_start + offsets[0], nbytes)
    return out


def _read_tensor(info: TensorInfo, name: str) -> torch.Tensor:
    """Read one tensor's bytes into a fresh buffer (no mmap stays alive)."""

    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    buf = bytearray(info.nbytes)
    try:
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(buf)
    except FileNotFoundError:
        raise CheckpointError(f"{info.file.name}: file not found (tensor '{name}')") from None
    except OSError as e:
        raise CheckpointError(f"{info.file.name}: cannot read tensor '{name}' ({e})") from None
    if got != info.nbytes:
        raise CheckpointError(
            f"{info.file.name}: tensor '{name}': read {got} of {info.nbytes} bytes (file truncated?)"
        )
    return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)
