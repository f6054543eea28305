"""KServe V1 documents (`instances` or `inputs` -> `predictions`) and the internal types."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from ember.server.codecs.json_tensors import array_from_json, cast_floats
from ember.server.codecs.raw import MAX_DIMS
from ember.server.config import ModelConfig, TensorSpec
from ember.server.datatypes import NUMPY_DTYPES
from ember.server.errors import InvalidInput
from ember.server.request import InferRequest, InferResponse, Tensor

# V1 carries no datatypes: half floats travel as ordinary JSON numbers and are cast after.
_JSON_CARRIER = {"FP16": "FP32", "BF16": "FP32"}


def _target(config: ModelConfig) -> TensorSpec:
    if len(config.request_inputs) == 1:
        return config.request_inputs[0]
    required = [s for s in config.request_inputs if not s.optional]
    if len(required) == 1:
        return required[0]
    names = [s.name for s in config.request_inputs]
    raise InvalidInput(
        f"model '{config.name}' has inputs {names}: send each instance as an object keyed by "
        "input name"
    )


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and list(value) == ["b64"]


def _element(value: Any, where: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    if _is_b64(value) and isinstance(value["b64"], str):
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{where}: 'b64' is not valid base64") from None
    kind = type(value).__name__
    raise InvalidInput(f'{where}: expected a string or {{"b64": "..."}}, got {kind}')


def _leaves(value: Any, where: str, depth: int = 0) -> Any:
    if isinstance(value, list):
        # Deeper than any array can be, and deep enough to hit Python's recursion limit.
        if depth == MAX_DIMS:
            raise InvalidInput(f"{where}: data nested deeper than {MAX_DIMS} levels")
        return [_leaves(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    return _element(value, where)


def _bytes_tensor(spec: TensorSpec, data: Any, where: str) -> Tensor:
    """Strings, or binary data as `{"b64": "..."}` (KServe's and TF Serving's V1 convention)."""
    leaves = _leaves(data, where)
    try:
        array = np.array(leaves, dtype=object)
    except ValueError:
        array = None
    if array is None or any(isinstance(x, list) for x in array.reshape(-1)):
        raise InvalidInput(f"{where}: nested data is ragged (rows of different lengths)")
    return Tensor(name=spec.name, datatype="BYTES", data=array)


def _tensor(spec: TensorSpec, data: Any, where: str) -> Tensor:
    if spec.datatype == "BYTES":
        return _bytes_tensor(spec, data, where)
    carrier = _JSON_CARRIER.get(spec.datatype, spec.datatype)
    array = array_from_json(data, carrier, None, where)
    if carrier != spec.datatype:
        array = cast_floats(array, NUMPY_DTYPES[spec.datatype], spec.datatype, where)
    return Tensor(name=spec.name, datatype=spec.datatype, data=array)


def _columns(rows: list[Any], config: ModelConfig) -> list[Tensor]:
    specs = config.request_input_specs
    if all(isinstance(r, dict) for r in rows) and not (
        "b64" not in specs and all(_is_b64(r) for r in rows)
    ):
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
            specs = config.request_input_specs
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
