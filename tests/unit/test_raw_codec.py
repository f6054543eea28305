from __future__ import annotations

import struct

import ml_dtypes
import numpy as np
import orjson
import pytest

from ember.server.codecs import v2
from ember.server.codecs.raw import array_from_raw, array_to_raw
from ember.server.errors import InvalidInput
from ember.server.rest.body import split_binary_body

ARRAYS = {
    "BOOL": np.array([[True, False, True]]),
    "UINT8": np.array([[0, 255]], dtype=np.uint8),
    "UINT16": np.array([[65535]], dtype=np.uint16),
    "UINT32": np.array([[2**32 - 1, 3]], dtype=np.uint32),
    "UINT64": np.array([[2**64 - 1]], dtype=np.uint64),
    "INT8": np.array([[-128, 127]], dtype=np.int8),
    "INT16": np.array([[-5]], dtype=np.int16),
    "INT32": np.array([[1, -2], [3, -4]], dtype=np.int32),
    "INT64": np.array([[-(2**63)]], dtype=np.int64),
    "FP16": np.array([[0.5, -2.0]], dtype=np.float16),
    "BF16": np.array([[1.5, -0.25]], dtype=ml_dtypes.bfloat16),
    "FP32": np.array([[1.25, np.inf]], dtype=np.float32),
    "FP64": np.array([[np.pi]], dtype=np.float64),
    "BYTES": np.array([[b"", b"\x00\xff", "é".encode()]], dtype=object),
    "EMPTY": np.zeros((0, 3), dtype=np.float32),
}


@pytest.mark.parametrize("datatype", list(ARRAYS))
def test_round_trip(datatype: str) -> None:
    array = ARRAYS[datatype]
    wire = "FP32" if datatype == "EMPTY" else datatype
    raw = array_to_raw(array, wire)
    back = array_from_raw(raw, wire, array.shape, "input 'x'")
    assert back.shape == array.shape and back.dtype == array.dtype
    assert back.tolist() == array.tolist()


def test_bytes_layout_is_length_prefixed() -> None:
    raw = array_to_raw(np.array([b"ab", b""], dtype=object), "BYTES")
    assert raw == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)


def test_fixed_size_is_zero_copy() -> None:
    body = bytearray(array_to_raw(np.arange(4, dtype=np.float32), "FP32"))
    array = array_from_raw(memoryview(body), "FP32", (4,), "x")
    body[0:4] = struct.pack("<f", 9.0)
    assert array[0] == 9.0


@pytest.mark.parametrize(
    ("raw", "datatype", "shape", "fragment"),
    [
        (b"\x00" * 7, "FP32", (2,), "needs 8 bytes, got 7"),
        (b"\x00" * 9, "FP32", (2,), "needs 8 bytes, got 9"),
        (b"", "FP32", (2**20, 2**20), "needs 4398046511104 bytes"),
        (b"\x00" * 8, "FP32", (-1, 2), "negative dimension"),
        (b"\x02", "BOOL", (1,), "0 or 1"),
        (b"\x00" * 4, "FP33", (1,), "unknown datatype"),
        (struct.pack("<I", 10) + b"abc", "BYTES", (1,), "claims 10 bytes but only 3 remain"),
        (struct.pack("<I", 1) + b"a" + b"\x00\x00", "BYTES", (2,), "needs at least 8 bytes"),
        (struct.pack("<I", 1) + b"a" + b"\x00\x00\x00\x00", "BYTES", (1,), "4 bytes left over"),
        (b"", "BYTES", (2**40,), "needs at least"),
    ],
)
def test_bad_raw_data(raw: bytes, datatype: str, shape: tuple[int, ...], fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        array_from_raw(raw, datatype, shape, "input 'x'")
    assert info.value.message.startswith("input 'x'")
    assert fragment in info.value.message


def binary_request(doc: bytes, *blobs: bytes) -> tuple[bytes, str]:
    return doc + b"".join(blobs), str(len(doc))


def test_binary_request_decodes_inputs_in_json_order() -> None:
    doc = (
        b'{"inputs":[{"name":"a","datatype":"INT32","shape":[2],"parameters":{"binary_data_size":8}},'
        b'{"name":"b","datatype":"FP32","shape":[1],"data":[1.5]},'
        b'{"name":"c","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":6}}],'
        b'"parameters":{"binary_data_output":true}}'
    )
    body, length = binary_request(
        doc, np.array([7, 8], dtype=np.int32).tobytes(), struct.pack("<I", 2) + b"hi"
    )
    json_part, binary = split_binary_body(body, length)
    request = v2.decode_request(orjson.loads(json_part), "m", None, binary)
    assert [t.name for t in request.inputs] == ["a", "b", "c"]
    assert request.inputs[0].data.tolist() == [7, 8]
    assert request.inputs[2].data.tolist() == [b"hi"]
    assert "binary_data_size" not in request.inputs[0].parameters
    assert v2.binary_outputs(request) == {"*"}


@pytest.mark.parametrize(
    ("doc", "blob", "fragment"),
    [
        (b'{"inputs":[{"name":"a","datatype":"INT32","shape":[2],"parameters":{"binary_data_size":8}}]}',
         b"\x00" * 4, "runs past the end of the body"),
        (b'{"inputs":[{"name":"a","datatype":"INT32","shape":[1],"parameters":{"binary_data_size":4}}]}',
         b"\x00" * 8, "4 bytes of binary data are not claimed"),
        (b'{"inputs":[{"name":"a","datatype":"INT32","shape":[2],"parameters":{"binary_data_size":4}}]}',
         b"\x00" * 4, "needs 8 bytes, got 4"),
        (b'{"inputs":[{"name":"a","datatype":"INT32","shape":[1],"parameters":{"binary_data_size":-4}}]}',
         b"", "non-negative integer"),
        (b'{"inputs":[{"name":"a","datatype":"INT32","shape":[1],"data":[1],'
         b'"parameters":{"binary_data_size":4}}]}', b"\x00" * 4, "both 'data' and"),
    ],
)  # fmt: skip
def test_binary_sizes_that_do_not_add_up(doc: bytes, blob: bytes, fragment: str) -> None:
    body, length = binary_request(doc, blob)
    json_part, binary = split_binary_body(body, length)
    with pytest.raises(InvalidInput) as info:
        v2.decode_request(orjson.loads(json_part), "m", None, binary)
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("length", "fragment"), [("100", "larger than the body"), ("x", "byte count")]
)
def test_binary_header_length(length: str, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        split_binary_body(b"{}", length)


def test_binary_output_selection() -> None:
    request = v2.decode_request(
        {
            "inputs": [{"name": "a", "datatype": "INT32", "shape": [1], "data": [1]}],
            "outputs": [
                {"name": "x", "parameters": {"binary_data": True}},
                {"name": "y"},
                {"name": "z", "parameters": {"binary_data": False}},
            ],
            "parameters": {"binary_data_output": True},
        },
        "m",
        None,
    )
    assert v2.binary_outputs(request) == {"x", "y"}
