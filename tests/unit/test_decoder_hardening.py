"""Regressions from fuzzing the decoders (tests/fuzz): each input here once escaped as
something other than the project's typed input errors (a 500 at the door, a traceback at
startup) or was silently changed."""

from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2 as pb

from ember.server.codecs import v1, v2
from ember.server.codecs.raw import MAX_DIMS, array_from_raw
from ember.server.config import ModelConfig, load_model_config
from ember.server.errors import ConfigError, InvalidInput, PayloadTooLarge
from ember.server.rest.body import byte_count, split_binary_body
from ember.server.rest.infer import too_large
from ember.server.rpc import codec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def identity() -> ModelConfig:
    return load_model_config(ROOT / "models" / "identity")


@pytest.fixture(scope="module")
def minilm() -> ModelConfig:
    return load_model_config(ROOT / "models" / "minilm")


def _v2(tensor: dict[str, Any]) -> None:
    v2.decode_request({"inputs": [{"name": "x", **tensor}]}, "m", None)


# --- header byte counts: str.isdigit() accepts what int() refuses ------------------------


@pytest.mark.parametrize("value", ["²", "١٢", "3²", "1\u0660", " 5", "-1", "0x10", ""])
def test_binary_header_that_is_no_ascii_count(value: str) -> None:
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length must be a byte"):
        split_binary_body(b"{}", value)


def test_binary_header_of_leading_zeros_and_of_thousands_of_digits() -> None:
    json_part, rest = split_binary_body(b"{}xy", "0002")
    assert (json_part, bytes(rest)) == (b"{}", b"xy")
    assert split_binary_body(b"{}", "00")[0] == b""
    # int() refuses strings of more than 4300 digits: this was a ValueError, a 500.
    with pytest.raises(InvalidInput, match="larger than the body"):
        split_binary_body(b"{}", "9" * 5000)


def test_declared_content_length() -> None:
    assert byte_count("0" * 5000 + "7") == 7
    assert too_large("²", 10) is None
    assert isinstance(too_large("9" * 5000, 10), PayloadTooLarge)


# --- shapes numpy cannot make ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ([0, 2**64], "too large"),
        ([0, 2**40, 2**40], "too large"),
        ([2**62, 2**62], "too large"),
        ([1] * (MAX_DIMS + 1), f"at most {MAX_DIMS}"),
    ],
)
def test_unmakeable_shapes(shape: list[int], fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        _v2({"datatype": "INT32", "shape": shape, "data": []})
    with pytest.raises(InvalidInput, match=fragment):
        array_from_raw(b"", "BYTES", tuple(shape), "input 'x'")
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[min(d, 2**63 - 1) for d in shape])
    request.raw_input_contents.append(b"")
    with pytest.raises(InvalidInput, match=fragment):
        codec.decode_request(request, None)


def test_empty_tensor_with_large_dimensions_still_decodes() -> None:
    request = v2.decode_request(
        {"inputs": [{"name": "x", "datatype": "INT32", "shape": [0, 2**40], "data": []}]},
        "m", None,
    )  # fmt: skip
    assert request.inputs[0].data.shape == (0, 2**40)


# --- deep nesting and huge values in error messages --------------------------------------

_DEEP = orjson.loads(b"[" * 1000 + b"]" * 1000)


def test_deep_shape_is_refused_not_a_recursion_error() -> None:
    with pytest.raises(InvalidInput, match="'shape' must be a list") as caught:
        _v2({"datatype": "INT32", "shape": _DEEP, "data": []})
    assert len(caught.value.message) < 300


def test_deep_v1_bytes_are_refused(identity: ModelConfig) -> None:
    with pytest.raises(InvalidInput, match="nested deeper than"):
        v1.decode_request({"inputs": {"INPUT_BYTES": _DEEP}}, identity)


