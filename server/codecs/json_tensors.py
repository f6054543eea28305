"""JSON tensor data (flat or nested, row-major) to numpy arrays and back."""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np

from ember.server.codecs.raw import element_count
from ember.server.codecs.shown import shown
from ember.server.datatypes import NUMPY_DTYPES
from ember.server.errors import InvalidInput

_KIND_WORDS = {"U": "strings", "S": "strings", "O": "mixed or out-of-range values", "b": "booleans",
               "f": "non-integer numbers", "i": "integers", "u": "integers"}  # fmt: skip


def _accepts(datatype: str, kind: str) -> bool:
    if datatype == "BOOL":
        return kind == "b"
    if datatype.startswith(("INT", "UINT")):
        return kind in "iu"
    return kind in "iuf"


def parse_shape(shape: Any, where: str) -> tuple[int, ...]:
    # type(d) is int, not isinstance: JSON true/false arrive as bool, a subclass of int.
    if (
        not isinstance(shape, list)
        or not all(type(d) is int for d in shape)
        or (shape and min(shape) < 0)
    ):
        raise InvalidInput(
            f"{where}: 'shape' must be a list of non-negative integers, got {shown(shape)}"
        )
    dims = tuple(shape)
    element_count(dims, where)
    return dims


def cast_floats(array: np.ndarray, dtype: np.dtype[Any], datatype: str, where: str) -> np.ndarray:
    """`array` as the float `dtype`; numbers beyond its range are refused, not made infinite."""
    with np.errstate(over="ignore"):
        cast = array.astype(dtype, copy=False)
    # JSON has no infinities or NaNs: any in the result came from an overflow.
    if cast.size and not np.isfinite(cast).all():
        # ml_dtypes' finfo also knows bfloat16, numpy's does not.
        top = float(ml_dtypes.finfo(dtype).max)  # type: ignore[no-untyped-call]
        raise InvalidInput(f"{where}: values out of range for {datatype} [{-top:g}, {top:g}]")
    return cast


def _bytes_array(data: Any, where: str) -> np.ndarray:
    try:
        array = np.array(data, dtype=object)
    except ValueError:
        raise InvalidInput(
            f"{where}: nested 'data' is ragged (rows of different lengths)"
        ) from None
    out = np.empty(array.shape, dtype=object)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        if isinstance(item, list):
            raise InvalidInput(f"{where}: nested 'data' is ragged (rows of different lengths)")
        if type(item) is not str:
            raise InvalidInput(
                f"{where}: BYTES data must be strings, element {i} is {type(item).__name__}"
            )
        flat_out[i] = item.encode("utf-8")
    return out


def _exact_integers(data: Any, datatype: str, where: str) -> np.ndarray:
    values = np.array(data, dtype=object)
    flat = values.reshape(-1)
    for item in flat:
        if type(item) is not int:
            got = "non-integer numbers" if isinstance(item, float) else type(item).__name__
            raise InvalidInput(f"{where}: expected {datatype} values in 'data', got {got}")
    info = np.iinfo(NUMPY_DTYPES[datatype])  # type: ignore[type-var]
    if min(flat) < info.min or max(flat) > info.max:
        raise InvalidInput(f"{where}: values out of range for {datatype} [{info.min}, {info.max}]")
    return values.astype(NUMPY_DTYPES[datatype])


def array_from_json(
    data: Any, datatype: str, shape: tuple[int, ...] | None, where: str
) -> np.ndarray:
    """Decode `data` as `datatype`; with `shape`, check the element count and reshape.

    `where` names the tensor in error messages ("input 'x'").
    """
    dtype = NUMPY_DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InvalidInput(
            f"{where}: unknown datatype {shown(datatype)}, expected one of {list(NUMPY_DTYPES)}"
        )
    if datatype in ("FP16", "BF16"):
        raise InvalidInput(
            f"{where}: {datatype} cannot be sent as JSON numbers; send it as binary data "
            "(parameters.binary_data_size, Triton's binary tensor extension)"
        )
    if datatype == "BYTES":
        array = _bytes_array(data, where)
    else:
        try:
            array = np.asarray(data)
        except ValueError:
            raise InvalidInput(
                f"{where}: nested 'data' is ragged (rows of different lengths)"
            ) from None
        if array.size and dtype.kind in "iu" and array.dtype.kind in "fO":
            # Integers beyond int64 make numpy fall back to float64 (losing digits) or object:
            # take those as exact Python ints instead.
            array = _exact_integers(data, datatype, where)
        if array.size and not _accepts(datatype, array.dtype.kind):
            got = _KIND_WORDS.get(array.dtype.kind, str(array.dtype))
            raise InvalidInput(f"{where}: expected {datatype} values in 'data', got {got}")
        if array.dtype.kind in "iu" and dtype.kind in "iu" and array.size:
            info = np.iinfo(dtype)  # type: ignore[type-var]
            if array.min() < info.min or array.max() > info.max:
                raise InvalidInput(
                    f"{where}: values out of range for {datatype} [{info.min}, {info.max}]"
                )
        if dtype.kind == "f":
            array = cast_floats(array, dtype, datatype, where)
        else:
            array = array.astype(dtype, copy=False)
    if shape is not None and array.shape != shape:
        expected = math.prod(shape)
        if array.size != expected:
            raise InvalidInput(
                f"{where}: shape {list(shape)} needs {expected} elements, 'data' has {array.size}"
            )
        array = array.reshape(shape)
    return array


def array_to_json(array: np.ndarray, datatype: str) -> Any:
    """A flat, row-major value orjson can write (numpy arrays pass through natively)."""
    if datatype == "BYTES":
        try:
            return [
                x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in array.reshape(-1)
            ]
        except UnicodeDecodeError:
            raise InvalidInput(
                "an output holds bytes that are not UTF-8; request it as binary data"
            ) from None
    if datatype == "BF16":
        array = array.astype(np.float32)
    return np.ascontiguousarray(array).reshape(-1)
