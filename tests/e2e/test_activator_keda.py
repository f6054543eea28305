"""`ember activator --backend keda` as KEDA sees it: the external scaler's gRPC contract over
a real activator that finds its replica through DNS (here `127.0.0.1`, as a headless Service's
name would resolve) and never starts processes itself."""

from __future__ import annotations

import queue
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from ember.activator import externalscaler as wire

pytestmark = pytest.mark.e2e

_MODEL_PY = """
import time


class Sleepy:
    def __init__(self, model_dir, device):
        pass

    def predict(self, inputs):
        delay = inputs.get("delay")
        if delay is not None:
            time.sleep(float(delay.reshape(-1)[0]))
        return {"y": inputs["x"]}
"""

_MODEL_TOML = """
name = "echo"
format = "python"
class = "model:Sleepy"
device = "cpu"
instances = 2

[scaling]
stable_window_s = 6
scale_to_zero_grace_s = 0.5

[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1]

[[inputs]]
name = "delay"
datatype = "FP32"
shape = [1]
optional = true

[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1]
"""


def _body(delay: float) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1], "data": [5.0]},
            {"name": "delay", "datatype": "FP32", "shape": [1], "data": [delay]},
        ]
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_keda_external_scaler_follows_the_traffic(ember: Any, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "echo").mkdir(parents=True)
    (repo / "echo" / "model.py").write_text(_MODEL_PY)
    (repo / "echo" / "model.toml").write_text(textwrap.dedent(_MODEL_TOML))
    replica = ember("--model-repository", repo)
    replica_grpc = replica.args[replica.args.index("--grpc_port") + 1]
    keda_port = _free_port()
    activator = ember(
        "--model-repository", repo, "--backend", "keda", "--keda-port", keda_port,
        "--replica-host", "127.0.0.1", "--replica-http-port", replica.port,
        "--replica-grpc-port", replica_grpc, "--discovery-interval", "0.2",
        "--tick-seconds", "0.5", command="activator",
    )  # fmt: skip
    m = wire.messages()
    channel = grpc.insecure_channel(f"127.0.0.1:{keda_port}")
    is_active = channel.unary_unary(
        wire.IS_ACTIVE, request_serializer=m.ScaledObjectRef.SerializeToString,
        response_deserializer=m.IsActiveResponse.FromString,
    )  # fmt: skip
    stream = channel.unary_stream(
        wire.STREAM_IS_ACTIVE, request_serializer=m.ScaledObjectRef.SerializeToString,
        response_deserializer=m.IsActiveResponse.FromString,
    )  # fmt: skip
    get_spec = channel.unary_unary(
        wire.GET_METRIC_SPEC, request_serializer=m.ScaledObjectRef.SerializeToString,
        response_deserializer=m.GetMetricSpecResponse.FromString,
    )  # fmt: skip
    get_metrics = channel.unary_unary(
        wire.GET_METRICS, request_serializer=m.GetMetricsRequest.SerializeToString,
        response_deserializer=m.GetMetricsResponse.FromString,
    )  # fmt: skip
    ref = m.ScaledObjectRef(name="echo-predictor", namespace="default",
                            scalerMetadata={"model": "echo"})  # fmt: skip

    # The replica is found through DNS, but nothing asks for it: inactive after the grace.
    deadline = time.monotonic() + 20
    while is_active(ref, timeout=5).result:
        assert time.monotonic() < deadline, "IsActive stayed true without traffic"
        time.sleep(0.1)
    spec = get_spec(ref, timeout=5).metricSpecs[0]
    assert spec.metricName == "ember-echo-concurrency" and spec.targetSizeFloat == 70.0

    # StreamIsActive pushes true within 200 ms of the first request.
    pushed: queue.Queue[tuple[float, bool]] = queue.Queue()
    call = stream(ref)

    def read() -> None:
        try:
            for answer in call:
                pushed.put((time.monotonic(), answer.result))
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert pushed.get(timeout=5)[1] is False  # the current value, sent at once
    results: list[httpx.Response] = []
    sender = threading.Thread(
        target=lambda: results.append(
            httpx.post(f"{activator.base_url}/v2/models/echo/infer", json=_body(1.5), timeout=30)
        )
    )
    sent = time.monotonic()
    sender.start()
    when, value = pushed.get(timeout=5)
    assert value is True and when - sent < 0.2, (value, when - sent)
    # While the request is held by the replica, GetMetrics reports it.
    time.sleep(0.7)
    request = m.GetMetricsRequest(scaledObjectRef=ref, metricName=spec.metricName)
    metric = get_metrics(request, timeout=5).metricValues[0]
    assert metric.metricName == spec.metricName
    assert metric.metricValue >= 1 and metric.metricValueFloat > 0, metric
    sender.join()
    assert results[0].status_code == 200, results[0].text
    assert results[0].json()["outputs"][0]["data"] == [5.0]
    # The request went to the replica found in DNS; the activator started nothing.
    status = httpx.get(f"{activator.base_url}/status").json()
    assert status["backend"] == "keda"
    assert status["models"]["echo"]["replicas"] == [
        {"address": f"127.0.0.1:{replica.port}", "state": "ready", "in_flight": 0}
    ]
    # Idle for a stable window and the grace: false is pushed again (true until then, as the
    # stream's keep-alive resends).
    deadline = time.monotonic() + 20
    value = True
    while value:
        value = pushed.get(timeout=max(0.1, deadline - time.monotonic()))[1]
    assert not is_active(ref, timeout=5).result
    call.cancel()
    channel.close()
