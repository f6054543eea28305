"""The predictor's OpenAPI document, as the server actually behaves.

FastAPI derives a document from the routes, but the routes return bare Responses and the
inference endpoints are answered in front of FastAPI (rest/front.py), so on its own it says
nothing true about bodies: no request bodies for infer/predict (JSON or Triton's binary
extension), empty response schemas, a 422 that is never sent (validation errors are 400s
with `{"error": ...}`), /metrics as JSON. This module keeps FastAPI's paths, parameters and
operation ids and states each operation's request body, responses and statuses by hand.
tests/e2e/test_openapi.py holds the server to it with schemathesis.
"""

from __future__ import annotations

import re
from typing import Any, Final

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from ember.server.datatypes import DATATYPES
from ember.server.errors import ErrorCode
from ember.server.rest.errors import HTTP_STATUS

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


_STRING = {"type": "string"}
_BOOL = {"type": "boolean"}
_PARAMETERS = {"type": ["object", "null"], "description": "null is the same as absent"}
_TENSOR_META = {
    "name": _STRING,
    "datatype": {"type": "string", "enum": list(DATATYPES)},
    "shape": {"type": "array", "items": {"type": "integer"}},
}

SCHEMAS: Final[dict[str, Any]] = {
    "Error": {**_object(["error"], error=_STRING), "additionalProperties": False},
    "InferenceRequest": _object(
        ["inputs"],
        id={"type": ["string", "null"]},
        parameters={
            **_PARAMETERS,
            "properties": {
                "timeout": {"type": "integer", "minimum": 0, "description": "microseconds"},
                "binary_data_output": _BOOL,
            },
        },
        inputs={"type": "array", "minItems": 1, "items": _ref("RequestInput")},
        outputs={"type": ["array", "null"], "items": _ref("RequestOutput")},
    ),
    "RequestInput": _object(
        ["name", "datatype", "shape"],
        name={"type": "string", "minLength": 1},
        datatype={"type": "string", "enum": list(DATATYPES)},
        shape={"type": "array", "items": {"type": "integer", "minimum": 0}},
        parameters={
            **_PARAMETERS,
            "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
        },
        data={
            "description": "Row-major values, flat or nested; absent when the tensor is in the "
            "binary section (parameters.binary_data_size)"
        },
    ),
    "RequestOutput": _object(
        ["name"],
        name={"type": "string", "minLength": 1},
        parameters={**_PARAMETERS, "properties": {"binary_data": _BOOL}},
    ),
    "InferenceResponse": _object(
        ["model_name", "model_version", "outputs"],
        model_name=_STRING,
        model_version=_STRING,
        id=_STRING,
        parameters={"type": "object"},
        outputs={
            "type": "array",
            "items": _object(
                ["name", "datatype", "shape"],
                **_TENSOR_META,
                parameters={
                    "type": "object",
                    "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
                },
                data={"type": "array"},
            ),
        },
    ),
    "V1Request": {
        "type": "object",
        "description": "KServe V1: 'instances' (rows), else 'inputs' (rows, or columns keyed "
        'by input name); BYTES values are strings or {"b64": "..."}',
        # With 'instances' present, 'inputs' is not read at all.
        "anyOf": [
            {
                "required": ["instances"],
                "properties": {"instances": {"type": "array", "minItems": 1}},
            },
            {
                "required": ["inputs"],
                "not": {"required": ["instances"]},
                "properties": {
                    "inputs": {
                        "anyOf": [
                            {"type": "array", "minItems": 1},
                            {"type": "object", "minProperties": 1},
                        ]
                    }
                },
            },
        ],
    },
    "V1Response": _object(["predictions"], predictions={"type": "array"}),
    "TensorMetadata": _object(["name", "datatype", "shape"], **_TENSOR_META),
    "ModelMetadata": _object(
        ["name", "versions", "platform", "inputs", "outputs"],
        name=_STRING,
        versions={"type": "array", "items": _STRING},
        platform=_STRING,
        inputs={"type": "array", "items": _ref("TensorMetadata")},
        outputs={"type": "array", "items": _ref("TensorMetadata")},
    ),
    "ModelStatistics": _object(
        ["model_stats"],
        model_stats={
            "type": "array",
            "items": _object(
                ["name", "version", "inference_count", "execution_count", "inference_stats"],
                name=_STRING,
                version=_STRING,
                last_inference={"type": "integer"},
                inference_count={"type": "integer"},
                execution_count={"type": "integer"},
                inference_stats={"type": "object"},
                batch_stats={"type": "array"},
            ),
        },
    ),
    "ModelReady": _object(["name", "ready"], name=_STRING, ready=_BOOL),
}

