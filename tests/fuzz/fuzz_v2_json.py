"""Fuzz target: a V2 (Open Inference Protocol) JSON request body, as POST .../infer reads it.

bytes -> rest.body.parse_json -> codecs.v2.decode_request -> validation against identity, mlp
and minilm -> for identity, its echo through codecs.v2.encode_response and orjson, as the
server writes it. Only EmberError (InvalidInput) may escape.
"""

from __future__ import annotations

import sys
import warnings

import atheris
import orjson
from fuzzkit import corpus_args, json_tokens

with atheris.instrument_imports(include=["ember", "fuzzmodels"]):
    from fuzzmodels import WORDS, accepting, echo

    from ember.server.codecs import v2
    from ember.server.errors import EmberError
    from ember.server.rest.body import parse_json
    from ember.server.rest.infer import JSON_OPTIONS

SEEDS = [
    orjson.dumps(doc)
    for doc in [
        {"inputs": [{"name": "INPUT_INT32", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}]},
        {"id": "r1", "inputs": [{"name": "INPUT_FP32", "datatype": "FP32", "shape": [2, 2],
                                 "data": [[1.5, 2.0], [3.0, -4.25]]}],
         "outputs": [{"name": "OUTPUT_FP32"}]},
        {"inputs": [{"name": "INPUT_BYTES", "datatype": "BYTES", "shape": [1, 2],
                     "data": ["a", "é"]},
                    {"name": "INPUT_BOOL", "datatype": "BOOL", "shape": [1, 1], "data": [True]}],
         "parameters": {"binary_data_output": True, "timeout": 1000000}},
        {"inputs": [{"name": "INPUT_UINT64", "datatype": "UINT64", "shape": [1, 1],
                     "data": [18446744073709551615]},
                    {"name": "INPUT_INT8", "datatype": "INT8", "shape": [1, 2],
                     "data": [-128, 127]}],
         "outputs": [{"name": "OUTPUT_INT8", "parameters": {"binary_data": True}}]},
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.5] * 784}]},
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["hi", "there"]}]},
        {"inputs": [{"name": "INPUT_FP64", "datatype": "FP64", "shape": [0, 3], "data": []}]},
        # binary data announced in a request without the binary extension's header
        {"inputs": [{"name": "INPUT_FP32", "datatype": "FP32", "shape": [1, 1],
                     "parameters": {"binary_data_size": 4}}]},
    ]
]  # fmt: skip


def fuzz_one(data: bytes) -> None:
    with warnings.catch_warnings():
        # A RuntimeWarning on the request path (an overflowing cast) is a silent wrong answer.
        warnings.simplefilter("error", RuntimeWarning)
        try:
            request = v2.decode_request(parse_json(data), "identity", None)
            if any(config.name == "identity" for config in accepting(request)):
                doc, blobs = v2.encode_response(echo(request), v2.binary_outputs(request))
                orjson.dumps(doc, option=JSON_OPTIONS)
                b"".join(blobs)
        except EmberError:
            pass


def main() -> None:
    atheris.Setup(corpus_args(sys.argv, "v2_json", SEEDS, json_tokens(*WORDS)), fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
