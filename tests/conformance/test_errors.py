"""Error rows: the right HTTP status / gRPC code and a message that names the problem."""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.utils import InferenceServerException

if TYPE_CHECKING:
    from conftest import Api, Server

pytestmark = pytest.mark.e2e

GOOD = {"INPUT_INT32": np.array([[1, 2, 3]], dtype=np.int32)}


def assert_serves(api: Api) -> None:
    got = api.infer("identity", GOOD).as_numpy("OUTPUT_INT32")
    np.testing.assert_array_equal(got, GOOD["INPUT_INT32"])


# --- through tritonclient -------------------------------------------------------------------
def test_unknown_model(api: Api) -> None:
    with api.raises(404, "NOT_FOUND", "no-such-model", "not found"):
        api.infer("no-such-model", GOOD)
    with api.raises(404, "NOT_FOUND", "no-such-model"):
        api.client.get_model_metadata("no-such-model")
    with api.raises(404, "NOT_FOUND", "no-such-model"):
        api.client.get_model_config("no-such-model")
    with api.raises(404, "NOT_FOUND", "no-such-model"):
        api.client.get_inference_statistics("no-such-model")


def test_unknown_version(api: Api) -> None:
    assert api.infer("identity", GOOD, model_version="1").as_numpy("OUTPUT_INT32") is not None
    with api.raises(404, "NOT_FOUND", "identity", "7"):
        api.infer("identity", GOOD, model_version="7")
    with api.raises(404, "NOT_FOUND", "mlp", "7"):
        api.client.get_model_metadata("mlp", "7")


def test_wrong_input_name(api: Api) -> None:
    with api.raises(400, "INVALID_ARGUMENT", "INPUT_NOPE"):
        api.infer("identity", {"INPUT_NOPE": GOOD["INPUT_INT32"]})
    assert_serves(api)


def test_wrong_datatype(api: Api) -> None:
    item = api.module.InferInput("INPUT_FP32", [1, 3], "INT32")
    item.set_data_from_numpy(GOOD["INPUT_INT32"])
    with api.raises(400, "INVALID_ARGUMENT", "INPUT_FP32", "INT32", "FP32"):
        api.client.infer("identity", [item])
    with api.raises(400, "INVALID_ARGUMENT", "input", "FP64", "FP32"):
        api.infer("mlp", {"input": np.zeros((1, 784), dtype=np.float64)})


def test_wrong_shape(api: Api) -> None:
    with api.raises(400, "INVALID_ARGUMENT", "input", "shape", "784"):
        api.infer("mlp", {"input": np.zeros((2, 100), dtype=np.float32)})
    with api.raises(400, "INVALID_ARGUMENT", "INPUT_INT32", "shape"):
        api.infer("identity", {"INPUT_INT32": np.zeros((2, 2, 2), dtype=np.int32)})
    assert_serves(api)


def test_no_inputs(api: Api) -> None:
    with api.raises(400, "INVALID_ARGUMENT", "inputs"):
        api.client.infer("mlp", [])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_missing_required_input(
    sleepy_server: Server, make_api: Callable[[str, Server], Api], protocol: str
) -> None:  # fmt: skip
    sleepy = make_api(protocol, sleepy_server)
    with sleepy.raises(400, "INVALID_ARGUMENT", "missing", "SECONDS"):
        sleepy.client.infer("sleepy", _sleepy(sleepy.module, 0.0)[:1])


def test_unknown_output(api: Api) -> None:
    with api.raises(400, "INVALID_ARGUMENT", "OUTPUT_NOPE"):
        api.infer("identity", GOOD, ["OUTPUT_NOPE"])


def test_shape_and_data_disagree(api: Api) -> None:
    """The client says [1, 3] but sends 2 elements (tritonclient checks shapes; fool it)."""
    item = api.module.InferInput("INPUT_INT32", [1, 2], "INT32")
    item.set_data_from_numpy(np.array([[1, 2]], dtype=np.int32))
    item.set_shape([1, 3])
    with api.raises(400, "INVALID_ARGUMENT", "INPUT_INT32", "12", "8"):
        api.client.infer("identity", [item])
    assert_serves(api)


@pytest.mark.parametrize("microseconds", [0, 1])
def test_timeout_parameter(api: Api, microseconds: int) -> None:
    """tritonclient's `timeout` (µs) travels as a request parameter: expired -> 504 / DEADLINE."""
    with api.raises(504, "DEADLINE_EXCEEDED", "expired"):
        api.infer("mlp", {"input": np.zeros((1, 784), dtype=np.float32)}, timeout=microseconds)
    assert_serves(api)