_INFER_ERRORS = sorted(HTTP_STATUS.values())
_RETRY_AFTER = {
    "Retry-After": {
        "description": "seconds to wait before retrying",
        "schema": {"type": "string"},
    }
}
_RETRIED = {HTTP_STATUS[ErrorCode.OVERLOADED], HTTP_STATUS[ErrorCode.NOT_READY]}
_ERROR_WORDS = {
    400: "Invalid request", 404: "Unknown model or version", 413: "Request body too large",
    429: "Queue full", 500: "Model or server failure", 501: "Not supported",
    503: "Not ready", 504: "Deadline exceeded",
}  # fmt: skip


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(status: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": _ERROR_WORDS[status],
        "content": _json(_ref("Error")),
    }
    if status in _RETRIED:
        response["headers"] = _RETRY_AFTER
    return response


def _ok(
    schema: dict[str, Any] | None = None,
    content: dict[str, Any] | None = None,
    description: str = "OK",
    headers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": content if content is not None else _json(schema or {}),
    }
    if headers:
        response["headers"] = headers
    return response


_BINARY_HEADER = "Inference-Header-Content-Length"

_V2_INFER_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": _ref("InferenceRequest"),
            "example": {
                "inputs": [
                    {"name": "INPUT_INT32", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}
                ]
            },
        },
        "application/octet-stream": {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": f"Triton's binary tensor extension: the first {_BINARY_HEADER} "
                "bytes are an InferenceRequest, the tensors' raw bytes follow in input order",
            }
        },
    },
}
_V2_INFER_OK = _ok(
    content={
        "application/json": {"schema": _ref("InferenceResponse")},
        "application/octet-stream": {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": f"When binary outputs were asked for: the first "
                f"{_BINARY_HEADER} bytes are an InferenceResponse, the outputs' raw bytes "
                "follow",
            }
        },
    },
    headers={
        _BINARY_HEADER: {
            "description": "with a binary answer: the length of its JSON part",
            "schema": {"type": "integer", "minimum": 0},
        }
    },
)
_BINARY_PARAMETER = {
    "name": _BINARY_HEADER,
    "in": "header",
    "required": False,
    "description": "the length of the JSON part of a binary-extension request body",
    "schema": {"type": "integer", "minimum": 0},
}
_V1_PREDICT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": _ref("V1Request"),
            "example": {"instances": [{"INPUT_INT32": [1, 2]}]},
        }
    },
}

# (method, path) -> (the 200 response, error statuses, request body, extra parameters)
Operation = tuple[dict[str, Any] | None, list[int], dict[str, Any] | None, list[dict[str, Any]]]
_M = "/v2/models/{model_name}"
_MV = "/v2/models/{model_name}/versions/{version}"

_PER_MODEL: Final[dict[str, Operation]] = {
    "/ready": (_ok(_ref("ModelReady")), [404, 503], None, []),
    "/config": (_ok({"type": "object", "description": "a Triton model config"}), [404], None, []),
    "/stats": (_ok(_ref("ModelStatistics")), [404], None, []),
    "": (_ok(_ref("ModelMetadata")), [404], None, []),
}

