"""Fuzz target: a V2 request in Triton's binary tensor extension, as POST .../infer reads it
when the request has an `Inference-Header-Content-Length` header.

Input layout: byte 0 is the length n of the header's value, bytes 1..n are the value (read as
latin-1, as the HTTP front decodes headers), the rest is the body: JSON, then the tensors'
raw bytes. bytes -> rest.body.split_binary_body -> parse_json -> codecs.v2.decode_request
(each input's `binary_data_size` slice through codecs.raw) -> validation -> identity's echo
back out as binary outputs. Only EmberError (InvalidInput) may escape.
"""

from __future__ import annotations

import struct
import sys
import warnings
from typing import Any

import atheris
import orjson
from fuzzkit import corpus_args, json_tokens

with atheris.instrument_imports(include=["ember", "fuzzmodels"]):
    from fuzzmodels import WORDS, accepting, echo

    from ember.server.codecs import v2
    from ember.server.errors import EmberError
    from ember.server.rest.body import parse_json, split_binary_body
    from ember.server.rest.infer import JSON_OPTIONS


def _request(doc: dict[str, Any], *blobs: bytes, header: str | None = None) -> bytes:
    json_part = orjson.dumps(doc)
    value = (str(len(json_part)) if header is None else header).encode("latin-1")
    return bytes([len(value)]) + value + json_part + b"".join(blobs)


def _binary(name: str, datatype: str, shape: list[int], blob: bytes) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape,
            "parameters": {"binary_data_size": len(blob)}}  # fmt: skip


_F32 = struct.pack("<2f", 1.5, -2.0)
_STRINGS = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
_F16 = struct.pack("<2e", 0.5, 65504.0)

SEEDS = [
    _request({"inputs": [_binary("INPUT_FP32", "FP32", [1, 2], _F32)]}, _F32),
    _request(
        {
            "inputs": [
                _binary("INPUT_BYTES", "BYTES", [1, 2], _STRINGS),
                {"name": "INPUT_INT32", "datatype": "INT32", "shape": [1, 1], "data": [7]},
            ],
            "outputs": [
                {"name": "OUTPUT_BYTES", "parameters": {"binary_data": True}},
                {"name": "OUTPUT_INT32"},
            ],
        },
        _STRINGS,
    ),
    _request(
        {
            "inputs": [
                _binary("INPUT_FP16", "FP16", [2, 1], _F16),
                _binary("INPUT_BOOL", "BOOL", [1, 3], b"\x01\x00\x01"),
            ],
            "parameters": {"binary_data_output": True},
        },
        _F16,
        b"\x01\x00\x01",
    ),
    _request({"inputs": [_binary("INPUT_UINT8", "UINT8", [0, 4], b"")]}),
    _request(
        {"inputs": [_binary("INPUT_INT64", "INT64", [1, 1], b"\xff" * 8)]},
        b"\xff" * 8,
        header="0062",
    ),
]


def fuzz_one(data: bytes) -> None:
    length = data[0] if data else 0
    header = data[1 : 1 + length].decode("latin-1")
    body = data[1 + length :]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            json_part, binary = split_binary_body(body, header)
            request = v2.decode_request(parse_json(json_part), "identity", None, binary)
            if any(config.name == "identity" for config in accepting(request)):
                doc, blobs = v2.encode_response(echo(request), v2.binary_outputs(request))
                orjson.dumps(doc, option=JSON_OPTIONS)
                b"".join(blobs)
        except EmberError:
            pass


def main() -> None:
    atheris.Setup(corpus_args(sys.argv, "binary_body", SEEDS, json_tokens(*WORDS)), fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
