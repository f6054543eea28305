"""Fuzz target: raw tensor bytes (the binary extension's and gRPC's raw contents), BYTES
elements above all: each a uint32 little-endian length, then that many bytes.

Input layout: byte 0 picks the datatype (BYTES for half the values), byte 1 the number of
dimensions (0-3), the next bytes are the dimensions, the rest is the buffer.
bytes -> codecs.raw.array_from_raw, and whatever decodes must encode back to the same bytes
(codecs.raw.array_to_raw and raw_view). Only EmberError (InvalidInput) may escape.
"""

from __future__ import annotations

import struct
import sys

import atheris
from fuzzkit import corpus_args

with atheris.instrument_imports(include=["ember"]):
    from ember.server.codecs.raw import array_from_raw, array_to_raw, raw_view
    from ember.server.datatypes import DATATYPES
    from ember.server.errors import EmberError

_OTHERS = [d for d in DATATYPES if d != "BYTES"]


def _datatype(selector: int) -> str:
    return "BYTES" if selector < 128 else _OTHERS[selector % len(_OTHERS)]


def _elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _seed(selector: int, shape: list[int], buffer: bytes) -> bytes:
    return bytes([selector, len(shape), *shape]) + buffer


SEEDS = [
    _seed(0, [2], _elements(b"ab", b"")),
    _seed(0, [1, 3], _elements(b"\x00\xff", "é".encode(), b"x" * 40)),
    _seed(0, [], _elements(b"scalar")),
    _seed(0, [0], b""),
    _seed(128 + _OTHERS.index("FP32"), [2], struct.pack("<2f", 1.0, -0.5)),
    _seed(128 + _OTHERS.index("BOOL"), [1, 3], b"\x01\x00\x01"),
    _seed(128 + _OTHERS.index("INT64"), [1], struct.pack("<q", -(2**63))),
    _seed(128 + _OTHERS.index("BF16"), [2], b"\x80\x3f\x00\xc0"),
]


def fuzz_one(data: bytes) -> None:
    if len(data) < 2:
        return
    datatype = _datatype(data[0])
    ndim = data[1] % 4
    shape = tuple(data[2 : 2 + ndim])
    buffer = data[2 + ndim :]
    try:
        array = array_from_raw(buffer, datatype, shape, "input 'x'")
    except EmberError:
        return
    assert array.shape == shape, (array.shape, shape)
    assert array_to_raw(array, datatype) == buffer, "decoded tensor does not encode back"
    assert bytes(raw_view(array, datatype)) == buffer, "raw view differs from the bytes"


def main() -> None:
    atheris.Setup(corpus_args(sys.argv, "raw_tensors", SEEDS), fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
