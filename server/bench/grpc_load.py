"""The gRPC side of the load: `inference.GRPCInferenceService/ModelInfer` over grpc.aio.

One channel (one HTTP/2 connection) per worker, as the HTTP side has one keep-alive connection
per worker. The request message is built once with its tensors in `raw_input_contents`, as
tritonclient sends them, and serialized once: the HTTP bodies are built once too, and the
stub's serializer would redo 16 MiB of protobuf encoding on every call, client work that is not
the server's. Answers are parsed into `ModelInferResponse` as the stub does, and checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from ember.server.bench.client import BadAnswer
from ember.server.bench.errors import BenchError
from ember.server.bench.load import Call, OpenWorker
from ember.server.bench.payload import Payload, raw_bytes, tensor_bytes

# grpc's own default limit is 4 MiB a message, far below a 16 MiB tensor.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)


def infer_request(payload: Payload) -> service_pb2.ModelInferRequest:
    """The ModelInferRequest every call sends: raw tensor bytes, outputs named when wanted."""
    request = service_pb2.ModelInferRequest(model_name=payload.model)
    for spec in payload.specs:
        array = payload.inputs[spec.name]
        tensor = request.inputs.add(name=spec.name, datatype=spec.datatype)
        tensor.shape.extend(array.shape)
        request.raw_input_contents.append(raw_bytes(array))
    if payload.name_outputs:
        for name in payload.outputs:
            request.outputs.add(name=name)
    return request


def response_tensor_bytes(response: Any, wanted: Sequence[str] = ()) -> int:
    """The raw output bytes of a ModelInferResponse; BadAnswer unless each output has its raw
    contents of the size its datatype and shape need (and every name in `wanted` is there)."""
    outputs = response.outputs
    raw = response.raw_output_contents
    if not outputs:
        raise BadAnswer("the answer has no outputs")
    if len(raw) != len(outputs):
        raise BadAnswer(f"{len(raw)} raw_output_contents for {len(outputs)} outputs")
    missing = set(wanted) - {o.name for o in outputs}
    if missing:
        raise BadAnswer(f"the answer lacks outputs {sorted(missing)}")
    total = 0
    for output, contents in zip(outputs, raw, strict=True):
        expected = tensor_bytes(output.datatype, list(output.shape))
        if expected is not None and len(contents) != expected:
            raise BadAnswer(
                f"output {output.name!r}: {output.datatype} {list(output.shape)} needs "
                f"{expected} bytes, raw_output_contents holds {len(contents)}"
            )
        total += len(contents)
    return total


# The stub's own method path for ModelInfer (`GRPCInferenceServiceStub.__init__`).
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def grpc_worker(target: str, bind: Callable[[grpc.aio.Channel], Call]) -> OpenWorker:
    """A worker with its own channel, yielding the call `bind` makes on it."""

    @asynccontextmanager
    async def open_worker() -> AsyncIterator[Call]:
        async with _channel(target) as channel:
            yield bind(channel)

    return open_worker


@dataclass(frozen=True, slots=True)
class GrpcInfer:
    """Open Inference Protocol gRPC, ModelInfer with raw tensor contents both ways."""

    model: str
    request: Any  # service_pb2.ModelInferRequest (protobuf ships no usable types)
    wire: bytes  # `request`, serialized once
    outputs: tuple[str, ...]
    request_bytes: int
    timeout: float
    name: str = "grpc"
    transport: str = "grpc"

    @classmethod
    def create(cls, payload: Payload, timeout: float) -> GrpcInfer:
        request = infer_request(payload)
        return cls(
            model=payload.model, request=request, wire=request.SerializeToString(),
            outputs=payload.outputs, request_bytes=payload.request_bytes, timeout=timeout,
        )  # fmt: skip

    def _bind_infer(self, channel: grpc.aio.Channel) -> Call:
        # The stub's ModelInfer with the serializer left out: the bytes are already encoded.
        model_infer = channel.unary_unary(
            MODEL_INFER, response_deserializer=service_pb2.ModelInferResponse.FromString
        )

        async def call() -> None:
            response = await model_infer(self.wire, timeout=self.timeout)
            response_tensor_bytes(response)

        return call

    def _bind_live(self, channel: grpc.aio.Channel) -> Call:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ServerLiveRequest()

        async def call() -> None:
            response = await stub.ServerLive(request, timeout=self.timeout)
            if not response.live:
                raise BadAnswer("ServerLive answered live=false")

        return call

    def infer(self, address: str) -> OpenWorker:
        return grpc_worker(address, self._bind_infer)

    def live(self, address: str) -> OpenWorker:
        return grpc_worker(address, self._bind_live)

    async def check(self, address: str) -> int:
        """One ModelInfer through the stub before the load: OK, with the wanted outputs,
        sizes consistent."""
        try:
            async with _channel(address) as channel:
                # The connection first: a wrong port fails after `timeout`, not per retry.
                await asyncio.wait_for(channel.channel_ready(), self.timeout)
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                response = await stub.ModelInfer(self.request, timeout=self.timeout)
        except TimeoutError:
            raise BenchError(f"{address}: no gRPC server answered in {self.timeout:g} s") from None
        except grpc.aio.AioRpcError as exc:
            raise BenchError(
                f"{address}: ModelInfer on '{self.model}' answered {exc.code().name}: "
                f"{exc.details()}"
            ) from None
        try:
            return response_tensor_bytes(response, self.outputs)
        except BadAnswer as exc:
            raise BenchError(f"{address}: gRPC answer from '{self.model}': {exc}") from None
