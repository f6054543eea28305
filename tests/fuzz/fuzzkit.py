"""What the harnesses in tests/fuzz share: their command line, and the seeded mutations the
deterministic tests feed them without atheris.

Each harness is one module `fuzz_<target>.py` with `SEEDS` (small valid inputs), a
`fuzz_one(data: bytes) -> None` that lets only the project's typed input errors escape, and a
`main()` for atheris. test_fuzz.py runs both halves; README.md has the commands for long runs.
"""

from __future__ import annotations

import copy
import random
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]


def corpus_args(
    argv: list[str], target: str, seeds: Sequence[bytes], tokens: Sequence[bytes] = ()
) -> list[str]:
    """`argv` for atheris.Setup, with a corpus folder that starts from `seeds`.

    With no folder or file named, a folder under the temp directory (kept between runs, so a
    long run resumes from what the last one found) is added. A named folder that is empty gets
    the seeds first; a named file is replayed, as libFuzzer does with a crash file. `tokens`
    become libFuzzer's mutation dictionary (FOLDER.dict, beside the corpus folder) unless the
    command line names one (-dict=).
    """
    paths = [Path(a) for a in argv[1:] if not a.startswith("-")]
    if not paths:
        folder = Path(tempfile.gettempdir()) / f"ember-fuzz-{target}"
        folder.mkdir(exist_ok=True)
        paths = [folder]
        argv = [*argv, str(folder)]
    for path in paths:
        if path.is_dir() and not any(path.iterdir()):
            for i, seed in enumerate(seeds):
                (path / f"seed-{i:03d}").write_bytes(seed)
    if tokens and not any(a.startswith("-dict=") for a in argv):
        folders = [p for p in paths if p.is_dir()]
        where = folders[0].parent if folders else Path(tempfile.gettempdir())
        dictionary = where / f"{folders[0].name if folders else 'ember-fuzz-' + target}.dict"
        dictionary.write_text("".join(f'"{_escaped(t)}"\n' for t in tokens), encoding="ascii")
        argv = [*argv, f"-dict={dictionary}"]
    return argv


def _escaped(token: bytes) -> str:
    # libFuzzer's dictionary format: printable ASCII as is, the rest as \xNN.
    return "".join(chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in token)


def json_tokens(*words: str) -> list[bytes]:
    """Dictionary entries for a JSON target: each word quoted, and JSON's own punctuation."""
    return [orjson.dumps(w) for w in words] + [b":", b"[", b"]", b"{", b"}", b",", b"null"]


# Byte strings that sit on the edges decoders check: sizes, signs, number limits, nesting.
_TOKENS = [
    b"0", b"-1", b"1e400", b"-0", b"18446744073709551616", b"9223372036854775808", b"null",
    b"true", b"[]", b"{}", b'""', b"\xff", b"\x00", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80",
    b"\x01\x00\x00\x00", b"[" * 40, b"]" * 40, b'{"b64":"AA=="}', b'"BYTES"', b'"FP16"',
    b"\xb2", b"9" * 30,
]  # fmt: skip

# JSON values that sit on the same edges, for mutations that keep a document well-formed.
_VALUES: list[Any] = [
    0, -1, 1, 2**31, 2**63, 2**64 - 1, -(2**63), 1.5, 1e300, -1e300, True, False, None, "",
    "x", "INT32", "FP32", "BYTES", "FP16", "BOOL", "UINT64", [], [[]], {}, [0] * 40,
    [0, 2**62], [2**32, 2**32], {"b64": "AA=="}, {"b64": "!!"}, {"binary_data_size": 4},
    [[1, 2], [3]], [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
    ["a", 1], [1, None], [True, 1], "é", "\x00",
]  # fmt: skip


def _mutate_bytes(data: bytes, rng: random.Random, seeds: Sequence[bytes]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(out))
        op = rng.randrange(7)
        if op == 0 and out:
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif op == 2:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and out:
            end = min(len(out), at + rng.randint(1, 16))
            del out[at:end]
        elif op == 4:
            out[at:at] = rng.choice(_TOKENS)
        elif op == 5:
            other = rng.choice(seeds)
            cut = rng.randint(0, len(other))
            out = out[:at] + bytearray(other[cut:])
        else:
            del out[at:]
    return bytes(out)


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _nodes(value, (*path, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc[:8]):
            yield from _nodes(value, (*path, i))


def _value(rng: random.Random) -> Any:
    # A copy: the table's lists must not become part of (and grow with) a document.
    return copy.deepcopy(rng.choice(_VALUES))


def _mutate_json(doc: Any, rng: random.Random) -> Any:
    for _ in range(rng.randint(1, 3)):
        paths = list(_nodes(doc))
        # The document itself is swapped only when it has nothing inside to change.
        path = rng.choice(paths[1:] or paths)
        if not path:
            return _value(rng)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = rng.randrange(4)
        if op == 0 and isinstance(parent, dict):
            del parent[key]
        elif op == 1 and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        elif op == 2 and isinstance(parent, dict):
            parent[rng.choice(["data", "shape", "datatype", "name", "parameters", "x"])] = _value(
                rng
            )
        else:
            parent[key] = _value(rng)
    return doc


def mutate(data: bytes, rng: random.Random, seeds: Sequence[bytes]) -> bytes:
    """One mutant of `data`: a document with a value swapped when `data` is JSON (most of
    the time), else bytes flipped, inserted, cut or spliced."""
    if rng.random() < 0.6:
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
        else:
            return orjson.dumps(_mutate_json(doc, rng))
    return _mutate_bytes(data, rng, seeds)


def mutations(seeds: Sequence[bytes], count: int, seed: int = 0) -> Iterator[bytes]:
    """`count` mutants of `seeds`, the same ones on every run for the same `seed`."""
    rng = random.Random(seed)
    for _ in range(count):
        yield mutate(rng.choice(seeds), rng, seeds)
