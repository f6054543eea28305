"""Open Inference Protocol (V2) JSON documents <-> InferRequest / InferResponse."""

from __future__ import annotations

import time
from typing import Any

from ember.server.codecs.json_tensors import array_from_json, array_to_json, parse_shape
from ember.server.codecs.raw import array_from_raw, raw_view
from ember.server.codecs.shown import shown
from ember.server.config import ModelConfig, TensorSpec
from ember.server.errors import InvalidInput
from ember.server.request import InferRequest, InferResponse, RequestedOutput, Tensor


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _parameters(doc: dict[str, Any], where: str) -> dict[str, Any]:
    params = doc.get("parameters")
    if params is None:
        return {}
    return _object(params, f"{where} 'parameters'")


def _string(doc: dict[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{where}: '{key}' must be a non-empty string, got {shown(value)}")
    return value


def deadline_from(parameters: dict[str, Any]) -> float | None:
    """tritonclient's `timeout` request parameter, in microseconds."""
    timeout = parameters.get("timeout")
    if timeout is None:
        return None
    if type(timeout) is not int or timeout < 0:
        raise InvalidInput(
            f"parameter 'timeout' must be microseconds (an integer >= 0), got {shown(timeout)}"
        )
    return time.monotonic() + timeout / 1e6


class _BinaryCursor:
    """Hands out the binary section of a request, tensor by tensor, in JSON order."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.offset = 0

    def take(self, size: Any, where: str) -> memoryview:
        if type(size) is not int or size < 0:
            raise InvalidInput(f"{where}: 'binary_data_size' must be a non-negative integer")
        if self.offset + size > len(self.data):
            raise InvalidInput(
                f"{where}: binary_data_size {size} runs past the end of the body "
                f"({len(self.data) - self.offset} bytes remain)"
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk


def decode_tensor(item: Any, index: int, binary: _BinaryCursor | None = None) -> Tensor:
    where = f"inputs[{index}]"
    doc = _object(item, where)
    name = _string(doc, "name", where)
    where = f"input '{name}'"
    datatype = doc.get("datatype")
    if datatype is None:
        raise InvalidInput(f"{where}: 'datatype' is missing")
    if "shape" not in doc:
        raise InvalidInput(f"{where}: 'shape' is missing")
    shape = parse_shape(doc["shape"], where)
    params = _parameters(doc, where)
    if "binary_data_size" in params and binary is not None:
        if "data" in doc:
            raise InvalidInput(f"{where}: has both 'data' and 'binary_data_size'")
        chunk = binary.take(params["binary_data_size"], where)
        if not isinstance(datatype, str):
            raise InvalidInput(f"{where}: 'datatype' must be a string, got {shown(datatype)}")
        array = array_from_raw(chunk, datatype, shape, where)
        params = (
            {k: v for k, v in params.items() if k != "binary_data_size"} if len(params) > 1 else {}
        )
        return Tensor(name=name, datatype=datatype, data=array, parameters=params)
    if "data" not in doc:
        if "binary_data_size" in params:
            raise InvalidInput(
                f"{where}: binary data was announced but the request has no "
                "Inference-Header-Content-Length header"
            )
        raise InvalidInput(f"{where}: 'data' is missing")
    array = array_from_json(doc["data"], datatype, shape, where)
    return Tensor(name=name, datatype=datatype, data=array, parameters=params)


def decode_request(
    body: Any, model_name: str, model_version: str | None, binary: memoryview | None = None
) -> InferRequest:
    """A V2 JSON document; `binary` is the section after it (Triton's binary extension)."""
    doc = _object(body, "request body")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("request body: 'inputs' must be a non-empty list of tensors")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput(f"request body: 'id' must be a string, got {shown(request_id)}")
    params = _parameters(doc, "request body")
    outputs = None
    if doc.get("outputs") is not None:
        raw_outputs = doc["outputs"]
        if not isinstance(raw_outputs, list):
            raise InvalidInput("request body: 'outputs' must be a list")
        outputs = []
        for i, item in enumerate(raw_outputs):
            out = _object(item, f"outputs[{i}]")
            name = _string(out, "name", f"outputs[{i}]")
            outputs.append(RequestedOutput(name, _parameters(out, f"output '{name}'")))
    cursor = _BinaryCursor(binary) if binary is not None else None
    tensors = [decode_tensor(item, i, cursor) for i, item in enumerate(inputs)]
    if cursor is not None and cursor.offset != len(cursor.data):
        raise InvalidInput(
            f"request body: {len(cursor.data) - cursor.offset} bytes of binary data are not "
            "claimed by any input's binary_data_size"
        )
    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        inputs=tensors,
        parameters=params,
        outputs=outputs,
        deadline=deadline_from(params),
    )


def binary_outputs(request: InferRequest) -> set[str]:
    """Outputs to send as binary: per-output `binary_data`, else `binary_data_output`."""
    default = request.parameters.get("binary_data_output") is True
    if request.outputs is None:
        return {"*"} if default else set()
    return {o.name for o in request.outputs if o.parameters.get("binary_data", default) is True}


def encode_response(
    response: InferResponse, binary: set[str] | None = None
) -> tuple[dict[str, Any], list[bytes | memoryview]]:
    """The JSON document and, for outputs named in `binary` ("*" = all), their raw bytes
    (views over the output arrays where possible: written out without a copy)."""
    binary = binary or set()
    blobs: list[bytes | memoryview] = []
    outputs = []
    for t in response.outputs:
        out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.data.shape)}
        if "*" in binary or t.name in binary:
            blob = raw_view(t.data, t.datatype)
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = array_to_json(t.data, t.datatype)
        outputs.append(out)
    doc: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id is not None:
        doc["id"] = response.id
    if response.parameters:
        doc["parameters"] = response.parameters
    return doc, blobs


def _spec(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": spec.shape}


def model_metadata(config: ModelConfig) -> dict[str, Any]:
    return {
        "name": config.name,
        "versions": [config.version],
        "platform": platform_of(config),
        "inputs": [_spec(s) for s in config.request_inputs],
        "outputs": [_spec(s) for s in config.request_outputs],
    }


def platform_of(config: ModelConfig) -> str:
    return {
        "torchscript": "pytorch_libtorch",
        "torch_export": "pytorch_export",
        "safetensors": "pytorch_safetensors",
        "python": "python",
    }[config.format]