def _sleepy(module: Any, seconds: float) -> list[Any]:
    data = module.InferInput("INPUT", [2], "FP32")
    data.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
    delay = module.InferInput("SECONDS", [1], "FP32")
    delay.set_data_from_numpy(np.array([seconds], dtype=np.float32))
    return [data, delay]


def test_grpc_client_timeout(sleepy_server: Server, make_api: Callable[[str, Server], Api]) -> None:
    sleepy = make_api("grpc", sleepy_server)
    started = time.monotonic()
    with sleepy.raises(504, "DEADLINE_EXCEEDED", "deadline"):
        sleepy.client.infer("sleepy", _sleepy(grpcclient, 1.0), client_timeout=0.2)
    assert time.monotonic() - started < 0.9
    result = sleepy.client.infer("sleepy", _sleepy(grpcclient, 0.0), client_timeout=10)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT"), [1.0, 2.0])


async def test_grpc_aio_client_timeout(sleepy_server: Server) -> None:
    client = grpcaio.InferenceServerClient(sleepy_server.grpc)
    try:
        with pytest.raises(InferenceServerException) as info:
            await client.infer("sleepy", _sleepy(grpcaio, 1.0), client_timeout=0.2)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED", str(info.value)
        result = await client.infer("sleepy", _sleepy(grpcaio, 0.0), client_timeout=10)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT"), [1.0, 2.0])
    finally:
        await client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_deadline_passes_while_queued(
    sleepy_server: Server, make_api: Callable[[str, Server], Api], protocol: str
) -> None:  # fmt: skip
    """A request stuck behind a slow one past its `timeout` is dropped with 504 / DEADLINE."""
    slow, queued = make_api(protocol, sleepy_server), make_api(protocol, sleepy_server)
    blocker = threading.Thread(
        target=lambda: slow.client.infer("sleepy", _sleepy(slow.module, 0.8))
    )
    blocker.start()
    try:
        time.sleep(0.2)  # the slow request holds the model's thread
        with queued.raises(504, "DEADLINE_EXCEEDED", "deadline"):
            queued.client.infer("sleepy", _sleepy(queued.module, 0.0), timeout=100_000)
    finally:
        blocker.join()


def test_shared_memory_is_unimplemented(grpc_api: Api) -> None:
    calls = [
        ("SystemSharedMemoryStatus", lambda: grpc_api.client.get_system_shared_memory_status()),
        ("CudaSharedMemoryStatus", lambda: grpc_api.client.get_cuda_shared_memory_status()),
        ("SystemSharedMemoryRegister",
         lambda: grpc_api.client.register_system_shared_memory("r", "/k", 64)),
        ("TraceSetting", lambda: grpc_api.client.get_trace_settings()),
        ("LogSettings", lambda: grpc_api.client.get_log_settings()),
    ]  # fmt: skip
    for method, call in calls:
        with grpc_api.raises(501, "UNIMPLEMENTED", method, "not supported"):
            call()
    assert_serves(grpc_api)


def test_shared_memory_http_answers_readably(http_api: Api) -> None:
    """No shared-memory routes over HTTP: an error tritonclient can read, not a crash."""
    with pytest.raises(InferenceServerException) as info:
        http_api.client.get_system_shared_memory_status()
    assert info.value.status() in ("404", "501"), str(info.value)
    assert info.value.message()


# --- hand-made HTTP bodies (Triton's binary extension gone wrong) --------------------------
def _binary(header: dict[str, Any], data: bytes, header_length: int | str | None = None) -> Any:
    """(headers, body) of a binary-extension request: the JSON header, then `data`."""
    doc = json.dumps(header).encode()
    length = len(doc) if header_length is None else header_length
    return {"Inference-Header-Content-Length": str(length)}, doc + data


def _fp32_input(size: int, shape: list[int] | None = None) -> dict[str, Any]:
    return {"inputs": [{"name": "INPUT_FP32", "datatype": "FP32", "shape": shape or [1, 3],
                        "parameters": {"binary_data_size": size}}]}  # fmt: skip


def _bytes_input(size: int, count: int = 2) -> dict[str, Any]:
    return {"inputs": [{"name": "INPUT_BYTES", "datatype": "BYTES", "shape": [1, count],
                        "parameters": {"binary_data_size": size}}]}  # fmt: skip


