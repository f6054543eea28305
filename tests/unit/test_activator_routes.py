"""Which model a request is for: HTTP paths (V1 and V2) and field 1 of gRPC messages."""

from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2 as pb

from ember.activator.routes import field_one, is_model_ready_path, model_of_path


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v2/models/resnet/infer", "resnet"),
        ("/v2/models/resnet", "resnet"),
        ("/v2/models/resnet/ready", "resnet"),
        ("/v2/models/resnet/versions/3/infer", "resnet"),
        ("/v2/models/resnet/versions/3/ready", "resnet"),
        ("/v2/models/resnet/generate_stream", "resnet"),
        ("/v2/models/my%20model/infer", "my model"),
        ("/v2/models/a%2Fb/infer", "a/b"),
        ("/v2/models/caf%C3%A9/infer", "café"),
        ("/v2/models/a%25b/infer", "a%b"),
        ("/v1/models/resnet", "resnet"),
        ("/v1/models/resnet:predict", "resnet"),
        ("/v1/models/resnet:explain", "resnet"),
        ("/v1/models/my%3Amodel:predict", "my:model"),
        # Server-level paths and malformed ones name no model.
        ("/v2/models/", None),
        ("/v2/models//infer", None),
        ("/v2/models", None),
        ("/v2", None),
        ("/v2/health/ready", None),
        ("/v2/health/live", None),
        ("/v2/repository/index", None),
        ("/v1/models", None),
        ("/v1/models/", None),
        ("/v1/models/:predict", None),
        ("/metrics", None),
        ("/", None),
        ("/v3/models/resnet/infer", None),
    ],
)
def test_model_of_path(path: str, model: str | None) -> None:
    assert model_of_path(path) == model


@pytest.mark.parametrize(
    ("method", "path", "ready"),
    [
        ("GET", "/v2/models/resnet/ready", True),
        ("GET", "/v2/models/resnet/versions/2/ready", True),
        ("GET", "/v1/models/resnet", True),
        ("POST", "/v2/models/resnet/ready", False),
        ("HEAD", "/v2/models/resnet/ready", False),
        ("POST", "/v1/models/resnet", False),
        ("GET", "/v2/models/resnet", False),  # metadata: the replica answers it
        ("GET", "/v2/models/resnet/infer", False),
        ("GET", "/v2/models/resnet/versions/ready", False),
        ("GET", "/v2/models/resnet/other/2/ready", False),
        ("GET", "/v2/models/resnet/versions/2/ready/x", False),
        ("GET", "/v2/models/ready", False),
        ("GET", "/v1/models/resnet:predict", False),
        ("GET", "/v1/models/resnet/extra", False),
        ("GET", "/v2/health/ready", False),
    ],
)
def test_is_model_ready_path(method: str, path: str, ready: bool) -> None:
    assert is_model_ready_path(method, path) is ready


def _infer_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="resnet", model_version="2", id="r-1")
    tensor = request.inputs.add()
    tensor.name, tensor.datatype = "input", "FP32"
    tensor.shape.extend([1, 3, 224, 224])
    request.outputs.add().name = "output"
    request.parameters["priority"].int64_param = 3
    # Raw tensor bytes that look like protobuf tags and invalid UTF-8.
    request.raw_input_contents.append(bytes(range(256)) * 64 + b"\x0a\xff\xfe")
    return request


@pytest.mark.parametrize(
    ("message", "name"),
    [
        pytest.param(_infer_request(), "resnet", id="infer-raw-contents"),
        pytest.param(pb.ModelInferRequest(model_name="x" * 300), "x" * 300, id="long-name"),
        pytest.param(pb.ModelReadyRequest(name="resnet", version="1"), "resnet", id="ready"),
        pytest.param(pb.ModelMetadataRequest(name="café"), "café", id="metadata-utf8"),
        pytest.param(pb.ModelStatisticsRequest(name="resnet"), "resnet", id="statistics"),
        pytest.param(pb.ModelStatisticsRequest(name=""), None, id="statistics-all-models"),
        pytest.param(pb.ModelInferRequest(id="no-name"), None, id="infer-without-name"),
    ],
)
def test_field_one_of_real_messages(message: pb.ModelInferRequest, name: str | None) -> None:
    data = message.SerializeToString()
    assert field_one(data) == name


def _tag(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string(number: int, value: bytes) -> bytes:
    return _tag(number, 2) + _varint(len(value)) + value


@pytest.mark.parametrize(
    ("data", "name"),
    [
        # Field 1 after every other wire type.
        pytest.param(
            _string(3, b"id")
            + _tag(2, 0)
            + _varint(2**40)
            + _tag(9, 1)
            + b"\x01" * 8
            + _tag(10, 5)
            + b"\x02" * 4
            + _string(7, b"\x0a\x05wrong")
            + _string(1, b"resnet"),
            "resnet",
            id="field-one-last",
        ),
        pytest.param(_string(1, b""), "", id="empty-string"),
        # Field 1 twice: the last wins, as in every protobuf parser.
        pytest.param(_string(1, b"first") + _string(1, b"second"), "second", id="repeated"),
        # Field 1 with a varint wire type is not the name.
        pytest.param(_tag(1, 0) + _varint(5), None, id="field-one-varint"),
        pytest.param(b"", None, id="empty"),
    ],
)
def test_field_one_of_hand_built_bytes(data: bytes, name: str | None) -> None:
    assert field_one(data) == name


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_string(1, b"resnet")[:-2], id="name-cut-short"),
        pytest.param(_tag(1, 2), id="length-missing"),
        pytest.param(_tag(1, 2) + b"\xff", id="length-varint-unfinished"),
        pytest.param(b"\xff" * 11, id="tag-varint-too-long"),
        pytest.param(_tag(3, 2) + _varint(100) + b"xx" + _string(1, b"m"), id="skip-past-end"),
        pytest.param(_string(1, b"m") + _tag(3, 2) + _varint(100), id="trailing-cut-short"),
        pytest.param(_string(1, b"m") + _tag(9, 1) + b"\x00" * 3, id="fixed64-cut-short"),
        pytest.param(_string(1, b"m") + _tag(9, 5) + b"\x00", id="fixed32-cut-short"),
        pytest.param(_tag(2, 3) + _string(1, b"m"), id="group-start"),
        pytest.param(_tag(2, 7), id="invalid-wire-type"),
        pytest.param(_tag(0, 2) + _varint(1) + b"m", id="field-number-zero"),
        pytest.param(_string(1, b"\xff\xfe"), id="not-utf8"),
        pytest.param(b"\x0a", id="lone-tag"),
        pytest.param(bytes(range(256)), id="garbage"),
    ],
)
def test_field_one_of_malformed_bytes_is_none(data: bytes) -> None:
    assert field_one(data) is None


def test_field_one_never_raises_on_any_prefix() -> None:
    data = _infer_request().SerializeToString()
    for cut in range(0, len(data), 7):
        result = field_one(data[:cut])
        assert result is None or result == "resnet"


def test_the_activator_never_imports_torch() -> None:
    # It starts in a fraction of a second and stays small: model code lives in the replicas.
    import subprocess
    import sys

    code = (
        "import sys, ember.activator.run, ember.activator.settings\n"
        "print(sorted(m for m in ('torch', 'fastapi') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
