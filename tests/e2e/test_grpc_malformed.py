"""Malformed gRPC inference traffic against a real `ember serve`: bytes that are no
ModelInferRequest, raw contents that do not match their tensors, absurd shapes, broken BYTES
length prefixes, typed and raw contents mixed. Each gets its status code and a message that
names the tensor or field; the process stays up and keeps answering good requests.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb

pytestmark = pytest.mark.e2e

# conftest.py's EmberProcess (fixtures hand it over; --import-mode=importlib).
EmberProcess = Any

MODELS = Path(__file__).resolve().parents[2] / "models"
_SERVICE = "/inference.GRPCInferenceService/"
RANDOM_MESSAGES = 200


@pytest.fixture(scope="module")
def server(ember_session: Callable[..., EmberProcess]) -> EmberProcess:
    return ember_session("--model-repository", MODELS, "--model", "identity", "--model", "mlp")


@pytest.fixture(scope="module")
def channel(server: EmberProcess) -> Iterator[grpc.Channel]:
    port = server.args[server.args.index("--grpc_port") + 1]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield channel


def _infer_raw(channel: grpc.Channel, data: bytes) -> bytes:
    # No serializers: the bytes go on the wire exactly as given.
    method = channel.unary_unary(_SERVICE + "ModelInfer")
    reply: bytes = method(data, timeout=30)
    return reply


def _status(channel: grpc.Channel, data: bytes) -> tuple[grpc.StatusCode, str]:
    try:
        _infer_raw(channel, data)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _assert_still_serving(server: EmberProcess, channel: grpc.Channel) -> None:
    assert server.process.poll() is None, server.describe()
    live = channel.unary_unary(
        _SERVICE + "ServerLive",
        request_serializer=pb.ServerLiveRequest.SerializeToString,
        response_deserializer=pb.ServerLiveResponse.FromString,
    )
    assert live(pb.ServerLiveRequest(), timeout=10).live
    request = pb.ModelInferRequest(model_name="identity", id="good")
    request.inputs.add(name="INPUT_FP32", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(struct.pack("<2f", 1.5, -2.0))
    reply = pb.ModelInferResponse.FromString(_infer_raw(channel, request.SerializeToString()))
    assert reply.id == "good" and [o.name for o in reply.outputs] == ["OUTPUT_FP32"]
    assert reply.raw_output_contents[0] == struct.pack("<2f", 1.5, -2.0)
    server.assert_serves("identity")


def test_random_bytes(server: EmberProcess, channel: grpc.Channel) -> None:
    """Random bytes mostly do not parse (INVALID_ARGUMENT, naming the message type); the few
    that do name no model there is (NOT_FOUND). Never INTERNAL or UNKNOWN."""
    rng = random.Random(0)
    seen: dict[grpc.StatusCode, int] = {}
    for _ in range(RANDOM_MESSAGES):
        data = rng.randbytes(rng.randint(1, 300))
        code, details = _status(channel, data)
        seen[code] = seen.get(code, 0) + 1
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
            code, details, data,
        )  # fmt: skip
        if code == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in details:
            assert "inference.ModelInferRequest" in details, details
    assert seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > RANDOM_MESSAGES // 2, seen
    _assert_still_serving(server, channel)


# Bytes that break the wire format itself, each a different way.
WIRE_CASES = {
    "truncated-varint-key": b"\x80",
    "overlong-varint": b"\x0a" + b"\xff" * 11,
    "length-past-end": b"\x0a\x10identity",
    "raw-contents-past-end": b"\x3a\x64\x00",
    "field-number-zero": b"\x02\x00",
    "group-wire-type": b"\x0b\x0c",
    "wire-type-7": b"\x0f",
    "raw-contents-as-varint": b"\x38\x01",
    "truncated-fixed64": b"\x09\x00\x00",
}


@pytest.mark.parametrize("data", list(WIRE_CASES.values()), ids=list(WIRE_CASES))
def test_broken_wire_format(server: EmberProcess, channel: grpc.Channel, data: bytes) -> None:
    code, details = _status(channel, data)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "malformed ModelInfer request" in details, details
    assert "inference.ModelInferRequest" in details, details


def _request(model: str = "identity") -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=model)


def _tensor(
    request: pb.ModelInferRequest, name: str, datatype: str, shape: list[int]
) -> pb.ModelInferRequest.InferInputTensor:
    tensor: pb.ModelInferRequest.InferInputTensor = request.inputs.add(
        name=name, datatype=datatype, shape=shape
    )
    return tensor


def _raw(name: str, datatype: str, shape: list[int], *contents: bytes, model: str = "identity"
         ) -> pb.ModelInferRequest:  # fmt: skip
    request = _request(model)
    _tensor(request, name, datatype, shape)
    request.raw_input_contents.extend(contents)
    return request


def _two_inputs_one_raw() -> pb.ModelInferRequest:
    request = _request()
    _tensor(request, "INPUT_FP32", "FP32", [1, 1])
    _tensor(request, "INPUT_INT32", "INT32", [1, 1])
    request.raw_input_contents.append(b"\x00" * 4)
    return request


def _typed(name: str, datatype: str, shape: list[int], field: str, values: list[Any]
           ) -> pb.ModelInferRequest:  # fmt: skip
    request = _request()
    tensor = _tensor(request, name, datatype, shape)
    getattr(tensor.contents, field).extend(values)
    return request


def _mixed() -> pb.ModelInferRequest:
    request = _typed("INPUT_FP32", "FP32", [1, 2], "fp32_contents", [1.0, 2.0])
    request.raw_input_contents.append(struct.pack("<2f", 1.0, 2.0))
    return request


def _typed_and_raw_for_another_input() -> pb.ModelInferRequest:
    request = _typed("INPUT_FP32", "FP32", [1, 1], "fp32_contents", [1.0])
    tensor = _tensor(request, "INPUT_INT32", "INT32", [1, 1])
    tensor.contents.int_contents.append(3)
    request.raw_input_contents.extend([b"\x00" * 4, b"\x00" * 4])
    return request


def _elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _with_timeout(value: str) -> pb.ModelInferRequest:
    request = _raw("INPUT_FP32", "FP32", [1, 1], b"\x00" * 4)
    request.parameters["timeout"].string_param = value
    return request


_INVALID = grpc.StatusCode.INVALID_ARGUMENT

# (id, request, status, fragments its message must hold)
CASES: list[tuple[str, pb.ModelInferRequest, grpc.StatusCode, list[str]]] = [
    # raw_input_contents that do not match the inputs
    ("fewer-raw-than-inputs", _two_inputs_one_raw(), _INVALID,
     ["raw_input_contents", "1 entries", "2 inputs"]),
    ("more-raw-than-inputs", _raw("INPUT_FP32", "FP32", [1, 1], b"\x00" * 4, b"\x00" * 4),
     _INVALID, ["raw_input_contents", "2 entries", "1 inputs"]),
    ("raw-too-short", _raw("INPUT_FP32", "FP32", [1, 2], b"\x00" * 7), _INVALID,
     ["'INPUT_FP32'", "needs 8 bytes, got 7"]),
    ("raw-too-long", _raw("INPUT_FP32", "FP32", [1, 2], b"\x00" * 9), _INVALID,
     ["'INPUT_FP32'", "needs 8 bytes, got 9"]),
    ("raw-size-for-another-datatype", _raw("INPUT_FP64", "FP64", [1, 2], b"\x00" * 8),
     _INVALID, ["'INPUT_FP64'", "needs 16 bytes, got 8"]),
    ("mlp-raw-short", _raw("input", "FP32", [1, 784], b"\x00" * 783 * 4, model="mlp"), _INVALID,
     ["'input'", "needs 3136 bytes, got 3132"]),
    ("bool-not-0-or-1", _raw("INPUT_BOOL", "BOOL", [1, 2], b"\x01\x02"), _INVALID,
     ["'INPUT_BOOL'", "0 or 1"]),
    # absurd shapes
    ("negative-dimension", _raw("INPUT_FP32", "FP32", [-1, 2], b""), _INVALID,
     ["'INPUT_FP32'", "negative dimension"]),
    # -2**63 has the wire bytes of 2**63 sent as an unsigned varint
    ("dimension-2-to-the-63", _raw("INPUT_FP32", "FP32", [-(2**63), 1], b""), _INVALID,
     ["'INPUT_FP32'", "negative dimension"]),
    ("element-count-overflows", _raw("INPUT_FP32", "FP32", [2**62, 2**62], b"\x00" * 8),
     _INVALID, ["'INPUT_FP32'", "too large"]),
    ("huge-dimension", _raw("INPUT_INT64", "INT64", [2**63 - 1], b"\x00" * 8), _INVALID,
     ["'INPUT_INT64'", "too large"]),
    ("huge-count-few-bytes", _raw("INPUT_FP32", "FP32", [2**40, 2**10], b"\x00" * 8), _INVALID,
     ["'INPUT_FP32'", f"needs {2**52} bytes, got 8"]),
    ("huge-but-empty", _raw("INPUT_FP32", "FP32", [0, 2**62, 2**62], b""), _INVALID,
     ["'INPUT_FP32'", "too large"]),
    ("too-many-dimensions", _raw("INPUT_FP32", "FP32", [1] * 40, b"\x00" * 4), _INVALID,
     ["'INPUT_FP32'", "40 dimensions"]),
    ("huge-typed", _typed("INPUT_INT32", "INT32", [1, 2**40], "int_contents", [1]), _INVALID,
     ["'INPUT_INT32'", f"needs {2**40} elements", "int_contents has 1"]),
    ("shape-not-the-model's", _raw("input", "FP32", [784], b"\x00" * 3136, model="mlp"),
     _INVALID, ["'input'", "[-1, 784]"]),
    ("batch-over-the-limit", _raw("input", "FP32", [65, 784], b"\x00" * 65 * 3136, model="mlp"),
     _INVALID, ["'input'", "max_batch_size 64"]),
    # BYTES with broken length prefixes
    ("bytes-length-past-end", _raw("INPUT_BYTES", "BYTES", [1, 1],
                                   struct.pack("<I", 100) + b"abc"),
     _INVALID, ["'INPUT_BYTES'", "element 0", "claims 100 bytes", "3 remain"]),
    ("bytes-length-4GiB", _raw("INPUT_BYTES", "BYTES", [1, 1], b"\xff\xff\xff\xff" + b"a"),
     _INVALID, ["'INPUT_BYTES'", "claims 4294967295 bytes"]),
    ("bytes-truncated-prefix",
     _raw("INPUT_BYTES", "BYTES", [1, 2], _elements(b"abc") + b"\x01\x00"), _INVALID,
     ["'INPUT_BYTES'", "element 1", "no length prefix"]),
    ("bytes-shorter-than-prefixes", _raw("INPUT_BYTES", "BYTES", [1, 3], b"\x00\x00"), _INVALID,
     ["'INPUT_BYTES'", "at least 12 bytes, got 2"]),
    ("bytes-left-over", _raw("INPUT_BYTES", "BYTES", [1, 1], _elements(b"ab") + b"zz"), _INVALID,
     ["'INPUT_BYTES'", "2 bytes left over"]),
    ("bytes-count-huge", _raw("INPUT_BYTES", "BYTES", [2**40, 2**10], _elements(b"a")),
     _INVALID, ["'INPUT_BYTES'", "needs at least"]),
    # typed contents, alone and mixed with raw
    ("typed-and-raw", _mixed(), _INVALID,
     ["'INPUT_FP32'", "'contents'", "raw_input_contents"]),
    ("typed-and-raw-two-inputs", _typed_and_raw_for_another_input(), _INVALID,
     ["'INPUT_FP32'", "'contents'", "raw_input_contents"]),
    ("typed-in-the-wrong-field", _typed("INPUT_FP32", "FP32", [1, 2], "int_contents", [1, 2]),
     _INVALID, ["'INPUT_FP32'", "fp32_contents has 0"]),
    ("typed-count-mismatch", _typed("INPUT_INT64", "INT64", [1, 3], "int64_contents", [1, 2]),
     _INVALID, ["'INPUT_INT64'", "needs 3 elements", "int64_contents has 2"]),
    ("typed-out-of-range", _typed("INPUT_INT8", "INT8", [1, 1], "int_contents", [300]),
     _INVALID, ["'INPUT_INT8'", "out of range", "INT8"]),
    ("typed-fp16", _typed("INPUT_FP16", "FP16", [1, 1], "fp32_contents", [1.0]), _INVALID,
     ["'INPUT_FP16'", "no typed contents", "raw_input_contents"]),
    # the rest of the message
    ("unknown-datatype", _raw("INPUT_FP32", "FLOAT32", [1, 1], b"\x00" * 4), _INVALID,
     ["'INPUT_FP32'", "unknown datatype", "FLOAT32"]),
    ("datatype-not-the-model's", _raw("INPUT_FP32", "FP64", [1, 1], b"\x00" * 8), _INVALID,
     ["'INPUT_FP32'", "FP64", "FP32"]),
    ("empty-input-name", _raw("", "FP32", [1, 1], b"\x00" * 4), _INVALID,
     ["inputs[0]", "'name'"]),
    ("unknown-input", _raw("pixels", "FP32", [1, 1], b"\x00" * 4), _INVALID,
     ["'pixels'", "identity"]),
    ("no-inputs", _request(), _INVALID, ["no inputs"]),
    ("timeout-not-an-integer", _with_timeout("soon"), _INVALID, ["'timeout'", "soon"]),
    ("unknown-model", _raw("INPUT_FP32", "FP32", [1, 1], b"\x00" * 4, model="nope"),
     grpc.StatusCode.NOT_FOUND, ["'nope'", "not found"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_message", "status", "fragments"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_request(
    server: EmberProcess,
    channel: grpc.Channel,
    request_message: pb.ModelInferRequest,
    status: grpc.StatusCode,
    fragments: list[str],
) -> None:
    code, details = _status(channel, request_message.SerializeToString())
    assert code == status, (code, details)
    for fragment in fragments:
        assert fragment.lower() in details.lower(), f"{fragment!r} not in {details!r}"


def test_zero_element_tensors_are_answered(channel: grpc.Channel) -> None:
    """Empty tensors are valid: the shape comes back as sent, with no bytes."""
    for request, output, shape in [
        (_raw("INPUT_INT32", "INT32", [0, 2**40], b""), "OUTPUT_INT32", [0, 2**40]),
        (_raw("input", "FP32", [0, 784], b"", model="mlp"), "output", [0, 10]),
    ]:
        reply = pb.ModelInferResponse.FromString(_infer_raw(channel, request.SerializeToString()))
        assert [(o.name, list(o.shape)) for o in reply.outputs] == [(output, shape)]
        assert reply.raw_output_contents == [b""]


def test_stream_survives_bad_messages(server: EmberProcess, channel: grpc.Channel) -> None:
    """On ModelStreamInfer a request that decodes but is wrong is answered on the stream
    (error_message) and the stream goes on; bytes that do not parse end the stream with
    INVALID_ARGUMENT. Either way the server keeps serving."""
    stream = channel.stream_stream(_SERVICE + "ModelStreamInfer")
    good = _raw("INPUT_FP32", "FP32", [1, 1], b"\x00" * 4).SerializeToString()
    bad = _raw("INPUT_FP32", "FP32", [1, 2], b"\x00" * 3).SerializeToString()
    replies = [pb.ModelStreamInferResponse.FromString(r) for r in stream(iter([bad, good]))]
    errors = sorted(r.error_message for r in replies)
    assert errors[0] == "" and "needs 8 bytes, got 3" in errors[1], errors
    with pytest.raises(grpc.RpcError) as caught:
        list(stream(iter([good, b"\x0a\x10x"]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ModelStreamInfer" in (caught.value.details() or "")
    _assert_still_serving(server, channel)


def test_a_stream_broken_after_a_good_message_always_ends_with_its_status(
    channel: grpc.Channel,
) -> None:
    """The abort used to be sent from the servicer's reading task while the handler could
    be sending the good message's answer; the status was lost for 4-8% of such streams,
    which then hung to their deadline."""
    stream = channel.stream_stream(_SERVICE + "ModelStreamInfer")
    good = _raw("INPUT_FP32", "FP32", [1, 1], b"\x00" * 4).SerializeToString()
    codes = []
    for _ in range(100):
        with pytest.raises(grpc.RpcError) as caught:
            list(stream(iter([good, b"\x0a\x10x"]), timeout=5))
        codes.append(caught.value.code())
    assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}, codes


def test_still_serving_after_everything(server: EmberProcess, channel: grpc.Channel) -> None:
    _assert_still_serving(server, channel)