_ABC = struct.pack("<I", 3) + b"abc"
MALFORMED: dict[str, tuple[Any, tuple[str, ...]]] = {
    "header length past the body": (
        _binary(_fp32_input(12), b"\0" * 12, header_length=10_000),
        ("Inference-Header-Content-Length", "larger"),
    ),
    "header length not a number": (
        _binary(_fp32_input(12), b"\0" * 12, header_length="ten"),
        ("Inference-Header-Content-Length",),
    ),
    "header length cuts the JSON": (
        _binary(_fp32_input(12), b"\0" * 12, header_length=20),
        ("JSON",),
    ),
    "binary_data_size past the end": (
        _binary(_fp32_input(400), b"\0" * 12),
        ("INPUT_FP32", "binary_data_size", "400"),
    ),
    "binary_data_size leaves bytes over": (
        _binary(_fp32_input(12), b"\0" * 20),
        ("8 bytes", "not claimed"),
    ),
    "binary_data_size disagrees with shape": (
        _binary(_fp32_input(8), b"\0" * 8),
        ("INPUT_FP32", "12 bytes", "got 8"),
    ),
    "binary_data_size negative": (
        _binary(_fp32_input(-4), b"\0" * 12),
        ("INPUT_FP32", "binary_data_size"),
    ),
    "absurd shape": (
        _binary(_fp32_input(12, shape=[2**20, 2**20]), b"\0" * 12),
        ("INPUT_FP32", "bytes"),
    ),
    "BYTES length prefix truncated": (
        _binary(_bytes_input(len(_ABC) + 2), _ABC + b"\x05\x00"),
        ("INPUT_BYTES", "element 1", "length"),
    ),
    "BYTES length past the buffer": (
        _binary(_bytes_input(len(_ABC) + 7), _ABC + struct.pack("<I", 1000) + b"xyz"),
        ("INPUT_BYTES", "element 1", "1000"),
    ),
    "BYTES bytes left over": (
        _binary(_bytes_input(2 * len(_ABC) + 1, count=2), _ABC + _ABC + b"!"),
        ("INPUT_BYTES", "left over"),
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_binary_http(server: Server, http_api: Api, case: str) -> None:
    (headers, body), words = MALFORMED[case]
    with httpx.Client(base_url=server.http_url, timeout=10) as client:
        response = client.post("/v2/models/identity/infer", headers=headers, content=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    for word in words:
        assert word.lower() in error.lower(), f"{word!r} not in {error!r}"
    assert_serves(http_api)


def test_malformed_json_http(server: Server, http_api: Api) -> None:
    rows: list[tuple[bytes, tuple[str, ...]]] = [
        (b"{not json", ("JSON",)),
        (b"", ("empty",)),
        (b"[]", ("object",)),
        (b'{"inputs": []}', ("inputs",)),
        (json.dumps({"inputs": [{"name": "INPUT_INT32", "datatype": "INT32", "shape": [1, 3],
                                 "data": [1, 2]}]}).encode(), ("INPUT_INT32", "3", "2")),
        (json.dumps({"inputs": [{"name": "INPUT_INT32", "datatype": "INT32", "shape": [-1, 2],
                                 "data": [1, 2]}]}).encode(), ("INPUT_INT32", "shape")),
        (json.dumps({"inputs": [{"name": "INPUT_INT32", "datatype": "INT32",
                                 "shape": [2**20, 2**20], "data": [1, 2]}]}).encode(),
         ("INPUT_INT32", "elements")),
        (json.dumps({"inputs": [{"name": "INPUT_INT8", "datatype": "INT8", "shape": [1, 1],
                                 "data": [300]}]}).encode(), ("INPUT_INT8", "range")),
        (json.dumps({"inputs": [{"name": "INPUT_INT32", "datatype": "INT32", "shape": [1, 1],
                                 "data": [1]}], "parameters": {"timeout": "soon"}}).encode(),
         ("timeout",)),
    ]  # fmt: skip
    with httpx.Client(base_url=server.http_url, timeout=10) as client:
        for body, words in rows:
            response = client.post("/v2/models/identity/infer", content=body)
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            for word in words:
                assert word.lower() in error.lower(), f"{word!r} not in {error!r}"
    assert_serves(http_api)


def test_unknown_route_is_readable(server: Server) -> None:
    """tritonclient reads every non-200 as {"error": ...}: so must unknown routes answer."""
    response = httpx.get(f"{server.http_url}/v2/no/such/route")
    assert response.status_code == 404
    assert "error" in response.json()
