"""The safetensors header, read and checked before a single tensor byte is placed.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`), then
the tensors' bytes, offsets counted from the end of the header. Streaming onto a device
allocates every tensor from the header alone and then writes ranges as they arrive, so the
header must be trusted completely first: every offset inside the file, the tensors tiling the
data with no gap or overlap (as the safetensors package requires), sizes matching shapes.
Torch is not imported here: the parser is shared by tools that never load a model.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

import orjson

# The safetensors package refuses larger headers; a real model's header is well under 1 MiB.
MAX_HEADER_BYTES = 100_000_000
# Enough for the whole header of nearly every file, so one small read usually suffices.
FIRST_READ = 64 * 1024
_MAX_RANK = 64
_MAX_DIM = 2**63 - 1

# Element sizes in bytes, by safetensors dtype name.
ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


class HeaderError(ValueError):
    """The file is not a safetensors file this loader can place; the message says why."""


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    # Offsets in the file (not in the data section), end exclusive.
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True, slots=True)
class Header:
    # Sorted by offset; they tile [data_start, file_size) exactly.
    tensors: tuple[TensorEntry, ...]
    metadata: dict[str, str]
    # Where the tensor bytes begin: 8 + the header length.
    data_start: int


def header_length(prefix: bytes | bytearray | memoryview, file_size: int) -> int:
    """The byte count of the JSON header, from the file's first 8 bytes."""
    if file_size < 8 or len(prefix) < 8:
        raise HeaderError(f"{file_size} bytes is too short for a safetensors file")
    (length,) = struct.unpack_from("<Q", prefix)
    if length > MAX_HEADER_BYTES:
        raise HeaderError(f"header length {length} is over the limit of {MAX_HEADER_BYTES} bytes")
    if 8 + length > file_size:
        raise HeaderError(f"header length {length} runs past the end of a {file_size}-byte file")
    return int(length)


def parse_header(head: bytes | bytearray | memoryview, file_size: int) -> Header:
    """`head`: at least the file's first 8 + N bytes (more is ignored)."""
    length = header_length(head, file_size)
    if len(head) < 8 + length:
        raise HeaderError(f"need {8 + length} bytes of header, got {len(head)}")
    text = bytes(head[8 : 8 + length])
    try:
        document = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise HeaderError(f"header is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise HeaderError(f"header must be a JSON object, got {type(document).__name__}")
    data_start = 8 + length
    metadata = _metadata(document.pop("__metadata__", None))
    entries = [_entry(name, value, data_start) for name, value in document.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    expected = data_start
    for entry in entries:
        if entry.begin != expected:
            where = "overlaps the one before" if entry.begin < expected else "leaves a gap before"
            raise HeaderError(
                f"tensor '{entry.name}' {where} it (offset {entry.begin - data_start})"
            )
        expected = entry.end
    if expected != file_size:
        raise HeaderError(
            f"the tensors end at byte {expected} of a {file_size}-byte file: "
            "the file is truncated or has trailing bytes"
        )
    # orjson keeps the last of repeated keys and reads -0 as 0; safetensors refuses both, and
    # so does this second parse (the stricter one passed, and so did every field's check).
    json.loads(text, object_pairs_hook=_no_repeats, parse_int=_unsigned)
    return Header(tuple(entries), metadata, data_start)


def _no_repeats(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise HeaderError(f"'{key}' appears twice in one object of the header")
        seen[key] = value
    return seen


def _unsigned(text: str) -> int:
    # Integers appear only in shapes and offsets, which are unsigned.
    if text.startswith("-"):
        raise HeaderError(f"negative number {text} in the header: shapes and offsets are unsigned")
    return int(text)


def _metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise HeaderError("__metadata__ must map strings to strings")
    return value


def _entry(name: str, value: object, data_start: int) -> TensorEntry:
    if not isinstance(value, dict):
        raise HeaderError(f"tensor '{name}': expected an object, got {type(value).__name__}")
    dtype = value.get("dtype")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        known = ", ".join(ITEMSIZE)
        raise HeaderError(f"tensor '{name}': dtype {dtype!r} is not one of {known}")
    shape = value.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_RANK
        or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape)
        # A zero dimension makes the size 0 whatever the others are; torch still needs the
        # others' product to fit in an int64 to build the tensor.
        or math.prod(d for d in shape if d) > _MAX_DIM
    ):
        raise HeaderError(
            f"tensor '{name}': shape must be a list of non-negative integers "
            "whose product fits in 64 bits"
        )
    offsets = value.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise HeaderError(f"tensor '{name}': data_offsets must be [begin, end] with begin <= end")
    extra = value.keys() - {"dtype", "shape", "data_offsets"}
    if extra:
        raise HeaderError(f"tensor '{name}': unknown field(s) {', '.join(sorted(extra))}")
    begin, end = offsets
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if end - begin != expected:
        raise HeaderError(
            f"tensor '{name}': {end - begin} bytes for shape {shape} of {dtype}, "
            f"which needs {expected}"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def read_header(size: int, read: Callable[[int, int], bytes | bytearray]) -> Header:
    """The header of a `size`-byte file, through `read(start, end)`: one read of the first
    `FIRST_READ` bytes, and a second only when the header is longer."""
    if size < 8:
        raise HeaderError(f"{size} bytes is too short for a safetensors file")
    head = bytearray(read(0, min(size, FIRST_READ)))
    length = header_length(head, size)
    if len(head) < 8 + length:
        head += read(len(head), 8 + length)
    return parse_header(head, size)
