"""The KEDA external scaler: the wire contract, and every call through a real grpc.aio server on
a free port, talked to by a client built from the same descriptor."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2

from ember.activator import externalscaler as wire
from ember.activator.keda import metric_name, start_keda_server

ROOT = Path(__file__).resolve().parents[2]
M = wire.messages()


@dataclass
class State:
    active: bool = False
    concurrency: float = 0.0
    target: float = 1.0


@dataclass
class FakeView:
    """Settable state; every update wakes whoever waits in wait_change."""

    models: dict[str, State] = field(default_factory=dict)
    waiting: int = 0  # streams parked in wait_change right now
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def update(self, model: str, **changes: Any) -> None:
        state = self.models.setdefault(model, State())
        for key, value in changes.items():
            setattr(state, key, value)
        self.changed()

    def changed(self) -> None:
        # A fresh event per change: each waiter wakes once, none sees a stale set() again.
        self._changed.set()
        self._changed = asyncio.Event()

    def has_model(self, model: str) -> bool:
        return model in self.models

    def is_active(self, model: str) -> bool:
        return self.models[model].active

    def concurrency(self, model: str) -> float:
        return self.models[model].concurrency

    def target(self, model: str) -> float:
        return self.models[model].target

    async def wait_change(self, timeout: float) -> None:
        self.waiting += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        finally:
            self.waiting -= 1


@dataclass
class Client:
    server: grpc.aio.Server
    is_active: Any
    stream_is_active: Any
    get_metric_spec: Any
    get_metrics: Any


@contextlib.asynccontextmanager
async def serve(view: FakeView, **options: Any) -> AsyncIterator[Client]:
    server, port = await start_keda_server(view, "127.0.0.1:0", **options)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            ref = M.ScaledObjectRef.SerializeToString
            yield Client(
                server=server,
                is_active=channel.unary_unary(
                    wire.IS_ACTIVE, request_serializer=ref,
                    response_deserializer=M.IsActiveResponse.FromString,
                ),
                stream_is_active=channel.unary_stream(
                    wire.STREAM_IS_ACTIVE, request_serializer=ref,
                    response_deserializer=M.IsActiveResponse.FromString,
                ),
                get_metric_spec=channel.unary_unary(
                    wire.GET_METRIC_SPEC, request_serializer=ref,
                    response_deserializer=M.GetMetricSpecResponse.FromString,
                ),
                get_metrics=channel.unary_unary(
                    wire.GET_METRICS, request_serializer=M.GetMetricsRequest.SerializeToString,
                    response_deserializer=M.GetMetricsResponse.FromString,
                ),
            )  # fmt: skip
    finally:
        await server.stop(None)


@pytest.fixture
def view() -> FakeView:
    fake = FakeView()
    fake.update("m")
    return fake


@pytest.fixture
async def client(view: FakeView) -> AsyncIterator[Client]:
    async with serve(view) as client:
        yield client


def ref(name: str = "m", **metadata: str) -> Any:
    return M.ScaledObjectRef(name=name, namespace="default", scalerMetadata=metadata)


async def read(call: Any, timeout: float = 2.0) -> Any:
    message = await asyncio.wait_for(call.read(), timeout)
    assert message is not grpc.aio.EOF
    return message


# The contract, field by field: (message, field, number, type, repeated, message type).
_F = descriptor_pb2.FieldDescriptorProto
CONTRACT = [
    ("ScaledObjectRef", "name", 1, _F.TYPE_STRING, False, ""),
    ("ScaledObjectRef", "namespace", 2, _F.TYPE_STRING, False, ""),
    ("ScaledObjectRef", "scalerMetadata", 3, _F.TYPE_MESSAGE, True,
     "ScaledObjectRef.ScalerMetadataEntry"),
    ("IsActiveResponse", "result", 1, _F.TYPE_BOOL, False, ""),
    ("GetMetricSpecResponse", "metricSpecs", 1, _F.TYPE_MESSAGE, True, "MetricSpec"),
    ("MetricSpec", "metricName", 1, _F.TYPE_STRING, False, ""),
    ("MetricSpec", "targetSize", 2, _F.TYPE_INT64, False, ""),
    ("MetricSpec", "targetSizeFloat", 3, _F.TYPE_DOUBLE, False, ""),
    ("GetMetricsRequest", "scaledObjectRef", 1, _F.TYPE_MESSAGE, False, "ScaledObjectRef"),
    ("GetMetricsRequest", "metricName", 2, _F.TYPE_STRING, False, ""),
    ("GetMetricsResponse", "metricValues", 1, _F.TYPE_MESSAGE, True, "MetricValue"),
    ("MetricValue", "metricName", 1, _F.TYPE_STRING, False, ""),
    ("MetricValue", "metricValue", 2, _F.TYPE_INT64, False, ""),
    ("MetricValue", "metricValueFloat", 3, _F.TYPE_DOUBLE, False, ""),
]  # fmt: skip


def built_file() -> descriptor_pb2.FileDescriptorProto:
    """The file as the descriptor pool holds it, read back from the built classes."""
    proto = descriptor_pb2.FileDescriptorProto()
    M.ScaledObjectRef.DESCRIPTOR.file.CopyToProto(proto)
    return proto


def test_file_is_externalscaler_proto() -> None:
    proto = built_file()
    assert (proto.name, proto.package, proto.syntax) == (
        "externalscaler.proto", "externalscaler", "proto3",
    )  # fmt: skip
    for message in wire.Messages.__dataclass_fields__:
        assert getattr(M, message).DESCRIPTOR.full_name == f"externalscaler.{message}"


def test_fields_match_contract() -> None:
    described = {
        (message.name, f.name): (f.number, f.type, f.label == _F.LABEL_REPEATED, f.type_name)
        for message in built_file().message_type
        for f in message.field
    }
    assert described == {
        (message, name): (number, kind, repeated, type_name and f".externalscaler.{type_name}")
        for message, name, number, kind, repeated, type_name in CONTRACT
    }


def test_scaler_metadata_is_a_map_on_the_wire() -> None:
    entry = M.ScaledObjectRef.DESCRIPTOR.fields_by_name["scalerMetadata"].message_type
    assert entry.GetOptions().map_entry
    # field 3, length 10: { key (1) = "model", value (2) = "x" }
    encoded = M.ScaledObjectRef(scalerMetadata={"model": "x"}).SerializeToString()
    assert encoded == b"\x1a\x0a\x0a\x05model\x12\x01x"


def test_import_builds_no_descriptors() -> None:
    code = (
        "import ember.activator.keda\n"
        "from ember.activator import externalscaler\n"
        "print(externalscaler.messages.cache_info().currsize)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "0"


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("m", "ember-m-concurrency"),
        ("Llama-3.1/8B_instruct", "ember-llama-3-1-8b-instruct-concurrency"),
        ("__", "ember-concurrency"),
    ],
)
def test_metric_name_is_kubernetes_safe(model: str, expected: str) -> None:
    assert metric_name(model) == expected


async def test_is_active_follows_view(view: FakeView, client: Client) -> None:
    assert (await client.is_active(ref())).result is False
    view.update("m", active=True)
    assert (await client.is_active(ref())).result is True


async def test_stream_pushes_each_change_at_once(view: FakeView, client: Client) -> None:
    call = client.stream_is_active(ref())
    assert (await read(call)).result is False  # the current value, without waiting for a change
    for active in (True, False):
        started = time.monotonic()
        view.update("m", active=active)
        assert (await read(call)).result is active
        assert time.monotonic() - started < 0.2
    call.cancel()


async def test_stream_ignores_changes_to_other_state(view: FakeView) -> None:
    async with serve(view, keepalive_s=0.5) as client:
        call = client.stream_is_active(ref())
        assert (await read(call)).result is False
        started = time.monotonic()
        view.update("m", concurrency=3.0)  # wakes the stream, but is_active did not change
        view.update("other", active=True)
        assert (await read(call)).result is False
        assert time.monotonic() - started >= 0.4  # that one was the keep-alive
        call.cancel()


async def test_stream_resends_as_keepalive(view: FakeView) -> None:
    async with serve(view, keepalive_s=0.1) as client:
        call = client.stream_is_active(ref())
        for _ in range(3):
            assert (await read(call, timeout=1.0)).result is False
        call.cancel()


async def test_stream_ends_when_client_cancels(view: FakeView, client: Client) -> None:
    call = client.stream_is_active(ref())
    await read(call)
    await asyncio.wait_for(_until(lambda: view.waiting == 1), 2.0)
    call.cancel()
    assert await asyncio.wait_for(call.code(), 2.0) == grpc.StatusCode.CANCELLED
    # The server side left wait_change too: nothing is left parked for a gone client.
    await asyncio.wait_for(_until(lambda: view.waiting == 0), 2.0)


async def test_stream_ends_when_server_stops(view: FakeView, client: Client) -> None:
    call = client.stream_is_active(ref())
    await read(call)
    await asyncio.wait_for(client.server.stop(None), 2.0)
    with contextlib.suppress(grpc.aio.AioRpcError):
        assert await asyncio.wait_for(call.read(), 2.0) is grpc.aio.EOF
    assert await asyncio.wait_for(call.code(), 2.0) != grpc.StatusCode.OK
    await asyncio.wait_for(_until(lambda: view.waiting == 0), 2.0)


async def test_stream_ends_not_found_when_model_goes(view: FakeView, client: Client) -> None:
    call = client.stream_is_active(ref())
    await read(call)
    del view.models["m"]
    view.changed()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), 2.0)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_metric_spec(view: FakeView, client: Client) -> None:
    view.update("m", target=2.6)
    response = await client.get_metric_spec(ref())
    [spec] = response.metricSpecs
    assert spec.metricName == "ember-m-concurrency"
    assert spec.targetSize == 3 and spec.targetSizeFloat == pytest.approx(2.6)


async def test_metric_spec_target_size_never_zero(view: FakeView, client: Client) -> None:
    view.update("m", target=0.3)
    [spec] = (await client.get_metric_spec(ref())).metricSpecs
    assert spec.targetSize == 1 and spec.targetSizeFloat == pytest.approx(0.3)


@pytest.mark.parametrize(("concurrency", "whole"), [(0.0, 0), (0.2, 1), (2.0, 2), (7.3, 8)])
async def test_metrics(view: FakeView, client: Client, concurrency: float, whole: int) -> None:
    view.update("m", concurrency=concurrency)
    request = M.GetMetricsRequest(scaledObjectRef=ref(), metricName="ember-m-concurrency")
    [value] = (await client.get_metrics(request)).metricValues
    assert value.metricName == "ember-m-concurrency"
    assert value.metricValue == whole and value.metricValueFloat == pytest.approx(concurrency)


async def test_metadata_model_beats_name(view: FakeView, client: Client) -> None:
    view.update("llama", active=True, target=4.0)
    assert (await client.is_active(ref("llama-scaler", model="llama"))).result is True
    assert (await client.is_active(ref("m"))).result is False  # no metadata: the name
    [spec] = (await client.get_metric_spec(ref("m", model="llama"))).metricSpecs
    assert spec.metricName == "ember-llama-concurrency"
    request = M.GetMetricsRequest(scaledObjectRef=ref("x", model="llama"))
    [value] = (await client.get_metrics(request)).metricValues
    assert value.metricName == "ember-llama-concurrency"  # none asked for: the spec's name


async def _call(client: Client, method: str, scaled_object: Any) -> Any:
    if method == "get_metrics":
        return await client.get_metrics(M.GetMetricsRequest(scaledObjectRef=scaled_object))
    if method == "stream_is_active":
        return await read(client.stream_is_active(scaled_object))
    return await getattr(client, method)(scaled_object)


METHODS = ["is_active", "stream_is_active", "get_metric_spec", "get_metrics"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("scaled_object", "code", "fragments"),
    [
        (ref("ghost"), grpc.StatusCode.NOT_FOUND, ["'ghost'", "of ScaledObject default/ghost"]),
        (ref("m", model="ghost"), grpc.StatusCode.NOT_FOUND, ["'ghost'", 'scalerMetadata "model"']),
        (ref(""), grpc.StatusCode.INVALID_ARGUMENT, ["no name"]),
        (ref("m", model=""), grpc.StatusCode.INVALID_ARGUMENT, ['"model"', "empty"]),
    ],
)  # fmt: skip
async def test_bad_refs(
    client: Client, method: str, scaled_object: Any, code: grpc.StatusCode, fragments: list[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _call(client, method, scaled_object)
    assert caught.value.code() == code
    for fragment in fragments:
        assert fragment in caught.value.details()


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)
