"""The activator's face to KEDA: the `externalscaler.ExternalScaler` gRPC service.

KEDA asks two things of a scaler. Whether a model should have any replica at all (IsActive,
or StreamIsActive for a `external-push` trigger) drives 0 <-> 1, which KEDA does itself;
GetMetricSpec and GetMetrics feed the HPA it creates for 1 <-> N. This module only
translates: the numbers come from the activator through ScalerView.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol, TypeAlias

import grpc

from ember.activator import externalscaler as wire

Context: TypeAlias = grpc.aio.ServicerContext


class ScalerView(Protocol):
    """What the scaler service reads from the activator. Calls are made on the event loop."""

    def has_model(self, model: str) -> bool: ...

    def is_active(self, model: str) -> bool:
        """Whether the KPA wants at least one replica."""
        ...

    def concurrency(self, model: str) -> float:
        """Concurrency averaged over time and summed over replicas (a total, not per replica),
        requests queued in the activator included."""
        ...

    def target(self, model: str) -> float:
        """Concurrency one replica should carry."""
        ...

    async def wait_change(self, timeout: float) -> None:
        """Return when any model's state may have changed, or after `timeout` seconds.

        It must suspend (never return at once on an old change): StreamIsActive loops on it.
        """
        ...


KEEPALIVE_S = 5.0  # a StreamIsActive resends its value at least this often


def metric_name(model: str) -> str:
    """The metric KEDA and the HPA know a model's concurrency by.

    External metric names travel in API paths; KEDA's own names are lowercase letters, digits
    and dashes, so any other run of characters becomes one dash.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    return "-".join(part for part in ("ember", slug, "concurrency") if part)


class KedaScaler:
    """Answers KEDA's four calls for the models a ScalerView knows."""

    def __init__(self, view: ScalerView, *, keepalive_s: float = KEEPALIVE_S) -> None:
        self._view = view
        self._keepalive_s = keepalive_s
        self._messages = wire.messages()

    def handler(self) -> grpc.GenericRpcHandler:
        m = self._messages
        ref = m.ScaledObjectRef.FromString
        return grpc.method_handlers_generic_handler(
            wire.SERVICE,
            {
                "IsActive": grpc.unary_unary_rpc_method_handler(
                    self.is_active, ref, m.IsActiveResponse.SerializeToString
                ),
                "StreamIsActive": grpc.unary_stream_rpc_method_handler(
                    self.stream_is_active, ref, m.IsActiveResponse.SerializeToString
                ),
                "GetMetricSpec": grpc.unary_unary_rpc_method_handler(
                    self.get_metric_spec, ref, m.GetMetricSpecResponse.SerializeToString
                ),
                "GetMetrics": grpc.unary_unary_rpc_method_handler(
                    self.get_metrics,
                    m.GetMetricsRequest.FromString,
                    m.GetMetricsResponse.SerializeToString,
                ),
            },
        )

    async def _model(self, ref: Any, context: Context) -> str:
        """The model a ScaledObjectRef means, or the call aborted with why not."""
        # A trigger's metadata can name the model when the ScaledObject's name is not it
        # (one model under several ScaledObjects, names with a prefix); else the name is.
        named = f"{ref.namespace}/{ref.name}" if ref.namespace else ref.name
        scaled_object = f"ScaledObject {named}" if ref.name else "the ScaledObject"
        model: str
        if "model" in ref.scalerMetadata:
            model = ref.scalerMetadata["model"]
            source = f'scalerMetadata "model" of {scaled_object}'
            if not model:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{source} is empty")
        else:
            model = ref.name
            source = f"the name of {scaled_object}"
            if not model:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    'ScaledObjectRef has no name and no scalerMetadata "model"',
                )
        if not self._view.has_model(model):
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no model {model!r} (read from {source})"
            )
        return model

    async def is_active(self, ref: Any, context: Context) -> Any:
        model = await self._model(ref, context)
        return self._messages.IsActiveResponse(result=self._view.is_active(model))

    async def stream_is_active(self, ref: Any, context: Context) -> AsyncIterator[Any]:
        model = await self._model(ref, context)
        sent: bool | None = None
        resend_at = 0.0
        # No exit: the stream lives until KEDA cancels it or the server stops, and both arrive
        # here as CancelledError out of wait_change (or out of the yield).
        while True:
            if not self._view.has_model(model):
                await context.abort(grpc.StatusCode.NOT_FOUND, f"model {model!r} was removed")
            active = self._view.is_active(model)
            now = time.monotonic()
            # Unchanged values are resent too: KEDA sees a live stream, and a proxy in between
            # does not close it as idle.
            if active != sent or now >= resend_at:
                yield self._messages.IsActiveResponse(result=active)
                sent, resend_at = active, now + self._keepalive_s
            # Woken by the change itself, so a flip reaches KEDA at once instead of at the
            # next poll; the timeout is what makes the keep-alive.
            await self._view.wait_change(max(0.0, resend_at - time.monotonic()))

    async def get_metric_spec(self, ref: Any, context: Context) -> Any:
        model = await self._model(ref, context)
        target = self._view.target(model)
        # KEDA gives the HPA an AverageValue target, so the HPA computes
        # desired = ceil(metric / target) replicas; hence GetMetrics reports the total over all
        # replicas, never a per-replica figure.
        # targetSize is for KEDA versions that read only the integer; it cannot be 0.
        spec = self._messages.MetricSpec(
            metricName=metric_name(model), targetSize=max(1, round(target)), targetSizeFloat=target
        )
        return self._messages.GetMetricSpecResponse(metricSpecs=[spec])

    async def get_metrics(self, request: Any, context: Context) -> Any:
        model = await self._model(request.scaledObjectRef, context)
        concurrency = max(0.0, self._view.concurrency(model))
        # Answer under the name asked for, so the value matches whatever key KEDA asked with.
        value = self._messages.MetricValue(
            metricName=request.metricName or metric_name(model),
            # Rounded up: 0.2 requests in flight still need a replica to serve them.
            metricValue=math.ceil(concurrency),
            metricValueFloat=concurrency,
        )
        return self._messages.GetMetricsResponse(metricValues=[value])


async def start_keda_server(
    view: ScalerView, address: str, *, keepalive_s: float = KEEPALIVE_S
) -> tuple[grpc.aio.Server, int]:
    """A started server for `view` on `address` ("host:port", port 0 = any), and its port."""
    # grpc turns SO_REUSEPORT on by default: a second activator on the same port would then
    # take half of KEDA's connections instead of failing to start.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((KedaScaler(view, keepalive_s=keepalive_s).handler(),))
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen for KEDA's gRPC on {address}")
    await server.start()
    return server, port