OPERATIONS: Final[dict[tuple[str, str], Operation]] = {
    ("get", "/"): (_ok(_object(["status"], status={"const": "alive"})), [], None, []),
    ("get", "/metrics"): (
        _ok(content={"text/plain": {"schema": _STRING}}, description="Prometheus text format"),
        [], None, [],
    ),
    ("get", "/v2/health/live"): (_ok(_object(["live"], live=_BOOL)), [], None, []),
    ("get", "/v2/health/ready"): (_ok(_object(["ready"], ready=_BOOL)), [503], None, []),
    ("get", "/v2"): (
        _ok(_object(["name", "version", "extensions"], name=_STRING, version=_STRING,
                    extensions={"type": "array", "items": _STRING})),
        [], None, [],
    ),
    ("get", "/v1/models"): (
        _ok(_object(["models"], models={"type": "array", "items": _STRING})), [], None, [],
    ),
    ("get", "/v1/models/{model_name}"): (_ok(_ref("ModelReady")), [404], None, []),
    # Ember has no explainers: never a 2xx.
    ("post", "/v1/models/{model_name}:explain"): (None, [404, 501], None, []),
    ("post", "/v1/models/{model_name}:predict"): (
        _ok(_ref("V1Response")), _INFER_ERRORS, _V1_PREDICT_BODY, [],
    ),
    ("get", "/v2/models"): (
        _ok(_object(["models"], models={"type": "array", "items": _STRING})), [], None, [],
    ),
    ("post", "/v2/repository/index"): (
        _ok({"type": "array",
             "items": _object(["name", "version", "state", "reason"], name=_STRING,
                              version=_STRING, state=_STRING, reason=_STRING)}),
        [], None, [],
    ),
    ("post", "/v2/repository/models/{model_name}/load"): (
        _ok(_object(["name", "load"], name=_STRING, load=_BOOL)), [404, 500], None, [],
    ),
    ("post", "/v2/repository/models/{model_name}/unload"): (
        _ok(_object(["name", "unload"], name=_STRING, unload=_BOOL)), [404], None, [],
    ),
    ("get", "/v2/models/stats"): (_ok(_ref("ModelStatistics")), [], None, []),
    **{
        ("get", prefix + suffix): operation
        for prefix in (_M, _MV)
        for suffix, operation in _PER_MODEL.items()
    },
    **{
        ("post", prefix + "/infer"): (
            _V2_INFER_OK, _INFER_ERRORS, _V2_INFER_BODY, [_BINARY_PARAMETER],
        )
        for prefix in (_M, _MV)
    },
}  # fmt: skip

# Every path parameter: a model name in the repository's example, so generated requests reach
# a model as well as miss one.
_PATH_EXAMPLES = {"model_name": "identity", "version": "1"}
_PATH_PARAMETER = re.compile(r"{(\w+)}")


def document(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            # A route added without an entry is a KeyError here (and a failing unit test):
            # no operation goes out described by FastAPI's guesses alone.
            ok, errors, body, parameters = OPERATIONS[(method, path)]
            responses = {} if ok is None else {"200": ok}
            operation["responses"] = responses | {str(s): _error(s) for s in errors}
            if body is not None:
                operation["requestBody"] = body
            declared = operation.setdefault("parameters", [])
            # The inference routes' FastAPI handlers take no arguments (rest/front.py answers
            # them): their path parameters are declared here.
            named = {p["name"] for p in declared if p["in"] == "path"}
            for name in _PATH_PARAMETER.findall(path):
                if name not in named:
                    declared.append({"name": name, "in": "path", "required": True,
                                     "schema": {"type": "string"}})  # fmt: skip
            for parameter in declared:
                if parameter["in"] == "path" and parameter["name"] in _PATH_EXAMPLES:
                    parameter["example"] = _PATH_EXAMPLES[parameter["name"]]
            declared.extend(parameters)
            if not declared:
                del operation["parameters"]
    doc["components"] = {"schemas": SCHEMAS}
    return doc


def install(app: FastAPI) -> None:
    """Serve `document(app)` at /openapi.json, built on first request (not at startup)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
