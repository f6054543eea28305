"""The gRPC door: codec units, and every row of the status table through a real grpc.aio
server on a free port, in process."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from ember.server.dataplane import DataPlane
from ember.server.errors import ErrorCode, InvalidInput
from ember.server.request import InferResponse, Tensor
from ember.server.rpc import codec, wire
from ember.server.rpc.errors import GRPC_STATUS
from ember.server.rpc.server import build_server


def infer_request(**fields: object) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(**fields)  # type: ignore[arg-type]


def tensor(name: str, datatype: str, shape: list[int], **contents: object) -> object:
    message = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(message.contents, field).extend(values)
    return message


def test_typed_contents_decode() -> None:
    request = infer_request(
        model_name="m",
        id="x1",
        inputs=[
            tensor("a", "INT16", [2], int_contents=[-3, 4]),
            tensor("b", "BYTES", [1, 1], bytes_contents=[b"hi"]),
            tensor("c", "BOOL", [2], bool_contents=[True, False]),
        ],
    )
    request.parameters["priority"].int64_param = 2
    decoded = codec.decode_request(request, None)
    assert decoded.id == "x1" and decoded.parameters == {"priority": 2}
    assert decoded.inputs[0].data.dtype == np.int16 and decoded.inputs[0].data.tolist() == [-3, 4]
    assert decoded.inputs[1].data.tolist() == [[b"hi"]]
    assert decoded.deadline is None


def test_grpc_deadline_becomes_request_deadline() -> None:
    request = infer_request(model_name="m", inputs=[tensor("a", "FP32", [1], fp32_contents=[1.0])])
    assert codec.decode_request(request, 5.0).deadline is not None


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (infer_request(model_name="m"), "no inputs"),
        (
            infer_request(
                model_name="m",
                inputs=[tensor("a", "FP32", [1]), tensor("b", "FP32", [1])],
                raw_input_contents=[b"\x00" * 4],
            ),
            "raw_input_contents has 1 entries for 2 inputs",
        ),
        (
            infer_request(model_name="m", inputs=[tensor("a", "FP32", [2], fp32_contents=[1.0])]),
            "needs 2 elements, fp32_contents has 1",
        ),
        (
            infer_request(model_name="m", inputs=[tensor("a", "FP16", [1])]),
            "FP16 has no typed contents",
        ),
        (
            infer_request(model_name="m", inputs=[tensor("a", "INT8", [1], int_contents=[300])]),
            "out of range for INT8",
        ),
        (
            infer_request(model_name="m", inputs=[tensor("a", "FP32", [-1])]),
            "negative dimension",
        ),
        (
            infer_request(model_name="m", inputs=[tensor("a", "FP32", [2**20, 2**20])]),
            "needs 1099511627776 elements",
        ),
        (
            infer_request(model_name="m", inputs=[tensor("a", "X", [1])]),
            "unknown datatype 'X'",
        ),
    ],
)
def test_bad_grpc_requests(request_: pb.ModelInferRequest, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        codec.decode_request(request_, None)
    assert fragment in info.value.message


def test_responses_use_raw_contents_in_output_order() -> None:
    response = InferResponse(
        "m",
        [
            Tensor("y", "FP32", np.array([[1.0, 2.0]], dtype=np.float32)),
            Tensor("s", "BYTES", np.array([b"ok"], dtype=object)),
        ],
        "1",
        "id-9",
        {"note": "x"},
    )
    message = pb.ModelInferResponse.FromString(
        wire.serialize_infer_response(codec.encode_response(response))
    )
    assert message.id == "id-9" and [o.name for o in message.outputs] == ["y", "s"]
    assert list(message.outputs[0].shape) == [1, 2]
    assert np.frombuffer(message.raw_output_contents[0], np.float32).tolist() == [1.0, 2.0]
    assert message.raw_output_contents[1] == b"\x02\x00\x00\x00ok"
    assert message.parameters["note"].string_param == "x"


def test_grpc_table_covers_every_error_code() -> None:
    assert set(GRPC_STATUS) == set(ErrorCode)


@pytest.fixture
async def stub(dataplane: DataPlane) -> AsyncIterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    server, port = build_server(
        dataplane, "127.0.0.1:0", max_send_bytes=1 << 20, max_receive_bytes=1 << 20
    )
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    await server.stop(None)


def raiser(error: str) -> pb.ModelInferRequest:
    return infer_request(
        model_name="raiser", inputs=[tensor("error", "BYTES", [1], bytes_contents=[error.encode()])]
    )


# Every row of the gRPC table, from the model through the real servicer.
@pytest.mark.parametrize(
    ("error", "code"),
    [
        ("InvalidInput", grpc.StatusCode.INVALID_ARGUMENT),
        ("ModelNotReady", grpc.StatusCode.UNAVAILABLE),
        ("Overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("DeadlineExceeded", grpc.StatusCode.DEADLINE_EXCEEDED),
        ("ModelFailed", grpc.StatusCode.INTERNAL),
        ("Unimplemented", grpc.StatusCode.UNIMPLEMENTED),
        ("PayloadTooLarge", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("bug", grpc.StatusCode.INTERNAL),
    ],
)
async def test_error_rows_from_the_model(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, error: str, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(raiser(error))
    assert info.value.code() == code
    assert error in info.value.details() or "ZeroDivisionError" in info.value.details()
    ok = await stub.ModelInfer(raiser("none"))
    assert ok.raw_output_contents[0] == b"\x04\x00\x00\x00none"


async def test_not_found_and_stream_errors_keep_the_stream(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(infer_request(model_name="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    async def requests() -> AsyncIterator[pb.ModelInferRequest]:
        for i in range(6):
            message = raiser("InvalidInput" if i % 2 else "none")
            message.id = str(i)
            yield message

    answers = [a async for a in stub.ModelStreamInfer(requests())]
    assert len(answers) == 6
    errors = {a.infer_response.id: a.error_message for a in answers if a.error_message}
    assert set(errors) == {"1", "3", "5"} and all("InvalidInput" in e for e in errors.values())
    assert {a.infer_response.id for a in answers if not a.error_message} == {"0", "2", "4"}


async def test_unimplemented_rpcs_say_so(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest())
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CudaSharedMemoryStatus is not supported" in info.value.details()


def full_request() -> pb.ModelInferRequest:
    request = infer_request(
        model_name="m", model_version="2", id="r",
        inputs=[tensor("a", "FP32", [2]), tensor("b", "BYTES", [1])],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="y")],
        raw_input_contents=[np.arange(2, dtype=np.float32).tobytes(), b"\x01\x00\x00\x00z"],
    )  # fmt: skip
    request.parameters["priority"].int64_param = 3
    request.parameters["ratio"].double_param = 0.5
    return request


def test_hand_parsed_request_equals_protobuf() -> None:
    request = full_request()
    parsed = wire.parse_infer_request(request.SerializeToString())
    assert [bytes(r) for r in parsed.raw] == list(request.raw_input_contents)
    expected = pb.ModelInferRequest()
    expected.CopyFrom(request)
    del expected.raw_input_contents[:]
    assert parsed.message == expected
    decoded = codec.decode_request(parsed, None)
    assert decoded.inputs[0].data.tolist() == [0.0, 1.0]
    assert decoded.parameters == {"priority": 3, "ratio": 0.5}


@pytest.mark.parametrize(
    "data",
    [
        b"\x3a\x10ab",  # raw_input_contents claims 16 bytes, 2 follow
        b"\x0a",  # a tag with no length
        b"\x3d\x00\x00\x00\x00",  # raw_input_contents as a fixed32
        b"\x0b",  # wire type 3 (groups)
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # overlong varint
        b"\x00\x01",  # field number 0
    ],
)
def test_malformed_requests_raise_decode_error(data: bytes) -> None:
    from google.protobuf.message import DecodeError

    with pytest.raises(DecodeError):
        wire.parse_infer_request(data)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 70_000])
def test_hand_written_responses_parse_with_protobuf(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    message = pb.ModelInferResponse(model_name="m", id="x")
    raw = wire.RawInferResponse(message, [memoryview(payload), b"tail"])
    parsed = pb.ModelInferResponse.FromString(wire.serialize_infer_response(raw))
    assert list(parsed.raw_output_contents) == [payload, b"tail"]
    assert parsed.id == "x"
    stream = pb.ModelStreamInferResponse.FromString(
        wire.serialize_stream_response(wire.RawStreamResponse(raw, "oops"))
    )
    assert stream.error_message == "oops"
    assert list(stream.infer_response.raw_output_contents) == [payload, b"tail"]


async def test_a_refused_call_leaves_no_request_bytes_in_cycles(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    # grpc keeps an aborted call's traceback in reference cycles; the server raises the
    # collector's threshold (collector.py), so whatever those frames hold stays until a
    # collection: it must not be the request.
    wrong_shape = infer_request(model_name="mlp", raw_input_contents=[bytes(783 * 4)])
    wrong_shape.inputs.append(tensor("input", "FP32", [1, 783]))  # type: ignore[arg-type]
    unknown = infer_request(model_name="nope", raw_input_contents=[bytes(784 * 4)])
    unknown.inputs.append(tensor("input", "FP32", [1, 784]))  # type: ignore[arg-type]
    for request in (wrong_shape, unknown):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.ModelInfer(request)  # first-use caches fill here
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for request in (wrong_shape, unknown) * 5:
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.ModelInfer(request)
        gc.collect()
        held = [o for o in gc.garbage if isinstance(o, (bytes, bytearray, memoryview, np.ndarray))]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert sum(len(o) if not isinstance(o, np.ndarray) else o.nbytes for o in held) < 1024
