"""Fuzz target: a model.toml file, read as `ember serve` reads each model folder at startup.

bytes -> model.toml in a folder -> config.load_model_config (tomllib, then
ModelConfig.model_validate) -> what the server derives from a valid config: the weights path,
batch and CUDA graph sizes, the Triton config document. A file that cannot be used must end
in ConfigError (one line naming the file and the field); anything else would be a traceback
at startup.
"""

from __future__ import annotations

import sys
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path

import atheris
from fuzzkit import ROOT, corpus_args
from pydantic import BaseModel

with atheris.instrument_imports(include=["ember"]):
    from ember.server.codecs.triton_config import model_config
    from ember.server.config import ModelConfig, load_model_config
    from ember.server.errors import ConfigError


SEEDS = sorted(
    path.read_bytes()
    for path in [*(ROOT / "models").glob("*/model.toml"), *(ROOT / "tests").glob("**/model.toml")]
)


def _keys(model: type[BaseModel]) -> Iterator[str]:
    for name, field in model.model_fields.items():
        yield field.alias or name
        for inner in typing.get_args(field.annotation) or (field.annotation,):
            for part in typing.get_args(inner) or (inner,):
                if isinstance(part, type) and issubclass(part, BaseModel):
                    yield from _keys(part)


# Every key the schema knows and the section headers, for libFuzzer's mutation dictionary.
TOKENS = sorted(
    {f"{key} = ".encode() for key in _keys(ModelConfig)}
    | {b"[batching]", b"[scaling]", b"[pipeline]", b"[[inputs]]", b"[[outputs]]",
       b"[[pipeline.inputs]]", b"[[pipeline.outputs]]", b"[[pipeline.preprocess]]",
       b'"auto"', b'"cuda:0"', b'"FP32"', b'"BYTES"', b"-1", b"true", b"[-1, -1]"}
)  # fmt: skip


def fuzz_one(data: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="ember-fuzz-") as temp:
        folder = Path(temp) / "fuzzed"
        folder.mkdir()
        (folder / "model.toml").write_bytes(data)
        try:
            config = load_model_config(folder)
            config.weights_path(folder)
        except ConfigError:
            return
    assert config.batch_limit >= 0
    sizes = config.graph_batch_sizes
    assert list(sizes) == sorted(set(sizes))
    for spec in (*config.request_inputs, *config.request_outputs):
        spec.variable_dim()
    model_config(config, "cpu")


def main() -> None:
    atheris.Setup(corpus_args(sys.argv, "model_toml", SEEDS, TOKENS), fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
