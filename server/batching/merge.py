"""Merging requests into one batch along the first dimension, and splitting outputs back.

An input that declares `pad_value` may differ in its one variable non-batch dimension: the
batch is padded to the longest request, and outputs marked `unpad` are cut back to each
request's own length.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Padding:
    dim: int
    value: float | int | bool


def shape_key(inputs: Mapping[str, np.ndarray], padding: Mapping[str, Padding]) -> Hashable:
    """Requests with equal keys can share a batch."""
    key = []
    for name in sorted(inputs):
        shape = inputs[name].shape[1:]
        pad = padding.get(name)
        if pad is not None:
            shape = tuple(-1 if i + 1 == pad.dim else d for i, d in enumerate(shape))
        key.append((name, shape))
    return tuple(key)


def own_length(inputs: Mapping[str, np.ndarray], padding: Mapping[str, Padding]) -> int | None:
    """The request's length along its padded dimension (the longest of its padded inputs)."""
    lengths = [inputs[n].shape[p.dim] for n, p in padding.items() if n in inputs]
    return max(lengths) if lengths else None


def merge(
    requests: Sequence[Mapping[str, np.ndarray]], padding: Mapping[str, Padding]
) -> dict[str, np.ndarray]:
    if len(requests) == 1:
        return dict(requests[0])
    merged = {}
    for name in requests[0]:
        parts = [r[name] for r in requests]
        pad = padding.get(name)
        if pad is not None:
            longest = max(p.shape[pad.dim] for p in parts)
            parts = [_pad(p, pad, longest) for p in parts]
        merged[name] = np.concatenate(parts, axis=0)
    return merged


def _pad(array: np.ndarray, pad: Padding, length: int) -> np.ndarray:
    missing = length - array.shape[pad.dim]
    if missing == 0:
        return array
    widths = [(0, 0)] * array.ndim
    widths[pad.dim] = (0, missing)
    return np.pad(array, widths, constant_values=pad.value)


def split(
    outputs: Mapping[str, np.ndarray],
    rows: Sequence[int],
    lengths: Sequence[int | None],
    unpad: Mapping[str, int],
) -> list[dict[str, np.ndarray]]:
    """Each request's rows of every output (views, no copies); `unpad` maps an output to the
    dimension cut back to the request's own length."""
    if len(rows) == 1:
        return [dict(outputs)]
    result: list[dict[str, np.ndarray]] = [{} for _ in rows]
    for name, array in outputs.items():
        dim = unpad.get(name)
        start = 0
        for i, count in enumerate(rows):
            part = array[start : start + count]
            start += count
            length = lengths[i]
            if dim is not None and length is not None:
                index = [slice(None)] * part.ndim
                index[dim] = slice(0, length)
                part = part[tuple(index)]
            result[i][name] = part
    return result
