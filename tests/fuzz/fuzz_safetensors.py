"""Fuzz target: a safetensors weights file (8-byte little-endian header length, JSON header,
tensor bytes), read the way models load it.

Ember has no safetensors header parser of its own yet (issue 5's streaming loader will have
one): the target is `loading._load_state_dict`, the one place weights files are opened, which
hands the file to the safetensors package. A file that does not parse must end in
safetensors' own SafetensorError; a Rust panic (PanicException, a BaseException that
`except Exception` does not catch) or any other error escaping is a finding.
"""

from __future__ import annotations

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


def fuzz_one(data: bytes) -> None:
    _FILE.write_bytes(_file(data))
    try:
        state = _load_state_dict(_FILE, "model.safetensors", _CPU)
    except SafetensorError as exc:
        _reached(_VARIABLE.split(str(exc), maxsplit=1)[0])
        return
    finally:
        _FILE.unlink()
    _reached(repr(sorted({(str(t.dtype), t.dim()) for t in state.values()})))
    for tensor in state.values():
        # Every tensor must be readable in full: the header's offsets were checked.
        tensor.clone()


def main() -> None:
    atheris.Setup(corpus_args(sys.argv, "safetensors", SEEDS), fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
