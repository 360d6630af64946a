"""Triton's tensor codec for KServe v2 gRPC messages (`tritonclient.grpc.service_pb2`).

* BYTES tensors are Triton's serialisation: each element a 4-byte little-endian length then the
  bytes, in `raw_input_contents`; in `contents.bytes_contents` each element is one entry (no prefix).
* Numeric tensors come from `raw_input_contents` (little-endian, C order) or from the typed
  `contents` field (`int_contents` for INT8/16/32, `uint64_contents` for UINT64, ...). If a request
  uses `raw_input_contents` it must use it for every input (as in Triton).
* Outputs are always written to `raw_output_contents` (what Triton does; tritonclient reads both).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from llamaforge.runtime.core.requests import RequestError

__all__ = ["serialize_bytes", "deserialize_bytes", "decode_inputs", "encode_output", "NP_TYPES", "INT_TYPES", "FLOAT_TYPES"]

NP_TYPES: dict[str, Any] = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
INT_TYPES = ("INT32", "INT64", "INT16", "INT8", "UINT32", "UINT64", "UINT16", "UINT8")
FLOAT_TYPES = ("FP32", "FP64", "FP16")


def serialize_bytes(elements: Iterable[bytes]) -> bytes:
    """Triton's BYTES serialisation: each element as a 4-byte little-endian length + the bytes."""
    out = bytearray()
    for e in elements:
        out += struct.pack("<I", len(e))
        out += e
    return bytes(out)


def deserialize_bytes(buf: bytes, field_name: str) -> list[bytes]:
    """Inverse of `serialize_bytes`; a truncated buffer is a `RequestError` naming `field_name`."""
    out: list[bytes] = []
    pos, n = 0, len(buf)
    while pos < n:
        if pos + 4 > n:
            raise RequestError(field_name, f"BYTES data is truncated: {n - pos} byte(s) left where a 4-byte "
                                           "length prefix was expected")
        (length,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + length > n:
            raise RequestError(field_name, f"BYTES element of length {length} runs past the end of the data "
                                           f"({n - pos} byte(s) left)")
        out.append(bytes(buf[pos:pos + length]))
        pos += length
    return out


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
    """Every input tensor of `request` as a NumPy array of its declared shape (BYTES: object array of
    `bytes`), checking datatypes, shapes against the data, and the use of `raw_input_contents`."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise RequestError("raw_input_contents", f"{len(raw)} raw input buffer(s) for {len(request.inputs)} "
                                                 "input(s): when raw_input_contents is used it must hold every input")
    tensors: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        name = t.name
        if not name:
            raise RequestError("inputs", f"input #{i} has no name")
        if name in tensors:
            raise RequestError(name, "input given more than once")
        for key in t.parameters:
            if key != "binary_data_size":
                raise RequestError(f"{name}.parameters.{key}", "tensor parameter not supported by this server "
                                                               "(no shared memory)")
        dtype = t.datatype
        if dtype not in NP_TYPES:
            raise RequestError(name, f"unknown datatype {dtype!r}")
        shape = tuple(int(d) for d in t.shape)
        if any(d < 0 for d in shape):
            raise RequestError(name, f"shape {list(shape)} has a negative dimension")
        count = math.prod(shape)
        if raw:
            data = raw[i]
            if dtype == "BYTES":
                elems = deserialize_bytes(data, name)
                if len(elems) != count:
                    raise RequestError(name, f"shape {list(shape)} has {count} element(s) but the data holds {len(elems)}")
                arr = np.empty(count, dtype=np.object_)
                arr[:] = elems
            else:
                itemsize = np.dtype(NP_TYPES[dtype]).itemsize
                if len(data) != count * itemsize:
                    raise RequestError(name, f"shape {list(shape)} of {dtype} needs {count * itemsize} bytes, "
                                             f"got {len(data)}")
                arr = np.frombuffer(data, dtype=np.dtype(NP_TYPES[dtype]).newbyteorder("<")).astype(NP_TYPES[dtype])
        else:
            if dtype not in _CONTENTS:
                raise RequestError(name, f"{dtype} data must be sent in raw_input_contents")
            values = list(getattr(t.contents, _CONTENTS[dtype]))
            if len(values) != count:
                raise RequestError(name, f"shape {list(shape)} has {count} element(s) but contents hold {len(values)}")
            if dtype == "BYTES":
                arr = np.empty(count, dtype=np.object_)
                arr[:] = [bytes(v) for v in values]
            else:
                try:
                    arr = np.array(values, dtype=NP_TYPES[dtype])
                except OverflowError:
                    raise RequestError(name, f"a value does not fit {dtype}") from None
        tensors[name] = arr.reshape(shape)
    return tensors


def encode_output(name: str, datatype: str, array: Any) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes]:
    """One output tensor and its raw contents."""
    if datatype == "BYTES":
        arr = np.asarray(array, dtype=np.object_)
        data = serialize_bytes(e if isinstance(e, bytes) else str(e).encode("utf-8") for e in arr.reshape(-1))
    else:
        arr = np.ascontiguousarray(array, dtype=np.dtype(NP_TYPES[datatype]).newbyteorder("<"))
        data = arr.tobytes()
    tensor = pb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=list(arr.shape))
    return tensor, data