@pytest.mark.parametrize(
    "tensor",
    [
        {"datatype": "x" * 1_000_000, "shape": [1], "data": [1]},
        {"datatype": [_DEEP], "shape": [1], "data": [1]},
        {"datatype": "INT32", "shape": {"k": "v" * 1_000_000}, "data": [1]},
        {"datatype": "INT32", "shape": [1], "parameters": {"binary_data_size": 4}},
    ],
)
def test_error_messages_quote_values_briefly(tensor: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput) as caught:
        _v2(tensor)
    assert len(caught.value.message) < 400, caught.value.message[:400]


def test_request_id_and_timeout_quoted_briefly() -> None:
    tensor = {"name": "x", "datatype": "INT32", "shape": [1], "data": [1]}
    for doc in ({"id": [_DEEP], "inputs": [tensor]},
                {"parameters": {"timeout": "9" * 100_000}, "inputs": [tensor]}):  # fmt: skip
        with pytest.raises(InvalidInput) as caught:
            v2.decode_request(doc, "m", None)
        assert len(caught.value.message) < 300


# --- floats that overflowed to infinity -----------------------------------------------------


def test_json_float_beyond_fp32_is_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(InvalidInput, match="out of range for FP32"):
            _v2({"datatype": "FP32", "shape": [2], "data": [1.0, 1e300]})
        array = v2.decode_request(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [3.4e38]}]},
            "m", None,
        ).inputs[0].data  # fmt: skip
    assert np.isfinite(array).all()


@pytest.mark.parametrize(("name", "value"), [("INPUT_FP16", 70000.0), ("INPUT_BF16", 1e39)])
def test_v1_half_floats_beyond_range_are_refused(
    identity: ModelConfig, name: str, value: float
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(InvalidInput, match="out of range"):
            v1.decode_request({"inputs": {name: [[1.0, value]]}}, identity)
        request = v1.decode_request({"inputs": {name: [[1.0, 60000.0]]}}, identity)
    assert np.isfinite(request.inputs[0].data.astype(np.float32)).all()


def test_v1_b64_still_decodes(minilm: ModelConfig) -> None:
    request = v1.decode_request({"instances": [{"b64": "aGk="}, "there"]}, minilm)
    assert request.inputs[0].data.tolist() == [b"hi", b"there"]


# --- gRPC: typed contents beside raw contents --------------------------------------------


def test_grpc_typed_and_raw_contents_together_are_refused() -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    request.raw_input_contents.append(struct.pack("<2f", 1.0, 2.0))
    with pytest.raises(InvalidInput, match="input 'x': has both 'contents' and raw_input"):
        codec.decode_request(request, None)


# --- model.toml: what tomllib raises besides TOMLDecodeError -----------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("max_batch_size = " + "9" * 5000, "not valid TOML"),
        ("kwargs = " + "[" * 3000 + "]" * 3000, "nested too deeply"),
        ("kwargs = " + "{a=" * 2000 + "1" + "}" * 2000, "nested too deeply"),
    ],
)
def test_model_toml_that_tomllib_cannot_read(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "model.toml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=fragment) as caught:
        load_model_config(tmp_path)
    assert str(caught.value).startswith(str(tmp_path / "model.toml"))


# --- through the HTTP door --------------------------------------------------------------


async def test_unicode_digit_binary_header_is_a_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v2/models/identity/infer",
        content=b"{}",
        # "²" in latin-1, as the front decodes header bytes.
        headers=[(b"Inference-Header-Content-Length", b"\xb2")],
    )
    assert response.status_code == 400, response.text
    assert "Inference-Header-Content-Length" in response.json()["error"]


async def test_zero_size_shape_with_huge_dimension_is_a_400(client: httpx.AsyncClient) -> None:
    body = {"inputs": [{"name": "INPUT_INT32", "datatype": "INT32", "shape": [0, 2**62, 2**62],
                        "data": []}]}  # fmt: skip
    response = await client.post("/v2/models/identity/infer", json=body)
    assert response.status_code == 400, response.text
    assert "too large" in response.json()["error"]
