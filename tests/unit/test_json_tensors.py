from __future__ import annotations

import numpy as np
import pytest

from ember.server.codecs.json_tensors import array_from_json, array_to_json, parse_shape
from ember.server.errors import InvalidInput


@pytest.mark.parametrize(
    ("data", "datatype", "shape", "expected"),
    [
        ([1, 2, 3, 4], "INT32", (2, 2), np.array([[1, 2], [3, 4]], dtype=np.int32)),
        ([[1, 2], [3, 4]], "INT64", (2, 2), np.array([[1, 2], [3, 4]], dtype=np.int64)),
        ([[1.5], [2]], "FP32", (2, 1), np.array([[1.5], [2.0]], dtype=np.float32)),
        ([True, False], "BOOL", (2,), np.array([True, False])),
        ([255, 0], "UINT8", (2,), np.array([255, 0], dtype=np.uint8)),
        ([2**64 - 1], "UINT64", (1,), np.array([2**64 - 1], dtype=np.uint64)),
        ([7], "FP64", (), np.array(7.0)),
        ([], "FP32", (0, 3), np.zeros((0, 3), dtype=np.float32)),
    ],
)
def test_numbers_decode_to_declared_dtype_and_shape(
    data: object, datatype: str, shape: tuple[int, ...], expected: np.ndarray
) -> None:
    array = array_from_json(data, datatype, shape, "input 'x'")
    assert array.dtype == expected.dtype
    assert array.shape == expected.shape
    np.testing.assert_array_equal(array, expected)


def test_bytes_decode_to_object_array_of_utf8() -> None:
    array = array_from_json([["héllo", ""], ["a", "b"]], "BYTES", (2, 2), "input 'x'")
    assert array.dtype == object
    assert array.tolist() == [[b"h\xc3\xa9llo", b""], [b"a", b"b"]]


@pytest.mark.parametrize(
    ("data", "datatype", "shape", "fragment"),
    [
        ([1, 2, 3], "FP32", (2, 2), "needs 4 elements, 'data' has 3"),
        ([[1, 2], [3]], "FP32", (2, 2), "ragged"),
        (["a", "b"], "FP32", (2,), "got strings"),
        (["1.5"], "FP32", (1,), "got strings"),
        ([1.5], "INT32", (1,), "got non-integer numbers"),
        ([True], "INT32", (1,), "got booleans"),
        ([1], "BOOL", (1,), "expected BOOL"),
        ([300], "UINT8", (1,), "out of range for UINT8"),
        ([-1], "UINT32", (1,), "out of range"),
        ([2**70], "INT64", (1,), "INT64"),
        ([1.0], "FP16", (1,), "send it as binary"),
        ([1.0], "BF16", (1,), "send it as binary"),
        ([1.0], "FP33", (1,), "unknown datatype 'FP33'"),
        ([1.0], None, (1,), "unknown datatype None"),
        ([1, "a"], "BYTES", (2,), "element 0 is int"),
        ([["a"], ["b", "c"]], "BYTES", (2, 1), "ragged"),
        ([{"a": 1}], "FP32", (1,), "expected FP32"),
    ],
)
def test_bad_data_names_tensor_and_expectation(
    data: object, datatype: str, shape: tuple[int, ...], fragment: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        array_from_json(data, datatype, shape, "input 'x'")
    assert info.value.message.startswith("input 'x'")
    assert fragment in info.value.message


@pytest.mark.parametrize("shape", [None, "2", [2, -1], [1.5], [True], {"a": 1}])
def test_bad_shapes(shape: object) -> None:
    with pytest.raises(InvalidInput, match="'shape' must be a list of non-negative integers"):
        parse_shape(shape, "input 'x'")


def test_outputs_encode_flat_row_major() -> None:
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    flat = array_to_json(array.T, "FP32")
    assert list(flat) == [0, 3, 1, 4, 2, 5]
    assert array_to_json(np.array([[b"a"], [b"b"]], dtype=object), "BYTES") == ["a", "b"]


def test_non_utf8_bytes_output_asks_for_binary() -> None:
    with pytest.raises(InvalidInput, match="binary"):
        array_to_json(np.array([b"\xff"], dtype=object), "BYTES")
