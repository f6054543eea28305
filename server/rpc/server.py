"""Building the grpc.aio server that carries the servicer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2_grpc

from ember.server.dataplane import DataPlane
from ember.server.errors import EmberError
from ember.server.rpc import wire
from ember.server.rpc.errors import GRPC_STATUS
from ember.server.rpc.servicer import InferenceServicer


class _Malformed:
    """What a request that does not parse becomes, so the method can answer it properly."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error


def _lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Malformed(exc)

    return deserialize


class _StreamBroken(Exception):
    """A stream's message did not parse: the stream ends with INVALID_ARGUMENT (the
    exception's text is the status's details)."""


def _malformed_message(handler_call_details: Any, request: _Malformed) -> str:
    method = handler_call_details.method.rsplit("/", 1)[-1]
    # protobuf's own message names the expected type ("... with type 'inference.X'").
    return f"malformed {method} request: {request.error}"


# The inference methods get the hand-written wire codecs of wire.py for their big fields.
_INFER_CODECS = {
    "/inference.GRPCInferenceService/ModelInfer": (
        wire.parse_infer_request, wire.serialize_infer_response,
    ),
    "/inference.GRPCInferenceService/ModelStreamInfer": (
        wire.parse_infer_request, wire.serialize_stream_response,
    ),
}  # fmt: skip


class _WireCodecs(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Sets how each method's messages are read and written.

    - grpc parses a request before the servicer runs and reports a parse failure as UNKNOWN;
      a client that sends bytes that do not parse has sent bad input: INVALID_ARGUMENT.
    - an EmberError raised by a unary method is answered with its status from GRPC_STATUS;
    - ModelInfer and ModelStreamInfer read and write their tensor bytes without protobuf's
      copies (wire.py).
    """

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], handler_call_details: Any
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse, serialize = _INFER_CODECS.get(
            handler_call_details.method,
            (handler.request_deserializer, handler.response_serializer),
        )
        handler = handler._replace(response_serializer=serialize)
        lenient = _lenient(parse)
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                if isinstance(request, _Malformed):
                    message = _malformed_message(handler_call_details, request)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                try:
                    return await unary(request, context)
                except EmberError as exc:
                    # The one place a unary method's typed error becomes a gRPC status.
                    status, details = GRPC_STATUS[exc.code], exc.message
                # Aborted after the except block, and without the request: grpc keeps the
                # AbortError's traceback (this frame among it) in reference cycles that only
                # a collection frees, and raised inside the block the AbortError would carry
                # the EmberError's traceback too, with the request among its frames' locals.
                del request
                await context.abort(status, details)

            return handler._replace(request_deserializer=lenient, unary_unary=unary_unary)
        if handler.stream_stream is not None:
            stream = handler.stream_stream

            async def stream_stream(
                requests: AsyncIterator[Any], context: Any
            ) -> AsyncIterator[Any]:
                async def checked() -> AsyncIterator[Any]:
                    async for request in requests:
                        if isinstance(request, _Malformed):
                            raise _StreamBroken(_malformed_message(handler_call_details, request))
                        yield request

                # The servicer reads the stream in a task of its own; aborting from there,
                # while this task could be sending an answer, lost the status now and then
                # (the call then hung to the client's deadline: 4-8% of streams, one good
                # message then a malformed one). The servicer re-raises the break here, and
                # the abort goes from the handler's task once no answer is being sent.
                try:
                    async for response in stream(checked(), context):
                        yield response
                except _StreamBroken as broken:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(broken))

            return handler._replace(request_deserializer=lenient, stream_stream=stream_stream)
        return handler


def build_server(
    dataplane: DataPlane, address: str, *, max_send_bytes: int, max_receive_bytes: int,
    share_port: bool = False,
) -> tuple[grpc.aio.Server, int]:  # fmt: skip
    """The server bound to `address` ("host:port", port 0 = any) and the port it got."""
    server = grpc.aio.server(
        interceptors=[_WireCodecs()],
        options=[
            ("grpc.max_send_message_length", max_send_bytes),
            ("grpc.max_receive_message_length", max_receive_bytes),
            # Only `--workers` processes may share the port: otherwise a second server on the
            # same port must fail, not quietly take half the traffic.
            ("grpc.so_reuseport", 1 if share_port else 0),
        ],
    )
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(dataplane), server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    return server, port
