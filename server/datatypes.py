"""Open Inference Protocol datatypes and their numpy / torch counterparts."""

from __future__ import annotations

from typing import Final

import ml_dtypes
import numpy as np
import torch

NUMPY_DTYPES: Final[dict[str, np.dtype[np.generic]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    # BYTES tensors are object arrays whose elements are `bytes`.
    "BYTES": np.dtype(np.object_),
}

DATATYPES: Final[tuple[str, ...]] = tuple(NUMPY_DTYPES)

TORCH_DTYPES: Final[dict[str, torch.dtype]] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "UINT16": torch.uint16,
    "UINT32": torch.uint32,
    "UINT64": torch.uint64,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}

_BY_NUMPY: Final[dict[np.dtype[np.generic], str]] = {v: k for k, v in NUMPY_DTYPES.items()}
_BY_TORCH: Final[dict[torch.dtype, str]] = {v: k for k, v in TORCH_DTYPES.items()}


def numpy_dtype(datatype: str) -> np.dtype[np.generic]:
    return NUMPY_DTYPES[datatype]


def datatype_of_numpy(dtype: np.dtype[np.generic]) -> str | None:
    if dtype.kind in "SU":
        return "BYTES"
    return _BY_NUMPY.get(dtype)


def datatype_of_torch(dtype: torch.dtype) -> str | None:
    return _BY_TORCH.get(dtype)


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """Zero-copy where numpy and torch share the dtype; bfloat16 goes through an int16 view."""
    if not array.flags.writeable:
        # Arrays over a request body are read-only; torch wants memory it may write to.
        array = array.copy()
    if array.dtype == NUMPY_DTYPES["BF16"]:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def torch_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(NUMPY_DTYPES["BF16"])
    return tensor.numpy()
