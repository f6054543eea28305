"""V2 gRPC through the activator: per-model calls forwarded to a replica as bytes (tensors are
never decoded), routed by the model name in field 1 of the request message; server-level
health and model readiness answered here. Metadata and deadlines travel with the call."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb

from ember.activator.errors import (
    GRPC_STATUS,
    ActivatorError,
    ShuttingDown,
    UnknownModel,
    UpstreamFailed,
)
from ember.activator.metrics import ActivatorMetrics
from ember.activator.routes import field_one
from ember.activator.service import Service
from ember.activator.throttler import Replica

_SERVICE = "inference.GRPCInferenceService"
# Forwarded unary calls (every one names its model in field 1).
_FORWARDED = frozenset({"ModelInfer", "ModelMetadata", "ModelConfig", "ModelStatistics"})
# Set by gRPC itself on each hop; everything else the client sent is passed on.
_OWN_METADATA = frozenset({"user-agent", "grpc-accept-encoding", "grpc-encoding", "te"})

_MAX_MESSAGE = 128 * 1024 * 1024


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[tuple[str, str | bytes], ...]:
    return tuple(
        (key, value)
        for key, value in (context.invocation_metadata() or ())
        if key not in _OWN_METADATA and not key.startswith(":")
    )


class GrpcProxy(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(
        self,
        services: Mapping[str, Service],
        metrics: ActivatorMetrics,
        clock: Callable[[], float],
        is_draining: Callable[[], bool],
        max_message_bytes: int = _MAX_MESSAGE,
    ) -> None:
        self.services = services
        self.metrics = metrics
        self.clock = clock
        self.is_draining = is_draining
        self._max_message = max_message_bytes
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Calls open on each channel: one is closed only when it carries none.
        self._in_use: collections.Counter[str] = collections.Counter()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def prune(self, live: set[str]) -> None:
        """Close the channels of replicas that are gone (not in `live`) and carry no call.
        Replica ports are new on every cold start, so without this each one would leave a
        channel behind for the activator's life."""
        for address in [a for a in self._channels if a not in live and not self._in_use[a]]:
            await self._channels.pop(address).close()

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        full: str = handler_call_details.method
        service, _, method = full.lstrip("/").partition("/")
        if service != _SERVICE:
            return None
        if method in _FORWARDED:
            return grpc.unary_unary_rpc_method_handler(self._unary(full))
        if method == "ModelStreamInfer":
            return grpc.stream_stream_rpc_method_handler(self._stream(full))
        local = self._local(method)
        return grpc.unary_unary_rpc_method_handler(local) if local is not None else None

    # -- answered here -----------------------------------------------------------------------

    def _local(
        self, method: str
    ) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]] | None:
        async def live(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            return bytes(pb.ServerLiveResponse(live=True).SerializeToString())

        async def ready(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            return bytes(pb.ServerReadyResponse(ready=not self.is_draining()).SerializeToString())

        async def metadata(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            answer = pb.ServerMetadataResponse(name="ember-activator", version="0.1.0")
            return bytes(answer.SerializeToString())

        async def model_ready(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            name = field_one(request) or ""
            if name not in self.services:
                await context.abort(grpc.StatusCode.NOT_FOUND, UnknownModel(name).message)
            return bytes(pb.ModelReadyResponse(ready=not self.is_draining()).SerializeToString())

        async def unavailable(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{method} is not available through the activator; call a replica directly",
            )
            raise AssertionError("abort raises")

        table = {
            "ServerLive": live,
            "ServerReady": ready,
            "ServerMetadata": metadata,
            "ModelReady": model_ready,
        }
        return table.get(method, unavailable)  # type: ignore[no-any-return]

    # -- forwarded ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _using(self, replica: Replica) -> Iterator[grpc.aio.Channel]:
        address = replica.grpc_address or replica.address
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(
                address,
                options=[
                    ("grpc.max_send_message_length", self._max_message),
                    ("grpc.max_receive_message_length", self._max_message),
                ],
            )
        self._in_use[address] += 1
        try:
            yield channel
        finally:
            self._in_use[address] -= 1
            if not self._in_use[address]:
                del self._in_use[address]

    def _admit(self, name: str | None) -> Service:
        if not name:
            raise UnknownModel("")
        service = self.services.get(name)
        if service is None:
            raise UnknownModel(name)
        if self.is_draining():
            raise ShuttingDown("the activator is shutting down")
        return service

    def _deadline(self, service: Service, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        now = self.clock()
        deadline = now + service.settings.activation_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            deadline = min(deadline, now + remaining)
        return deadline

    def _unary(
        self, method: str
    ) -> Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]:
        async def forward(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            started = self.clock()
            name = field_one(request) or ""
            code = "OK"
            try:
                service = self._admit(name)
                deadline = self._deadline(service, context)
                service.arrive(started)
                try:
                    return await self._call(service, method, request, context, deadline)
                finally:
                    service.leave(self.clock())
            except ActivatorError as exc:
                code = GRPC_STATUS[exc.failure].name
                await context.abort(GRPC_STATUS[exc.failure], exc.message)
                raise AssertionError("abort raises") from None
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                await context.abort(exc.code(), exc.details() or "")
                raise AssertionError("abort raises") from None
            finally:
                if name in self.services:
                    self.metrics.answered(name, code, self.clock() - started)  # type: ignore[arg-type]

        return forward

    async def _call(
        self,
        service: Service,
        method: str,
        request: bytes,
        context: grpc.aio.ServicerContext[Any, Any],
        deadline: float,
    ) -> bytes:
        exclude: str | None = None
        for attempt in (1, 2):
            replica = await service.throttler.acquire(deadline, exclude)
            try:
                with self._using(replica) as channel:
                    answer: bytes = await channel.unary_unary(method)(
                        request,
                        timeout=max(0.001, deadline - self.clock()),
                        metadata=_metadata(context),
                    )
                return answer
            except grpc.aio.AioRpcError as exc:
                # UNAVAILABLE: the replica could not be reached (or is not ready): once more
                # on another one.
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 2:
                    raise
                exclude = replica.address
            finally:
                service.throttler.release(replica)
        raise UpstreamFailed(f"model '{service.name}': no replica answered")

    def _stream(
        self, method: str
    ) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]]:
        async def forward(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[bytes]:
            # A stream is routed by its first message's model and holds one slot throughout.
            try:
                first = await anext(requests)
            except StopAsyncIteration:
                return
            try:
                service = self._admit(field_one(first))
                deadline = self._deadline(service, context)
            except ActivatorError as exc:
                await context.abort(GRPC_STATUS[exc.failure], exc.message)
                return
            service.arrive(self.clock())
            try:
                try:
                    replica = await service.throttler.acquire(deadline)
                except ActivatorError as exc:
                    await context.abort(GRPC_STATUS[exc.failure], exc.message)
                    return
                try:
                    async for answer in self._relay(replica, method, first, requests, context):
                        yield answer
                finally:
                    service.throttler.release(replica)
            finally:
                service.leave(self.clock())

        return forward

    async def _relay(
        self,
        replica: Replica,
        method: str,
        first: bytes,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bytes]:
        async def outgoing() -> AsyncIterator[bytes]:
            yield first
            async for message in requests:
                yield message

        remaining = context.time_remaining()
        with self._using(replica) as channel:
            call = channel.stream_stream(method)(
                outgoing(), timeout=remaining, metadata=_metadata(context)
            )
            try:
                async for answer in call:
                    yield answer
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
            except asyncio.CancelledError:
                call.cancel()
                raise
