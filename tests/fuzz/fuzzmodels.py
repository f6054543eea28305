"""The model configurations the request harnesses decode against, and the identity model's
echo (its answer is its request), so a decoded request also goes back out through the encoder.

Imported by the harnesses inside `atheris.instrument_imports()`: the project modules it pulls
in are the ones atheris instruments.
"""

from __future__ import annotations

from fuzzkit import ROOT

from ember.server.config import ModelConfig, load_model_config
from ember.server.datatypes import DATATYPES
from ember.server.errors import InvalidInput
from ember.server.request import InferRequest, InferResponse, Tensor
from ember.server.validation import validate

# identity: every datatype, optional inputs; mlp: one fixed-shape FP32 input and a batch
# limit; minilm: a pipeline whose one request input is BYTES (V1's {"b64": ...} path).
CONFIGS: dict[str, ModelConfig] = {
    name: load_model_config(ROOT / "models" / name) for name in ("identity", "mlp", "minilm")
}


# Words the request decoders look for, for the JSON targets' mutation dictionaries.
WORDS: list[str] = sorted(
    {"inputs", "outputs", "id", "parameters", "name", "datatype", "shape", "data",
     "binary_data_size", "binary_data", "binary_data_output", "timeout", "instances", "b64",
     *DATATYPES,
     *(s.name for c in CONFIGS.values() for s in (*c.request_inputs, *c.request_outputs))}
)  # fmt: skip


def accepting(request: InferRequest) -> list[ModelConfig]:
    """The models `request` is a valid request for (validation's InvalidInput is expected)."""
    found = []
    for config in CONFIGS.values():
        try:
            validate(request, config)
        except InvalidInput:
            continue
        found.append(config)
    return found


def echo(request: InferRequest) -> InferResponse:
    """What models/identity answers to a request it accepted."""
    # Validation has checked each input's datatype: OUTPUT_X is declared with INPUT_X's.
    outputs = [
        Tensor("OUTPUT_" + t.name.removeprefix("INPUT_"), t.datatype, t.data)
        for t in request.inputs
    ]
    if request.outputs is not None:
        wanted = {o.name for o in request.outputs}
        outputs = [t for t in outputs if t.name in wanted]
    return InferResponse("identity", outputs, "1", request.id)
