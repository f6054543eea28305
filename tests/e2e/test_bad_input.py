"""Bad requests against a real server: the status, an `{"error": ...}` body that names the
tensor or field and what was expected, and a server that still answers the next good request.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

# conftest.py's EmberProcess and check_error: with --import-mode=importlib test modules
# cannot import conftest, so fixtures hand them over and these names only document them.
EmberProcess = Any
ErrorCheck = Any

MODELS = Path(__file__).resolve().parents[2] / "models"

ZEROS_784 = [0.0] * 784
_DROP = object()  # marks a key _mlp_input leaves out


def _mlp_input(**overrides: Any) -> dict[str, Any]:
    tensor: dict[str, Any] = {"name": "input", "datatype": "FP32", "shape": [1, 784]}
    tensor["data"] = ZEROS_784
    tensor.update(overrides)
    return {key: value for key, value in tensor.items() if value is not _DROP}


# (id, body as JSON or raw bytes, fragments the error message must hold)
V2_MLP_CASES: list[tuple[str, Any, list[str]]] = [
    ("malformed-json", b'{"inputs": [', ["not valid JSON"]),
    ("empty-body", b"", ["empty", "JSON object"]),
    ("body-is-a-list", [1, 2, 3], ["JSON object", "list"]),
    ("body-is-a-string", "hello", ["JSON object", "str"]),
    ("missing-inputs", {"id": "x"}, ["'inputs'"]),
    ("inputs-not-a-list", {"inputs": {"input": ZEROS_784}}, ["'inputs'", "list"]),
    ("inputs-empty", {"inputs": []}, ["'inputs'", "non-empty"]),
    ("input-not-an-object", {"inputs": [5]}, ["inputs[0]", "JSON object"]),
    ("input-without-name", {"inputs": [_mlp_input(name=_DROP)]}, ["inputs[0]", "'name'"]),
    (
        "unknown-input-name",
        {"inputs": [_mlp_input(name="pixels")]},
        ["'pixels'", "mlp", "['input']"],
    ),
    ("missing-datatype", {"inputs": [_mlp_input(datatype=_DROP)]}, ["'input'", "'datatype'"]),
    (
        "unknown-datatype",
        {"inputs": [_mlp_input(datatype="FLOAT32")]},
        ["'input'", "unknown datatype", "FLOAT32", "FP32"],
    ),
    (
        "datatype-not-a-string",
        {"inputs": [_mlp_input(datatype=32)]},
        ["'input'", "datatype"],
    ),
    (
        "datatype-differs-from-model",
        {"inputs": [_mlp_input(datatype="INT32", data=[0] * 784)]},
        ["'input'", "INT32", "FP32"],
    ),
    ("missing-shape", {"inputs": [_mlp_input(shape=_DROP)]}, ["'input'", "'shape'"]),
    (
        "shape-not-integers",
        {"inputs": [_mlp_input(shape=[1, "784"])]},
        ["'input'", "'shape'", "integers"],
    ),
    (
        "shape-does-not-match-data-length",
        {"inputs": [_mlp_input(data=[0.0] * 10)]},
        ["'input'", "[1, 784]", "784", "10"],
    ),
    (
        "shape-does-not-match-model",
        {"inputs": [_mlp_input(shape=[1, 10], data=[0.0] * 10)]},
        ["'input'", "[1, 10]", "[-1, 784]"],
    ),
    (
        "ragged-nested-data",
        {"inputs": [_mlp_input(shape=[2, 784], data=[ZEROS_784, ZEROS_784[:-1]])]},
        ["'input'", "ragged"],
    ),
    (
        "strings-instead-of-numbers",
        {"inputs": [_mlp_input(data=["0.5"] * 784)]},
        ["'input'", "FP32", "strings"],
    ),
    (
        "booleans-instead-of-numbers",
        {"inputs": [_mlp_input(data=[True] * 784)]},
        ["'input'", "FP32", "booleans"],
    ),
    ("missing-data", {"inputs": [_mlp_input(data=_DROP)]}, ["'input'", "'data'"]),
    (
        "input-given-twice",
        {"inputs": [_mlp_input(), _mlp_input()]},
        ["'input'", "more than once"],
    ),
    (
        "batch-over-max-batch-size",
        {"inputs": [_mlp_input(shape=[65, 784], data=ZEROS_784 * 65)]},
        ["'input'", "65", "max_batch_size", "64"],
    ),
    (
        "unknown-requested-output",
        {"inputs": [_mlp_input()], "outputs": [{"name": "logits"}]},
        ["'logits'", "['output']"],
    ),
    ("id-not-a-string", {"id": 7, "inputs": [_mlp_input()]}, ["'id'", "string"]),
    ("outputs-not-a-list", {"inputs": [_mlp_input()], "outputs": "output"}, ["'outputs'"]),
]


@pytest.mark.parametrize(
    ("body", "fragments"),
    [pytest.param(body, fragments, id=case) for case, body, fragments in V2_MLP_CASES],
)
def test_v2_bad_request_to_mlp(
    main_server: EmberProcess, expect_error: ErrorCheck, body: Any, fragments: list[str]
) -> None:
    if isinstance(body, bytes):
        response = main_server.post("/v2/models/mlp/infer", content=body)
    else:
        response = main_server.post("/v2/models/mlp/infer", json=body)
    expect_error(response, 400, *fragments)
    main_server.assert_serves("mlp")


def _identity_input(datatype: str, data: Any, shape: list[int] | None = None) -> dict[str, Any]:
    shape = [1, len(data)] if shape is None else shape
    tensor = {"name": f"INPUT_{datatype}", "datatype": datatype, "shape": shape, "data": data}
    return {"inputs": [tensor]}


IDENTITY_CASES: list[tuple[str, Any, list[str]]] = [
    ("fp16-as-json-numbers", _identity_input("FP16", [1.0, 2.0]), ["INPUT_FP16", "FP16", "binary"]),
    ("bf16-as-json-numbers", _identity_input("BF16", [1.0, 2.0]), ["INPUT_BF16", "BF16", "binary"]),
    ("bool-given-integers", _identity_input("BOOL", [1, 0]), ["INPUT_BOOL", "BOOL", "integers"]),
    ("int-given-floats", _identity_input("INT32", [1.5, 2.0]), ["INPUT_INT32", "INT32"]),
    ("int8-out-of-range", _identity_input("INT8", [1, 300]), ["INPUT_INT8", "range", "INT8"]),
    (
        "int64-beyond-range",
        _identity_input("INT64", [0, 2**63]),
        ["INPUT_INT64", "range", "INT64"],
    ),
    ("uint8-negative", _identity_input("UINT8", [-1, 3]), ["INPUT_UINT8", "range", "UINT8"]),
    ("bytes-given-numbers", _identity_input("BYTES", [1, 2]), ["INPUT_BYTES", "BYTES", "string"]),
    (
        "fp32-mixed-strings-and-numbers",
        _identity_input("FP32", [1.0, "two"]),
        ["INPUT_FP32", "FP32"],
    ),
    (
        "scalar-data-for-a-matrix-input",
        _identity_input("INT32", 5, shape=[]),
        ["INPUT_INT32", "shape", "[-1, -1]"],
    ),
]


@pytest.mark.parametrize(
    ("body", "fragments"),
    [pytest.param(body, fragments, id=case) for case, body, fragments in IDENTITY_CASES],
)
def test_v2_bad_request_to_identity(
    main_server: EmberProcess, expect_error: ErrorCheck, body: Any, fragments: list[str]
) -> None:
    expect_error(main_server.infer("identity", body), 400, *fragments)
    main_server.assert_serves("identity")


def test_missing_required_input(test_models_server: EmberProcess, expect_error: ErrorCheck) -> None:
    only_b = {"inputs": [{"name": "b", "datatype": "INT32", "shape": [2], "data": [1, 2]}]}
    expect_error(test_models_server.infer("required", only_b), 400, "missing required input", "'a'")
    test_models_server.assert_serves("required")


# --- KServe V1 --------------------------------------------------------------------------------
V1_CASES: list[tuple[str, str, Any, list[str]]] = [
    ("malformed-json", "mlp", b"{instances: [", ["not valid JSON"]),
    ("body-is-a-list", "mlp", [[0.0] * 784], ["JSON object", "list"]),
    ("no-instances", "mlp", {"rows": [ZEROS_784]}, ["'instances'"]),
    ("instances-empty", "mlp", {"instances": []}, ["'instances'", "non-empty"]),
    ("instances-not-a-list", "mlp", {"instances": 3}, ["'instances'", "list"]),
    ("instance-wrong-length", "mlp", {"instances": [[0.0] * 3]}, ["'input'", "[-1, 784]"]),
    ("ragged-instances", "mlp", {"instances": [ZEROS_784, [0.0] * 3]}, ["ragged"]),
    ("strings-instead-of-numbers", "mlp", {"instances": [["x"] * 784]}, ["FP32", "strings"]),
    (
        "unknown-key-in-instance",
        "identity",
        {"instances": [{"INPUT_FP23": [1.0]}]},
        ["'INPUT_FP23'", "INPUT_FP32"],
    ),
    (
        "instances-with-different-keys",
        "identity",
        {"instances": [{"INPUT_FP32": [1.0]}, {"INPUT_FP64": [1.0]}]},
        ["instances[1]", "INPUT_FP64", "INPUT_FP32"],
    ),
    (
        "unknown-key-in-inputs",
        "identity",
        {"inputs": {"nope": [[1]]}},
        ["'inputs'", "nope", "INPUT_INT32"],
    ),
]


@pytest.mark.parametrize(
    ("model", "body", "fragments"),
    [pytest.param(m, b, f, id=case) for case, m, b, f in V1_CASES],
)
def test_v1_bad_request(
    main_server: EmberProcess,
    expect_error: ErrorCheck,
    model: str,
    body: Any,
    fragments: list[str],
) -> None:
    path = f"/v1/models/{model}:predict"
    if isinstance(body, bytes):
        response = main_server.post(path, content=body)
    else:
        response = main_server.post(path, json=body)
    expect_error(response, 400, *fragments)
    good = main_server.post("/v1/models/mlp:predict", json={"instances": [ZEROS_784]})
    assert good.status_code == 200, good.text


# --- unknown models, routes and methods -------------------------------------------------------
GOOD_V2 = {"inputs": [_mlp_input()]}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v2/models/nope/infer", GOOD_V2),
        ("GET", "/v2/models/nope", None),
        ("GET", "/v2/models/nope/ready", None),
        ("POST", "/v2/models/nope/versions/1/infer", GOOD_V2),
        ("POST", "/v1/models/nope:predict", {"instances": [ZEROS_784]}),
        ("GET", "/v1/models/nope", None),
    ],
)
def test_unknown_model_is_404(
    main_server: EmberProcess,
    expect_error: ErrorCheck,
    method: str,
    path: str,
    body: Any,
) -> None:
    with main_server.client() as client:
        response = client.request(method, path, json=body)
    expect_error(response, 404, "'nope'", "not found")
    main_server.assert_serves("mlp")


def test_unknown_version_is_404(main_server: EmberProcess, expect_error: ErrorCheck) -> None:
    response = main_server.post("/v2/models/mlp/versions/7/infer", json=GOOD_V2)
    expect_error(response, 404, "'mlp'", "'7'")
    expect_error(main_server.get("/v2/models/mlp/versions/7"), 404, "'mlp'", "'7'")
    main_server.assert_serves("mlp")


@pytest.mark.parametrize("path", ["/nope", "/v2/nope", "/v2/models/mlp/infer/extra", "/v3"])
def test_unknown_route_is_404_with_error_body(
    main_server: EmberProcess, expect_error: ErrorCheck, path: str
) -> None:
    expect_error(main_server.get(path), 404)
    main_server.assert_serves("mlp")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/mlp/infer"),
        ("DELETE", "/v2/health/live"),
        ("PUT", "/v1/models/mlp:predict"),
        ("POST", "/v2/health/ready"),
        ("GET", "/v2/repository/index"),
    ],
)
def test_wrong_method_is_405_with_error_body(
    main_server: EmberProcess, expect_error: ErrorCheck, method: str, path: str
) -> None:
    with main_server.client() as client:
        response = client.request(method, path)
    expect_error(response, 405)
    main_server.assert_serves("mlp")


# --- a model that raises -----------------------------------------------------------------------
def test_model_exception_is_500_and_server_keeps_serving(
    test_models_server: EmberProcess, expect_error: ErrorCheck
) -> None:
    bad = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}]}
    for _ in range(2):
        expect_error(
            test_models_server.infer("failing", bad), 500, "failing", "exploded on purpose"
        )
    assert "Traceback" not in test_models_server.infer("failing", bad).text
    zeros = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [0.0, 0.0]}]}
    response = test_models_server.infer("failing", zeros)
    assert response.status_code == 200, response.text
    test_models_server.assert_serves("required")
    assert test_models_server.get("/v2/health/ready").status_code == 200


# --- body size limit ---------------------------------------------------------------------------
def test_oversized_body_is_413(ember: Any, expect_error: ErrorCheck) -> None:
    server = ember("--model-repository", MODELS, "--max-body-bytes", "1000")
    big = {"inputs": [_mlp_input()]}  # ~3.9 kB of JSON, with a Content-Length
    expect_error(server.infer("mlp", big), 413, "1000")
    expect_error(server.post("/v1/models/mlp:predict", json={"instances": [ZEROS_784]}), 413)

    # Without Content-Length (chunked), the limit holds while the body streams in.
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": [{"name": "INPUT_INT32", "datatype": "INT32", "shape": [1, 600], '
        yield b'"data": [' + b",".join([b"1"] * 600) + b"]}]}"

    expect_error(server.post("/v2/models/identity/infer", content=chunks()), 413, "1000")
    server.assert_serves("identity")
    assert server.get("/v2/health/live").status_code == 200


def test_v1_explain_without_explainer_is_501(
    main_server: EmberProcess, expect_error: ErrorCheck
) -> None:
    body = {"instances": [ZEROS_784]}
    expect_error(main_server.post("/v1/models/mlp:explain", json=body), 501, "'mlp'")
    expect_error(main_server.post("/v1/models/nope:explain", json=body), 404, "'nope'")
    main_server.assert_serves("mlp")
