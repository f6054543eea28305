"""The predictor's Prometheus metrics, on a registry owned by one app (no global registry).

The per-request series (KServe's stage histograms, request counts, queue wait, batch size)
are plain counters updated on the event loop, which is the only thread that touches them,
and turned into Prometheus families by a collector at scrape time. prometheus_client's own
Histogram and Counter take a lock and walk their buckets on every call: five of them per
request cost 9% of the event loop at c=32 (py-spy), for numbers read once every few seconds.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

# Sub-millisecond buckets matter here: CPU forwards and protocol overhead live below 1 ms.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


class LoopHistogram:
    """A histogram child without a lock: observe() is one bisect and two additions."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are `le`: the first bound >= value.
        self.counts[bisect.bisect_left(self._bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out = []
        total = 0
        for bound, count in zip((*self._bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


class _HistogramFamily:
    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = bounds
        self.children: dict[str, LoopHistogram] = {}

    def labels(self, model: str) -> LoopHistogram:
        child = self.children.get(model)
        if child is None:
            child = self.children[model] = LoopHistogram(self.bounds)
        return child

    def family(self, samples: bool = True) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model_name"])
        if samples:
            for model, child in self.children.items():
                family.add_metric([model], child.buckets(), child.sum)
        return family


class _LoopSeries:
    """The collector that renders the loop-owned series when Prometheus scrapes."""

    def __init__(self) -> None:
        self.histograms: list[_HistogramFamily] = []
        # (model, protocol, outcome) -> count
        self.requests: dict[tuple[str, str, str], int] = {}

    def histogram(
        self, name: str, documentation: str, bounds: tuple[float, ...] = _LATENCY_BUCKETS
    ) -> _HistogramFamily:
        family = _HistogramFamily(name, documentation, bounds)
        self.histograms.append(family)
        return family

    def _families(self, samples: bool) -> Iterator[Metric]:
        for histogram in self.histograms:
            yield histogram.family(samples)
        requests = CounterMetricFamily(
            "ember_requests", "Inference requests by model, protocol and outcome",
            labels=["model_name", "protocol", "outcome"],
        )  # fmt: skip
        if samples:
            for labels, count in list(self.requests.items()):
                requests.add_metric(list(labels), count)
        yield requests

    def describe(self) -> Iterator[Metric]:
        return self._families(samples=False)

    def collect(self) -> Iterator[Metric]:
        return self._families(samples=True)


def watch_event_loop(registry: CollectorRegistry) -> None:
    """`ember_asyncio_tasks`: the tasks alive on this process's event loop, read at scrape time
    (a count that only grows is a leak; the soak test fits its slope). Registered only when
    built inside a running loop, as every server is."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    gauge = Gauge("ember_asyncio_tasks", "Tasks alive on the event loop", registry=registry)
    gauge.set_function(lambda: len(asyncio.all_tasks(loop)))


class PredictorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        watch_event_loop(r)
        series = self._series = _LoopSeries()
        # KServe's names, so existing dashboards keep working.
        self.preprocess = series.histogram(
            "request_preprocess_seconds", "Time decoding and validating a request"
        )
        self.predict = series.histogram(
            "request_predict_seconds", "Time in the model's forward pass, queueing included"
        )
        self.postprocess = series.histogram(
            "request_postprocess_seconds", "Time shaping the outputs of a request"
        )
        self.batch_size = series.histogram(
            "ember_batch_size", "Rows per executed batch", _BATCH_BUCKETS
        )
        self.queue_wait = series.histogram(
            "ember_queue_wait_seconds", "Time a request waited for its batch to start"
        )
        r.register(series)
        self.inflight = Gauge(
            "ember_inflight_requests", "Inference requests being handled",
            ["model_name"], registry=r,
        )  # fmt: skip
        self.model_load_seconds = Gauge(
            "ember_model_load_seconds", "Seconds the last load of a model took, warm-up included",
            ["model_name"], registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "ember_queue_depth", "Requests waiting in a model's queue", ["model_name"], registry=r
        )
        self._per_model: dict[str, ModelMetrics] = {}
        self.cold_start = Gauge(
            "ember_cold_start_seconds",
            "Seconds of each phase of the process's start until the model was first ready",
            ["model_name", "phase"], registry=r,
        )  # fmt: skip
        self.model_ready = Gauge(
            "ember_model_ready", "1 when the model is loaded and warmed up",
            ["model_name"], registry=r,
        )  # fmt: skip

    def watch_queue(self, name: str, depth: Callable[[], int]) -> None:
        # Read at scrape time: nothing to update per request.
        self.queue_depth.labels(name).set_function(depth)

    def model(self, name: str) -> ModelMetrics:
        found = self._per_model.get(name)
        if found is None:
            found = self._per_model[name] = ModelMetrics(self, self._series, name)
        return found


class ModelMetrics:
    """One model's series, looked up once per model rather than once per request."""

    def __init__(self, metrics: PredictorMetrics, series: _LoopSeries, name: str) -> None:
        self._name = name
        self._counts = series.requests
        self.preprocess = metrics.preprocess.labels(name)
        self.predict = metrics.predict.labels(name)
        self.postprocess = metrics.postprocess.labels(name)
        self.queue_wait = metrics.queue_wait.labels(name)
        self.batch_size = metrics.batch_size.labels(name)
        # Counted in a plain int and read at scrape time.
        self.inflight = 0
        metrics.inflight.labels(name).set_function(lambda: self.inflight)

    def request(self, protocol: str, outcome: str) -> None:
        key = (self._name, protocol, outcome)
        self._counts[key] = self._counts.get(key, 0) + 1
