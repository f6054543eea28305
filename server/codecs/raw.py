"""Raw tensor bytes (Triton's binary extension, gRPC raw contents) to numpy arrays and back.

Little-endian, row-major, unpadded; BOOL is one byte; each BYTES element is a uint32
little-endian length followed by that many bytes. Fixed-size datatypes are taken with
`numpy.frombuffer` (no copy, no per-element Python work); only BYTES walks its elements.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from ember.server.codecs.shown import shown
from ember.server.datatypes import NUMPY_DTYPES
from ember.server.errors import InvalidInput

_LENGTH = struct.Struct("<I")
# The wire's byte order for each datatype, made once: dtype.newbyteorder() builds a new
# dtype object on every call.
_WIRE_DTYPES = {
    name: dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
    for name, dtype in NUMPY_DTYPES.items()
}

# numpy 1.x arrays have at most 32 dimensions (2.x: 64); the lower limit holds for both.
MAX_DIMS = 32
# numpy sizes an array as the product of its non-zero dimensions times the element size, in a
# signed 64-bit integer, even when another dimension is 0: past this it refuses with a
# ValueError. 8 bytes is the widest element here (INT64, FP64, a BYTES object pointer).
_MAX_BYTES = 2**63 - 1
_WIDEST = 8


def element_count(shape: tuple[int, ...], where: str) -> int:
    """The elements `shape` holds, once it is known to be a shape numpy can make."""
    if len(shape) > MAX_DIMS:
        raise InvalidInput(
            f"{where}: shape has {len(shape)} dimensions, at most {MAX_DIMS} are supported"
        )
    if shape and min(shape) < 0:
        raise InvalidInput(f"{where}: shape {list(shape)} has a negative dimension")
    count = math.prod(shape)
    # With no zero dimension the product of the non-zero ones is `count` itself.
    sized = count if count else math.prod(d for d in shape if d)
    if sized * _WIDEST > _MAX_BYTES:
        raise InvalidInput(f"{where}: shape {list(shape)} is too large")
    return count


def array_from_raw(
    buffer: bytes | memoryview, datatype: str, shape: tuple[int, ...], where: str
) -> np.ndarray:
    """Decode `buffer` as `datatype` of `shape`; sizes are checked before anything is allocated."""
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInput(
            f"{where}: unknown datatype {shown(datatype)}, expected one of {list(NUMPY_DTYPES)}"
        )
    count = element_count(shape, where)
    if datatype == "BYTES":
        return _bytes_from_raw(buffer, count, shape, where)
    expected = count * dtype.itemsize
    if len(buffer) != expected:
        raise InvalidInput(
            f"{where}: {datatype} shape {list(shape)} needs {expected} bytes, got {len(buffer)}"
        )
    array = np.frombuffer(buffer, dtype=_WIRE_DTYPES[datatype])
    if datatype == "BOOL" and array.size and array.view(np.uint8).max() > 1:
        raise InvalidInput(f"{where}: BOOL bytes must be 0 or 1")
    return array.reshape(shape)


def _bytes_from_raw(
    buffer: bytes | memoryview, count: int, shape: tuple[int, ...], where: str
) -> np.ndarray:
    view = memoryview(buffer)
    # Each element takes at least its 4-byte length: a larger count cannot be in this buffer.
    if count * 4 > len(view):
        raise InvalidInput(
            f"{where}: BYTES shape {list(shape)} needs at least {count * 4} bytes, got {len(view)}"
        )
    out = np.empty(count, dtype=object)
    offset, end = 0, len(view)
    for i in range(count):
        if offset + 4 > end:
            raise InvalidInput(f"{where}: BYTES element {i} has no length prefix (data ends)")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(
                f"{where}: BYTES element {i} claims {length} bytes but only {end - offset} remain"
            )
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != end:
        raise InvalidInput(f"{where}: {end - offset} bytes left over after {count} BYTES elements")
    return out.reshape(shape)


def array_to_raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(_LENGTH.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    dtype = NUMPY_DTYPES[datatype]
    if dtype.itemsize > 1 and array.dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


def raw_view(array: np.ndarray, datatype: str) -> bytes | memoryview:
    """The tensor's bytes without a copy where the array is already little-endian and
    contiguous; BYTES tensors are serialized."""
    if datatype == "BYTES":
        return array_to_raw(array, datatype)
    dtype = NUMPY_DTYPES[datatype]
    if dtype.itemsize > 1 and array.dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("<"))
    flat = np.ascontiguousarray(array).reshape(-1)
    return memoryview(flat.view(np.uint8))  # type: ignore[arg-type]
