from __future__ import annotations

import time

import numpy as np
import pytest

from ember.server.codecs import v1, v2
from ember.server.config import ModelConfig
from ember.server.errors import InvalidInput
from ember.server.request import InferRequest, InferResponse, RequestedOutput, Tensor
from ember.server.validation import validate

CONFIG = ModelConfig.model_validate(
    {
        "name": "m",
        "format": "python",
        "class": "x:Y",
        "max_batch_size": 4,
        "inputs": [
            {"name": "a", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "b", "datatype": "INT64", "shape": [-1], "optional": True},
        ],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }
)


def tensor(name: str = "a", datatype: str = "FP32", shape: tuple[int, ...] = (1, 3)) -> Tensor:
    return Tensor(name, datatype, np.zeros(shape, dtype=np.float32))


def test_decode_request_fields() -> None:
    before = time.monotonic()
    request = v2.decode_request(
        {
            "id": "7",
            "parameters": {"timeout": 2_000_000, "priority": 1},
            "inputs": [{"name": "a", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
        },
        "m",
        None,
    )
    assert request.id == "7" and request.model_name == "m"
    assert request.outputs == [RequestedOutput("y", {"binary_data": False})]
    assert request.deadline is not None and 1.9 < request.deadline - before < 2.1
    np.testing.assert_array_equal(request.inputs[0].data, [[1, 2, 3]])


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ([1, 2], "request body must be a JSON object, got list"),
        ({}, "'inputs' must be a non-empty list"),
        ({"inputs": []}, "'inputs' must be a non-empty list"),
        ({"inputs": [1]}, "inputs[0] must be a JSON object"),
        ({"inputs": [{"datatype": "FP32"}]}, "inputs[0]: 'name' must be a non-empty string"),
        (
            {"inputs": [{"name": "a", "shape": [1], "data": [1]}]},
            "input 'a': 'datatype' is missing",
        ),
        ({"inputs": [{"name": "a", "datatype": "FP32", "data": [1]}]}, "'shape' is missing"),
        ({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1]}]}, "'data' is missing"),
        (
            {
                "inputs": [
                    {
                        "name": "a",
                        "datatype": "FP32",
                        "shape": [1],
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            },
            "Inference-Header-Content-Length",
        ),
        ({"id": 5, "inputs": [{}]}, "'id' must be a string"),
        ({"inputs": [{"name": "a"}], "outputs": {}}, "'outputs' must be a list"),
        ({"inputs": [{"name": "a"}], "parameters": []}, "'parameters' must be a JSON object"),
        (
            {
                "inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]}],
                "parameters": {"timeout": "soon"},
            },
            "'timeout' must be microseconds",
        ),
    ],
)
def test_decode_request_errors(body: object, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        v2.decode_request(body, "m", None)
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("inputs", "outputs", "fragment"),
    [
        ([tensor("c")], None, "unknown input 'c' for model 'm', expected one of ['a', 'b']"),
        (
            [Tensor("b", "INT64", np.zeros(1, dtype=np.int64))],
            None,
            "missing required input(s) ['a']",
        ),
        ([tensor(), tensor()], None, "given more than once"),
        (
            [Tensor("a", "FP64", np.zeros((1, 3)))],
            None,
            "datatype FP64 does not match the model's FP32",
        ),
        ([tensor(shape=(1, 4))], None, "shape [1, 4] does not match the model's [-1, 3]"),
        ([tensor(shape=(3,))], None, "shape [3] does not match"),
        ([tensor(shape=(5, 3))], None, "batch of 5 exceeds the model's max_batch_size 4"),
        ([tensor()], [RequestedOutput("z")], "unknown output 'z'"),
    ],
)
def test_validation_names_tensor_and_expectation(
    inputs: list[Tensor], outputs: list[RequestedOutput] | None, fragment: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        validate(InferRequest("m", inputs, outputs=outputs), CONFIG)
    assert fragment in info.value.message


def test_validation_passes_good_requests() -> None:
    got = validate(InferRequest("m", [tensor(shape=(4, 3))]), CONFIG)
    assert list(got) == ["a"] and got["a"].shape == (4, 3)


def test_encode_response_echoes_id_and_flattens() -> None:
    response = InferResponse(
        "m", [Tensor("y", "FP32", np.arange(6, dtype=np.float32).reshape(2, 3))], "1", "abc"
    )
    doc, blobs = v2.encode_response(response)
    assert blobs == []
    assert doc["id"] == "abc" and doc["model_version"] == "1"
    assert doc["outputs"][0]["shape"] == [2, 3]
    assert list(doc["outputs"][0]["data"]) == [0, 1, 2, 3, 4, 5]


def test_v1_instances_and_columns() -> None:
    request = v1.decode_request({"instances": [[1, 2, 3], [4, 5, 6]]}, CONFIG)
    assert request.inputs[0].name == "a" and request.inputs[0].shape == (2, 3)
    request = v1.decode_request({"inputs": {"a": [[1, 2, 3]], "b": [9]}}, CONFIG)
    assert [t.name for t in request.inputs] == ["a", "b"]
    for bad, fragment in [
        ({}, "expected 'instances'"),
        ({"instances": []}, "non-empty list"),
        ({"instances": [{"a": [1, 2, 3]}, {"b": [1]}]}, "differ from instances[0]"),
        ({"instances": [{"zz": 1}]}, "unknown input 'zz'"),
        ({"inputs": {"zz": [1]}}, "must be input names"),
        ({"instances": [["x", "y", "z"]]}, "got strings"),
    ]:
        with pytest.raises(InvalidInput) as info:
            v1.decode_request(bad, CONFIG)
        assert fragment in info.value.message


def test_v1_response_rows() -> None:
    one = InferResponse("m", [Tensor("y", "INT32", np.array([[1], [2]], dtype=np.int32))])
    assert np.asarray(v1.encode_response(one)["predictions"]).tolist() == [[1], [2]]
    two = InferResponse(
        "m",
        [
            Tensor("y", "INT32", np.array([1, 2], dtype=np.int32)),
            Tensor("s", "BYTES", np.array([b"a", b"b"], dtype=object)),
        ],
    )
    rows = v1.encode_response(two)["predictions"]
    assert [(int(r["y"]), r["s"]) for r in rows] == [(1, "a"), (2, "b")]
