"""`/metrics` of a real server: KServe's stage histograms, request outcomes, in-flight, loads."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

# conftest.py's EmberProcess (test modules cannot import conftest under importlib mode).
EmberProcess = Any
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

MLP_BODY = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.0] * 784}]
}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample `name{labels}`, 0.0 when it is absent (a counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_prometheus_text_format(main_server: EmberProcess) -> None:
    response = main_server.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for family in (
        "request_preprocess_seconds",
        "request_predict_seconds",
        "request_postprocess_seconds",
        "ember_requests_total",
    ):
        assert f"# TYPE {family.removesuffix('_total')}" in response.text, family


def test_request_histograms_and_counters(main_server: EmberProcess) -> None:
    before = main_server.metrics()
    for _ in range(3):
        assert main_server.infer("mlp", MLP_BODY).status_code == 200
    v1 = main_server.post("/v1/models/mlp:predict", json={"instances": [[0.0] * 784]})
    assert v1.status_code == 200
    # Invalid input: decoded badly (400 at the door) and validated badly (wrong shape).
    assert main_server.post("/v2/models/mlp/infer", content=b"{").status_code == 400
    bad_shape = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [0.0] * 3}]
    }
    assert main_server.infer("mlp", bad_shape).status_code == 400
    assert main_server.infer("nope", MLP_BODY).status_code == 404
    after = main_server.metrics()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for stage in ("preprocess", "predict", "postprocess"):
        count = f"request_{stage}_seconds_count"
        assert delta(count, model_name="mlp") == 4, stage
        assert delta(f"request_{stage}_seconds_sum", model_name="mlp") >= 0, stage
        assert value(after, f"request_{stage}_seconds_bucket", model_name="mlp", le="+Inf") >= 4
    assert delta("request_predict_seconds_sum", model_name="mlp") > 0

    requests = "ember_requests_total"
    assert delta(requests, model_name="mlp", protocol="v2", outcome="success") == 3
    assert delta(requests, model_name="mlp", protocol="v1", outcome="success") == 1
    assert delta(requests, model_name="mlp", protocol="v2", outcome="invalid_input") == 2
    # Unknown model names share one label, so made-up names cannot grow the registry.
    assert delta(requests, model_name="unknown", protocol="v2", outcome="not_found") == 1
    assert not any(dict(labels).get("model_name") == "nope" for _, labels in after)

    assert value(after, "ember_inflight_requests", model_name="mlp") == 0
    main_server.assert_serves("mlp")


def test_model_load_seconds_and_ready(main_server: EmberProcess) -> None:
    samples = main_server.metrics()
    for model in ("identity", "mlp"):
        assert ("ember_model_load_seconds", frozenset({("model_name", model)})) in samples
        assert value(samples, "ember_model_load_seconds", model_name=model) > 0
        assert value(samples, "ember_model_ready", model_name=model) == 1


def test_model_failure_outcome(test_models_server: EmberProcess) -> None:
    before = test_models_server.metrics()
    bad = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    assert test_models_server.infer("failing", bad).status_code == 500
    after = test_models_server.metrics()
    key = {"model_name": "failing", "protocol": "v2", "outcome": "model_failed"}
    assert (
        value(after, "ember_requests_total", **key) - value(before, "ember_requests_total", **key)
        == 1
    )
    test_models_server.assert_serves("required")


def test_inflight_gauge_counts_a_running_request(test_models_server: EmberProcess) -> None:
    server = test_models_server
    body = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]},
            {"name": "delay", "datatype": "FP32", "shape": [1], "data": [1.5]},
        ]
    }
    results: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: results.append(server.infer("slow", body)))
    thread.start()
    try:
        seen = 0.0
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline and seen < 1:
            seen = value(server.metrics(), "ember_inflight_requests", model_name="slow")
            time.sleep(0.02)
        assert seen == 1
    finally:
        thread.join(10)
    assert results and results[0].status_code == 200, results
    assert value(server.metrics(), "ember_inflight_requests", model_name="slow") == 0


def test_event_loop_tasks_are_counted(main_server: EmberProcess) -> None:
    # The soak test fits this gauge's slope: it must exist and count the loop's tasks (the
    # server's own, at least uvicorn's main task and each model's batcher).
    tasks = main_server.metrics()[("ember_asyncio_tasks", frozenset())]
    assert 2 <= tasks < 1000
