"""`inference.GRPCInferenceService` on the shared DataPlane: translation only."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2_grpc
from tritonclient.grpc import service_pb2 as pb

from ember.server.codecs.v2 import model_metadata
from ember.server.dataplane import DataPlane
from ember.server.errors import EmberError, ModelFailed
from ember.server.metadata import EXTENSIONS, SERVER_NAME, SERVER_VERSION
from ember.server.rpc import codec
from ember.server.rpc.wire import ParsedInferRequest, RawInferResponse, RawStreamResponse

log = logging.getLogger("ember.server.rpc")

# grpc ships no type information; the alias says what the argument is.
Context: TypeAlias = grpc.aio.ServicerContext


def _unimplemented(method: str) -> Any:
    async def handler(self: Any, request: Any, context: Context) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not supported by Ember")

    handler.__name__ = method
    return handler


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """Translation only. An EmberError raised by a unary method becomes its gRPC status in
    the server's interceptor (rpc/server.py); a stream reports errors per request."""

    # What Triton has and Ember does not: a clear UNIMPLEMENTED rather than the stub's bare one.
    SystemSharedMemoryStatus = _unimplemented("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = _unimplemented("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = _unimplemented("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = _unimplemented("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = _unimplemented("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = _unimplemented("CudaSharedMemoryUnregister")
    TraceSetting = _unimplemented("TraceSetting")
    LogSettings = _unimplemented("LogSettings")

    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    # --- health and metadata ------------------------------------------------------------
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._dataplane.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._dataplane.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        ready = self._dataplane.model_ready(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        doc = model_metadata(self._dataplane.model(request.name, request.version or None))
        return json_format.ParseDict(doc, pb.ModelMetadataResponse())

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        doc = self._dataplane.model_config(request.name, request.version or None)
        config = json_format.ParseDict(doc, model_config_pb2.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        docs = self._dataplane.statistics(request.name or None, request.version or None)
        return json_format.ParseDict({"model_stats": docs}, pb.ModelStatisticsResponse())

    # --- repository ---------------------------------------------------------------------
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for handle in self._dataplane.repository.handles():
            if request.ready and not handle.is_ready():
                continue
            response.models.add(
                name=handle.name, version=handle.config.version, state=handle.state.value,
                reason=handle.error or "",
            )  # fmt: skip
        return response

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        try:
            await self._dataplane.repository.load(request.model_name)
        except EmberError:
            raise
        except Exception as exc:
            raise ModelFailed(f"failed to load model '{request.model_name}': {exc}") from exc
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self._dataplane.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- inference ----------------------------------------------------------------------
    async def _infer(
        self, request: ParsedInferRequest, time_remaining: float | None
    ) -> RawInferResponse:
        message = request.message
        try:
            self._dataplane.admit(message.model_name, message.model_version or None)
            infer_request = codec.decode_request(request, time_remaining)
        except EmberError as exc:
            self._dataplane.reject(message.model_name, "grpc", exc)
            raise
        response = await self._dataplane.infer(infer_request, "grpc")
        return codec.encode_response(response)

    async def ModelInfer(self, request: ParsedInferRequest, context: Context) -> RawInferResponse:
        return await self._infer(request, context.time_remaining())

    async def ModelStreamInfer(
        self, requests: AsyncIterator[ParsedInferRequest], context: Context
    ) -> AsyncIterator[RawStreamResponse]:
        """Requests on one stream run concurrently; each answer (or its error) is sent as it
        completes, and an error never closes the stream."""
        done: asyncio.Queue[RawStreamResponse | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def one(request: ParsedInferRequest) -> None:
            try:
                response = await self._infer(request, context.time_remaining())
                await done.put(RawStreamResponse(response))
            except EmberError as exc:
                message = request.message
                echo = pb.ModelInferResponse(
                    model_name=message.model_name, model_version=message.model_version,
                    id=message.id,
                )  # fmt: skip
                await done.put(RawStreamResponse(RawInferResponse(echo), exc.message))

        async def read() -> None:
            # The end mark goes in however reading ends: when the stream breaks (a message
            # that does not parse), the loop below stops waiting and `await reader`
            # re-raises the break in the handler's own task, where rpc/server.py aborts the
            # call with INVALID_ARGUMENT.
            try:
                async for request in requests:
                    task = asyncio.create_task(one(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                await asyncio.gather(*pending)
            finally:
                done.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await done.get()) is not None:
                yield item
            await reader
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()
