"""The activator's Prometheus metrics on a registry of its own. Per-model state (queue,
in-flight, concurrency, replicas, panic) is read from the services when Prometheus scrapes;
per-request series are loop-owned counters (see ember.server.metrics for why)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ember.activator.service import Service
from ember.server.metrics import LoopHistogram, watch_event_loop

_LATENCY = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
)  # fmt: skip
_COLD = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_GAUGES: tuple[tuple[str, str, Callable[[Service, int], float]], ...] = (
    ("ember_activator_queued_requests", "Requests waiting for a replica slot",
     lambda s, starting: s.throttler.queued),
    ("ember_activator_in_flight_requests", "Requests being proxied to a replica",
     lambda s, starting: s.throttler.in_flight),
    ("ember_activator_average_concurrency",
     "Time-weighted concurrency over the stable window, queued requests included",
     lambda s, starting: s.decision.stable_avg if s.decision else 0.0),
    ("ember_activator_panic_concurrency", "Time-weighted concurrency over the panic window",
     lambda s, starting: s.decision.panic_avg if s.decision else 0.0),
    ("ember_activator_desired_replicas", "Replicas the scaler wants",
     lambda s, starting: s.desired),
    ("ember_activator_ready_replicas", "Replicas in rotation",
     lambda s, starting: s.throttler.ready),
    ("ember_activator_starting_replicas", "Replicas asked for and not ready yet",
     lambda s, starting: starting),
    ("ember_activator_panic_mode", "1 while the scaler is in panic mode",
     lambda s, starting: 1.0 if s.decision and s.decision.panic else 0.0),
)  # fmt: skip


class ActivatorMetrics:
    def __init__(self, services: Mapping[str, Service], starting: Callable[[str], int]) -> None:
        self.registry = CollectorRegistry()
        watch_event_loop(self.registry)
        self._services = services
        self._starting = starting
        self.latency = {name: LoopHistogram(_LATENCY) for name in services}
        self.cold_start = {name: LoopHistogram(_COLD) for name in services}
        # (model, status code) -> count; errors the activator answers itself included.
        self.responses: dict[tuple[str, str], int] = {}
        self.registry.register(self)

    def answered(self, model: str, status: int, seconds: float) -> None:
        key = (model, str(status))
        self.responses[key] = self.responses.get(key, 0) + 1
        self.latency[model].observe(seconds)

    def replica_ready(self, model: str, seconds: float) -> None:
        self.cold_start[model].observe(seconds)

    def describe(self) -> Iterator[Metric]:
        return self._families(False)

    def collect(self) -> Iterator[Metric]:
        return self._families(True)

    def _families(self, samples: bool) -> Iterator[Metric]:
        for name, doc, read in _GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            if samples:
                for model, service in self._services.items():
                    family.add_metric([model], float(read(service, self._starting(model))))
            yield family
        for name, doc, children in (
            ("ember_activator_request_duration_seconds",
             "Time from arrival to the end of the answer, queueing included", self.latency),
            ("ember_activator_cold_start_seconds",
             "Seconds from starting a replica to its first ready probe", self.cold_start),
        ):  # fmt: skip
            histogram = HistogramMetricFamily(name, doc, labels=["model_name"])
            if samples:
                for model, child in children.items():
                    histogram.add_metric([model], child.buckets(), child.sum)
            yield histogram
        counter = CounterMetricFamily(
            "ember_activator_responses", "Answers by model and HTTP status (gRPC: its code)",
            labels=["model_name", "code"],
        )  # fmt: skip
        if samples:
            for (model, code), count in list(self.responses.items()):
                counter.add_metric([model, code], count)
        yield counter
