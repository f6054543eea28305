"""Fuzz target: a safetensors weights file (8-byte little-endian header length, JSON header,
tensor bytes), read both ways models load it.

1. Ember's own header parser and placement (`weights/header.py`, `weights/placement.py`: what
   streams weights onto a device), fed the file in pieces. A file it refuses must end in
   `HeaderError`; a file it accepts must also be accepted by the safetensors package, with
   byte-identical tensors (it may refuse more, never less).
2. `loading._load_state_dict`, which hands the file to the safetensors package. A file that
   does not parse must end in safetensors' own SafetensorError; a Rust panic (PanicException,
   a BaseException that `except Exception` does not catch) or any other error escaping is a
   finding.
"""

from __future__ import annotations

import itertools
import os
import re
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris
import orjson
import torch
from fuzzkit import corpus_args
from safetensors import SafetensorError
from safetensors.torch import save

with atheris.instrument_imports(include=["ember"]):
    from ember.server.loading import _load_state_dict
    from ember.server.weights.header import HeaderError, parse_header
    from ember.server.weights.placement import TensorPlacement

# Each input is written to a file, as the loader reads files: on tmpfs where there is one.
_SHM = Path("/dev/shm")
_FILE = Path(_SHM if _SHM.is_dir() else tempfile.gettempdir()) / f"ember-fuzz-{os.getpid()}"
_CPU = torch.device("cpu")


def _covered(header: bytes) -> int:
    """The data size a header declares (its largest end offset), so that a mutated header
    comes with as many bytes as it asks for; 0 when it is not JSON of that form."""
    try:
        doc = orjson.loads(header)
        ends = [v["data_offsets"][1] for k, v in doc.items() if k != "__metadata__"]
        return max((e for e in ends if type(e) is int and 0 <= e <= 1 << 16), default=0)
    except (orjson.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError):
        return 0


def _file(data: bytes) -> bytes:
    """Byte 0 even: the rest is the whole file. Odd: the rest is the JSON header, given its
    length prefix and the bytes it declares. The safetensors parser is native code, which
    atheris cannot see into; the second form keeps blind mutations on the header's JSON."""
    if data and data[0] % 2:
        header = data[1:]
        return struct.pack("<Q", len(header)) + header + bytes(_covered(header))
    return data[1:]


SEEDS = [
    b"\x00" + save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}),
    b"\x00"
    + save(
        {"a": torch.zeros(0, 4, dtype=torch.int64), "b": torch.ones(3, dtype=torch.bfloat16)},
        metadata={"format": "pt"},
    ),
    b"\x00"
    + save({"m": torch.tensor([True, False]), "h": torch.tensor([1.5], dtype=torch.float16)}),
    b"\x01{}",
    b'\x01{"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}',
    b'\x01{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},'
    b'"b":{"dtype":"I64","shape":[],"data_offsets":[16,24]}}',
]


def _marks(count: int) -> list[Callable[[], None]]:
    """`count` functions with code of their own, each instrumented: calling one gives atheris
    an edge no other call gives."""
    marks = []
    for i in range(count):
        namespace: dict[str, Any] = {}
        exec(f"def mark_{i}():\n    return None\n", namespace)  # a distinct code object each
        marks.append(atheris.instrument_func(namespace[f"mark_{i}"]))
    return marks


# The parser is native code: atheris sees none of its branches, and libFuzzer would shrink the
# corpus to one input. Marking which outcome an input reached (the error's wording, or the
# dtypes and ranks it loaded) gives it something to keep inputs for.
_MARKS = _marks(256)


# What follows the first quote or digit in a message comes from the input: the text before it
# is the kind of outcome, not one per input.
_VARIABLE = re.compile(r"[\"'`\d]")


def _reached(outcome: str) -> None:
    _MARKS[zlib.crc32(outcome.encode()) % len(_MARKS)]()


def _placed(file: bytes) -> dict[str, torch.Tensor] | None:
    """The tensors Ember's placement builds from `file`, given in three pieces; None when its
    parser refuses the file."""
    try:
        header = parse_header(file, len(file))
    except HeaderError:
        return None
    placement = TensorPlacement(header, _CPU)
    view = memoryview(file)
    cuts = sorted({0, len(file), len(file) // 3, (2 * len(file)) // 3})
    for start, end in itertools.pairwise(cuts):
        placement.write_at(start, view[start:end])
    placement.finish()
    return placement.tensors


def _bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.reshape(-1).view(torch.uint8).numpy())


def fuzz_one(data: bytes) -> None:
    file = _file(data)
    placed = _placed(file)
    _FILE.write_bytes(file)
    try:
        state = _load_state_dict(_FILE, "model.safetensors", _CPU)
    except SafetensorError as exc:
        if placed is not None:
            raise AssertionError(f"Ember placed a file safetensors refuses: {exc}") from None
        _reached(_VARIABLE.split(str(exc), maxsplit=1)[0])
        return
    finally:
        _FILE.unlink()
    _reached(repr(sorted({(str(t.dtype), t.dim()) for t in state.values()})))
    for tensor in state.values():
        # Every tensor must be readable in full: the header's offsets were checked.
        tensor.clone()
    if placed is not None:
        assert placed.keys() == state.keys(), (sorted(placed), sorted(state))
        for name, tensor in state.items():
            mine = placed[name]
            assert (mine.dtype, mine.shape) == (tensor.dtype, tensor.shape), name
            assert _bytes(mine) == _bytes(tensor), name


def main() -> None:
    atheris.Setup(corpus_args(sys.argv, "safetensors", SEEDS), fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
