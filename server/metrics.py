"""The predictor's Prometheus metrics, on a registry owned by one app (no global registry)."""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Sub-millisecond buckets matter here: CPU forwards and protocol overhead live below 1 ms.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class PredictorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # KServe's names, so existing dashboards keep working.
        self.preprocess = Histogram(
            "request_preprocess_seconds", "Time decoding and validating a request",
            ["model_name"], registry=r, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.predict = Histogram(
            "request_predict_seconds", "Time in the model's forward pass, queueing included",
            ["model_name"], registry=r, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.postprocess = Histogram(
            "request_postprocess_seconds", "Time shaping the outputs of a request",
            ["model_name"], registry=r, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.requests = Counter(
            "ember_requests", "Inference requests by model, protocol and outcome",
            ["model_name", "protocol", "outcome"], registry=r,
        )  # fmt: skip
        self.inflight = Gauge(
            "ember_inflight_requests", "Inference requests being handled",
            ["model_name"], registry=r,
        )  # fmt: skip
        self.model_load_seconds = Gauge(
            "ember_model_load_seconds", "Seconds the last load of a model took, warm-up included",
            ["model_name"], registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "ember_batch_size", "Rows per executed batch",
            ["model_name"], registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )  # fmt: skip
        self.queue_wait = Histogram(
            "ember_queue_wait_seconds", "Time a request waited for its batch to start",
            ["model_name"], registry=r, buckets=_LATENCY_BUCKETS,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "ember_queue_depth", "Requests waiting in a model's queue", ["model_name"], registry=r
        )
        self._per_model: dict[str, ModelMetrics] = {}
        self.model_ready = Gauge(
            "ember_model_ready", "1 when the model is loaded and warmed up",
            ["model_name"], registry=r,
        )  # fmt: skip

    def watch_queue(self, name: str, queue: Sized) -> None:
        # Read at scrape time: nothing to update per request.
        self.queue_depth.labels(name).set_function(lambda: len(queue))

    def model(self, name: str) -> ModelMetrics:
        found = self._per_model.get(name)
        if found is None:
            found = self._per_model[name] = ModelMetrics(self, name)
        return found


class ModelMetrics:
    """One model's labelled children, looked up once: `.labels()` takes a lock and a dict
    lookup per call, which adds up on a sub-millisecond request path."""

    def __init__(self, metrics: PredictorMetrics, name: str) -> None:
        self._metrics = metrics
        self._name = name
        self.preprocess = metrics.preprocess.labels(name)
        self.predict = metrics.predict.labels(name)
        self.postprocess = metrics.postprocess.labels(name)
        # Counted in a plain int and read at scrape time: a labelled gauge's inc/dec take a
        # lock each, twice per request.
        self.inflight = 0
        metrics.inflight.labels(name).set_function(lambda: self.inflight)
        self.queue_wait = metrics.queue_wait.labels(name)
        self.batch_size = metrics.batch_size.labels(name)
        self._requests: dict[tuple[str, str], Any] = {}

    def request(self, protocol: str, outcome: str) -> None:
        counter = self._requests.get((protocol, outcome))
        if counter is None:
            counter = self._metrics.requests.labels(self._name, protocol, outcome)
            self._requests[(protocol, outcome)] = counter
        counter.inc()
