"""KEDA's external scaler wire types (proto package `externalscaler`), built from a descriptor
written here instead of protoc output.

The contract is seven small messages; describing them in Python spares the project a
grpcio-tools build step and generated files that drift from the installed protobuf. The classes
are built on first use, in a private descriptor pool: importing this module costs nothing, and
another copy of `externalscaler.proto` in the process (KEDA's own generated code, say) cannot
collide with ours in the default pool.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "externalscaler"
SERVICE = f"{PACKAGE}.ExternalScaler"
IS_ACTIVE = f"/{SERVICE}/IsActive"
STREAM_IS_ACTIVE = f"/{SERVICE}/StreamIsActive"
GET_METRIC_SPEC = f"/{SERVICE}/GetMetricSpec"
GET_METRICS = f"/{SERVICE}/GetMetrics"

_F = descriptor_pb2.FieldDescriptorProto


@dataclass(frozen=True, slots=True)
class Messages:
    """The message classes of externalscaler.proto, named as on the wire."""

    # protobuf ships no type information: each class is a `google.protobuf.message.Message`.
    ScaledObjectRef: Any
    IsActiveResponse: Any
    GetMetricSpecResponse: Any
    MetricSpec: Any
    GetMetricsRequest: Any
    GetMetricsResponse: Any
    MetricValue: Any


def _field(
    message: Any, name: str, number: int, kind: int, *, repeated: bool = False, type_name: str = ""
) -> None:
    field = message.field.add(name=name, number=number, type=kind)
    field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    if type_name:
        # Fully qualified, as protoc writes it: no lookup relative to the current scope.
        field.type_name = f".{PACKAGE}.{type_name}"


def file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """externalscaler.proto as protoc would describe it (messages only; the service's methods
    are plain paths, see the constants above)."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="externalscaler.proto", package=PACKAGE, syntax="proto3"
    )

    ref = proto.message_type.add(name="ScaledObjectRef")
    _field(ref, "name", 1, _F.TYPE_STRING)
    _field(ref, "namespace", 2, _F.TYPE_STRING)
    # A map<string,string> is, on the wire and in the descriptor, a repeated nested entry
    # message flagged map_entry; the flag is what makes protobuf expose it as a dict.
    entry = ref.nested_type.add(name="ScalerMetadataEntry")
    entry.options.map_entry = True
    _field(entry, "key", 1, _F.TYPE_STRING)
    _field(entry, "value", 2, _F.TYPE_STRING)
    _field(
        ref, "scalerMetadata", 3, _F.TYPE_MESSAGE, repeated=True,
        type_name="ScaledObjectRef.ScalerMetadataEntry",
    )  # fmt: skip

    active = proto.message_type.add(name="IsActiveResponse")
    _field(active, "result", 1, _F.TYPE_BOOL)

    spec_response = proto.message_type.add(name="GetMetricSpecResponse")
    _field(spec_response, "metricSpecs", 1, _F.TYPE_MESSAGE, repeated=True, type_name="MetricSpec")

    spec = proto.message_type.add(name="MetricSpec")
    _field(spec, "metricName", 1, _F.TYPE_STRING)
    _field(spec, "targetSize", 2, _F.TYPE_INT64)
    _field(spec, "targetSizeFloat", 3, _F.TYPE_DOUBLE)

    metrics_request = proto.message_type.add(name="GetMetricsRequest")
    _field(metrics_request, "scaledObjectRef", 1, _F.TYPE_MESSAGE, type_name="ScaledObjectRef")
    _field(metrics_request, "metricName", 2, _F.TYPE_STRING)

    metrics_response = proto.message_type.add(name="GetMetricsResponse")
    _field(
        metrics_response, "metricValues", 1, _F.TYPE_MESSAGE, repeated=True,
        type_name="MetricValue",
    )  # fmt: skip

    value = proto.message_type.add(name="MetricValue")
    _field(value, "metricName", 1, _F.TYPE_STRING)
    _field(value, "metricValue", 2, _F.TYPE_INT64)
    _field(value, "metricValueFloat", 3, _F.TYPE_DOUBLE)
    return proto


@functools.cache
def messages() -> Messages:
    """The message classes, built once per process on first call."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(file_descriptor().SerializeToString())
    file = pool.FindFileByName("externalscaler.proto")

    def build(name: str) -> Any:
        return message_factory.GetMessageClass(file.message_types_by_name[name])

    return Messages(**{name: build(name) for name in Messages.__dataclass_fields__})
