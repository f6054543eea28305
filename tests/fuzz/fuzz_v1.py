"""Fuzz target: a KServe V1 request body (`instances` or `inputs`, strings or {"b64": ...}
for BYTES), as POST /v1/models/NAME:predict reads it.

bytes -> rest.body.parse_json -> codecs.v1.decode_request for identity, mlp and minilm ->
validation -> for identity, its echo through codecs.v1.encode_response and orjson. Only
EmberError (InvalidInput) may escape.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import atheris
import orjson
from fuzzkit import corpus_args, json_tokens

with atheris.instrument_imports(include=["ember", "fuzzmodels"]):
    from fuzzmodels import CONFIGS, WORDS, echo

    from ember.server.codecs import v1
    from ember.server.errors import EmberError
    from ember.server.rest.body import parse_json
    from ember.server.rest.infer import JSON_OPTIONS
    from ember.server.validation import validate


def _nested(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


SEEDS = [
    orjson.dumps(doc)
    for doc in [
        {"instances": [[0.0] * 784, [1.0] * 784]},
        {"inputs": [[0.25] * 784]},
        {"instances": ["a sentence", "another"]},
        {"instances": [{"b64": "aGVsbG8="}, {"b64": ""}]},
        {"instances": [{"INPUT_INT32": [1, 2], "INPUT_BYTES": ["x", {"b64": "AP8="}]}]},
        {"inputs": {"INPUT_FP16": [[0.5, 2.0]], "INPUT_BOOL": [[True, False]]}},
        {"inputs": {"INPUT_UINT64": [[18446744073709551615]], "INPUT_BF16": [[1.5]]}},
        # a level short of the nesting limit
        {"inputs": {"INPUT_BYTES": _nested(["a"], 30)}},
    ]
]


def fuzz_one(data: bytes) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            body = parse_json(data)
        except EmberError:
            return
        for config in CONFIGS.values():
            try:
                request = v1.decode_request(body, config)
                validate(request, config)
                if config.name == "identity":
                    orjson.dumps(v1.encode_response(echo(request)), option=JSON_OPTIONS)
            except EmberError:
                pass


def main() -> None:
    atheris.Setup(corpus_args(sys.argv, "v1", SEEDS, json_tokens(*WORDS)), fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
