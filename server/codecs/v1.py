"""KServe V1 documents (`instances` or `inputs` -> `predictions`) and the internal types."""

from __future__ import annotations

from typing import Any

import numpy as np

from ember.server.codecs.json_tensors import array_from_json
from ember.server.config import ModelConfig, TensorSpec
from ember.server.datatypes import NUMPY_DTYPES
from ember.server.errors import InvalidInput
from ember.server.request import InferRequest, InferResponse, Tensor

# V1 carries no datatypes: half floats travel as ordinary JSON numbers and are cast after.
_JSON_CARRIER = {"FP16": "FP32", "BF16": "FP32"}


def _target(config: ModelConfig) -> TensorSpec:
    if len(config.inputs) == 1:
        return config.inputs[0]
    required = [s for s in config.inputs if not s.optional]
    if len(required) == 1:
        return required[0]
    names = [s.name for s in config.inputs]
    raise InvalidInput(
        f"model '{config.name}' has inputs {names}: send each instance as an object keyed by "
        "input name"
    )


def _tensor(spec: TensorSpec, data: Any, where: str) -> Tensor:
    carrier = _JSON_CARRIER.get(spec.datatype, spec.datatype)
    array = array_from_json(data, carrier, None, where)
    if carrier != spec.datatype:
        array = array.astype(NUMPY_DTYPES[spec.datatype])
    return Tensor(name=spec.name, datatype=spec.datatype, data=array)


def _columns(rows: list[Any], config: ModelConfig) -> list[Tensor]:
    specs = {s.name: s for s in config.inputs}
    if all(isinstance(r, dict) for r in rows):
        keys = list(rows[0])
        for i, row in enumerate(rows):
            if list(row) != keys:
                raise InvalidInput(
                    f"instances[{i}]: keys {list(row)} differ from instances[0]'s {keys}"
                )
        tensors = []
        for key in keys:
            spec = specs.get(key)
            if spec is None:
                raise InvalidInput(
                    f"instances: unknown input '{key}' for model '{config.name}', "
                    f"expected one of {list(specs)}"
                )
            tensors.append(_tensor(spec, [row[key] for row in rows], f"instances '{key}'"))
        return tensors
    spec = _target(config)
    return [_tensor(spec, rows, "instances")]


def decode_request(body: Any, config: ModelConfig) -> InferRequest:
    if not isinstance(body, dict):
        raise InvalidInput(f"request body must be a JSON object, got {type(body).__name__}")
    if "instances" in body:
        rows = body["instances"]
        if not isinstance(rows, list) or not rows:
            raise InvalidInput("request body: 'instances' must be a non-empty list")
        inputs = _columns(rows, config)
    elif "inputs" in body:
        columns = body["inputs"]
        if isinstance(columns, dict):
            specs = {s.name: s for s in config.inputs}
            unknown = [k for k in columns if k not in specs]
            if unknown or not columns:
                raise InvalidInput(
                    f"request body: 'inputs' keys {list(columns)} must be input names of "
                    f"'{config.name}': {list(specs)}"
                )
            inputs = [_tensor(specs[k], v, f"inputs '{k}'") for k, v in columns.items()]
        elif isinstance(columns, list) and columns:
            inputs = [_tensor(_target(config), columns, "inputs")]
        else:
            raise InvalidInput("request body: 'inputs' must be a non-empty list or an object")
    else:
        raise InvalidInput("request body: expected 'instances' (or 'inputs')")
    return InferRequest(model_name=config.name, model_version=None, inputs=inputs)


def _plain(tensor: Tensor) -> Any:
    if tensor.datatype == "BYTES":
        flat = [
            x.decode("utf-8", "replace") if isinstance(x, bytes) else x
            for x in tensor.data.reshape(-1)
        ]
        return np.array(flat, dtype=object).reshape(tensor.data.shape).tolist()
    if tensor.datatype == "BF16":
        return np.ascontiguousarray(tensor.data.astype(np.float32))
    return np.ascontiguousarray(tensor.data)


def encode_response(response: InferResponse) -> dict[str, Any]:
    """One output: its rows. Several: one object per row, keyed by output name."""
    if len(response.outputs) == 1:
        return {"predictions": _plain(response.outputs[0])}
    columns = {t.name: _plain(t) for t in response.outputs}
    rows = min((len(c) for c in columns.values()), default=0)
    return {"predictions": [{name: col[i] for name, col in columns.items()} for i in range(rows)]}
