"""Hand-built ModelInferRequests on a raw gRPC channel: bad input is refused fast and safely."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

if TYPE_CHECKING:
    from conftest import Server

pytestmark = pytest.mark.e2e

INFER = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc) as opened:
        yield opened


@pytest.fixture
def stub(channel: grpc.Channel) -> Any:
    return service_pb2_grpc.GRPCInferenceServiceStub(channel)


def request(*tensors: tuple[str, str, list[int], bytes | None]) -> pb.ModelInferRequest:
    """A request to `identity`; each tensor is (name, datatype, shape, raw bytes or None)."""
    message = pb.ModelInferRequest(model_name="identity", id="raw")
    for name, datatype, shape, raw in tensors:
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        if raw is not None:
            message.raw_input_contents.append(raw)
    return message


def good() -> pb.ModelInferRequest:
    return request(("INPUT_INT32", "INT32", [1, 3], np.arange(3, dtype="<i4").tobytes()))


def assert_serves(stub: Any) -> None:
    response = stub.ModelInfer(good(), timeout=10)
    assert response.outputs[0].name == "OUTPUT_INT32"
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<i4"), [0, 1, 2])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def expect(stub: Any, message: pb.ModelInferRequest, code: grpc.StatusCode, *words: str) -> float:
    """Send `message`, check the status and that the details name `words`; the seconds taken."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(message, timeout=10)
    elapsed = time.monotonic() - started
    error: Any = info.value
    assert error.code() == code, (error.code(), error.details())
    for word in words:
        assert word.lower() in error.details().lower(), f"{word!r} not in {error.details()!r}"
    assert_serves(stub)
    return elapsed


_ABC = struct.pack("<I", 3) + b"abc"  # one BYTES element
_FOUR = np.zeros(4, dtype="<f4").tobytes()


def _extra_raw() -> pb.ModelInferRequest:
    message = request(("INPUT_FP32", "FP32", [1, 4], _FOUR))
    message.raw_input_contents.append(_FOUR)
    return message


def _typed_short() -> pb.ModelInferRequest:
    message = request(("INPUT_INT32", "INT32", [1, 3], None))
    message.inputs[0].contents.int_contents.extend([1, 2])
    return message


BAD: dict[str, tuple[Callable[[], pb.ModelInferRequest], tuple[str, ...]]] = {
    "fewer raw contents than inputs": (
        lambda: request(
            ("INPUT_FP32", "FP32", [1, 4], _FOUR), ("INPUT_INT8", "INT8", [1, 1], None)
        ),
        ("raw_input_contents", "1", "2"),
    ),
    "more raw contents than inputs": (_extra_raw, ("raw_input_contents", "2", "1")),
    "negative shape": (
        lambda: request(("INPUT_FP32", "FP32", [-1, 4], _FOUR)),
        ("INPUT_FP32", "negative"),
    ),
    "raw size disagrees with shape": (
        lambda: request(("INPUT_FP32", "FP32", [1, 3], _FOUR)),
        ("INPUT_FP32", "12", "16"),
    ),
    "unknown datatype": (
        lambda: request(("INPUT_FP32", "FP8", [1, 4], _FOUR)),
        ("INPUT_FP32", "FP8"),
    ),
    "BYTES length past the buffer": (
        lambda: request(("INPUT_BYTES", "BYTES", [1, 2], _ABC + struct.pack("<I", 1000) + b"xyz")),
        ("INPUT_BYTES", "element 1", "1000"),
    ),
    "BYTES length prefix truncated": (
        lambda: request(("INPUT_BYTES", "BYTES", [1, 2], _ABC + b"\x05\x00")),
        ("INPUT_BYTES", "element 1", "length"),
    ),
    "BYTES count needs more than the buffer": (
        lambda: request(("INPUT_BYTES", "BYTES", [1, 5], _ABC)),
        ("INPUT_BYTES", "bytes"),
    ),
    "typed contents count disagrees with shape": (_typed_short, ("INPUT_INT32", "3", "2")),
    "no inputs": (lambda: pb.ModelInferRequest(model_name="identity"), ("inputs",)),
    "empty input name": (
        lambda: request(("", "FP32", [1, 4], _FOUR)),
        ("name",),
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request(stub: Any, case: str) -> None:
    build, words = BAD[case]
    expect(stub, build(), grpc.StatusCode.INVALID_ARGUMENT, *words)


def test_unknown_model(stub: Any) -> None:
    message = good()
    message.model_name = "no-such-model"
    expect(stub, message, grpc.StatusCode.NOT_FOUND, "no-such-model")


def test_typed_contents_are_accepted(stub: Any) -> None:
    message = request(("INPUT_INT32", "INT32", [1, 3], None))
    message.inputs[0].contents.int_contents.extend([7, 8, 9])
    response = stub.ModelInfer(message, timeout=10)
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<i4"), [7, 8, 9])


@pytest.mark.parametrize(
    ("datatype", "raw"),
    [("FP32", _FOUR), ("BYTES", _ABC), ("INT64", None)],
)
def test_absurd_shape_is_refused_fast(
    server: Server, stub: Any, datatype: str, raw: bytes | None
) -> None:
    """2**40 elements declared, a few bytes sent: refused at once, nothing allocated."""
    before = rss_bytes(server.process.pid)
    message = request((f"INPUT_{datatype}", datatype, [2**20, 2**20], raw))
    if raw is None:
        message.inputs[0].contents.int64_contents.extend([1, 2, 3])
    elapsed = expect(stub, message, grpc.StatusCode.INVALID_ARGUMENT, f"INPUT_{datatype}")
    assert elapsed < 0.5
    assert rss_bytes(server.process.pid) - before < 64 * 1024 * 1024


def test_garbage_bytes(channel: grpc.Channel, stub: Any) -> None:
    """Bytes that are no ModelInferRequest at all (a length-delimited field running past the
    end, then noise): the client's fault, so INVALID_ARGUMENT, and the server lives on."""
    infer = channel.unary_unary(
        INFER,
        request_serializer=lambda b: b,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    garbage = b"\x0a\xff\xff\xff\x0f" + np.random.default_rng(7).bytes(256)
    with pytest.raises(DecodeError):
        pb.ModelInferRequest.FromString(garbage)  # really not a request
    with pytest.raises(grpc.RpcError) as info:
        infer(garbage, timeout=10)
    error: Any = info.value
    assert_serves(stub)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    assert "ModelInferRequest" in error.details()


def test_many_bad_requests_leave_the_server_healthy(server: Server, stub: Any) -> None:
    before = rss_bytes(server.process.pid)
    for _ in range(20):
        for build, _words in BAD.values():
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(build(), timeout=10)
    assert_serves(stub)
    assert rss_bytes(server.process.pid) - before < 64 * 1024 * 1024
