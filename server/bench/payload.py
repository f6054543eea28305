"""What every protocol sends and expects back, chosen once from the model's declaration.

The same tensors go over each wire protocol, so their rows differ only by the protocol. Pure
(numpy, no sockets): tested without a server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ember.server.bench.errors import BenchError
from ember.server.config import TensorSpec
from ember.server.datatypes import NUMPY_DTYPES, numpy_dtype


@dataclass(frozen=True, slots=True)
class Payload:
    """The request every protocol encodes, and what its answer must hold."""

    model: str
    specs: tuple[TensorSpec, ...]  # the inputs sent, in order, with concrete shapes
    inputs: Mapping[str, np.ndarray]
    outputs: tuple[str, ...]  # outputs the answer must hold; () = any, at least one
    # Whether requests name `outputs`; if not, the server answers every output the model
    # gives (what the V2 JSON request always did, so its body stays as it was).
    name_outputs: bool = False

    @property
    def request_bytes(self) -> int:
        """Tensor bytes sent per request, whatever the encoding on the wire."""
        return sum(array.nbytes for array in self.inputs.values())


def select_inputs(
    specs: Sequence[TensorSpec], names: Sequence[str] = (), shape: Sequence[int] | None = None
) -> list[TensorSpec]:
    """The inputs to send (`names`, default every declared one), each with a concrete shape:
    `shape` when given (it must fit the declaration), else the declared one with -1 -> 1."""
    declared = {spec.name: spec for spec in specs}
    unknown = [name for name in names if name not in declared]
    if unknown:
        raise BenchError(f"unknown input(s) {unknown}; the model declares {list(declared)}")
    chosen = [declared[name] for name in names] if names else list(specs)
    selected = []
    for spec in chosen:
        if shape is None:
            dims = [1 if d == -1 else d for d in spec.shape]
        else:
            fits = len(shape) == len(spec.shape) and all(
                d in (-1, s) for s, d in zip(shape, spec.shape, strict=True)
            )
            if not fits:
                raise BenchError(
                    f"input '{spec.name}': --shape {list(shape)} does not fit the declared "
                    f"{spec.shape} (-1 = any size)"
                )
            dims = list(shape)
        selected.append(spec.model_copy(update={"shape": dims}))
    return selected


def select_outputs(
    declared_outputs: Sequence[str],
    declared_inputs: Sequence[str],
    sent_inputs: Sequence[str],
    explicit: Sequence[str] = (),
) -> tuple[tuple[str, ...], bool]:
    """(outputs the answer must hold, whether the request names them).

    `explicit` (--output) wins. With every declared input sent, the model gives every output:
    none is named. With only some (optional inputs left out, as identity's), the outputs named
    like the inputs sent (INPUT_FP32 -> OUTPUT_FP32, Triton's convention) when the model
    declares them all; otherwise none is named and any answer with an output is accepted.
    """
    if explicit:
        unknown = [name for name in explicit if name not in declared_outputs]
        if unknown:
            raise BenchError(
                f"unknown output(s) {unknown}; the model declares {list(declared_outputs)}"
            )
        return tuple(explicit), True
    if set(sent_inputs) >= set(declared_inputs):
        return tuple(declared_outputs), False
    paired = tuple(name.replace("INPUT", "OUTPUT", 1) for name in sent_inputs)
    if all(name in declared_outputs for name in paired):
        return paired, True
    return (), False


def build_inputs(specs: Sequence[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for the declared specs: every -1 dimension becomes 1 (batch 1)."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = tuple(1 if d == -1 else d for d in spec.shape)
        if spec.datatype == "BYTES":
            raise BenchError(f"input '{spec.name}': BYTES inputs are not generated yet")
        dtype = numpy_dtype(spec.datatype)
        if spec.datatype == "BOOL":
            array = rng.random(shape) < 0.5
        elif dtype.kind in "iu":
            array = rng.integers(0, 10, size=shape).astype(dtype)
        else:
            array = rng.standard_normal(shape).astype(dtype)
        inputs[spec.name] = array
    return inputs


def tensor_bytes(datatype: str, shape: Sequence[int]) -> int | None:
    """Bytes of a fixed-size tensor on the wire (raw, unpadded); None for BYTES (variable
    size) and for a datatype this server does not know."""
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None or datatype == "BYTES":
        return None
    return math.prod(shape) * dtype.itemsize


def raw_bytes(array: np.ndarray) -> bytes:
    """The tensor as the binary extension and gRPC carry it: little-endian, row-major."""
    if array.dtype.itemsize > 1 and array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()
