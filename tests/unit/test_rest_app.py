"""The REST app in process: routes, codecs and the error table, without sockets."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from ember.server.dataplane import DataPlane
from ember.server.errors import ErrorCode
from ember.server.rest.errors import HTTP_STATUS

MLP_INPUT = {"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.25] * 784}


async def test_v2_infer_matches_in_process_forward(
    client: httpx.AsyncClient, dataplane: DataPlane
) -> None:
    response = await client.post("/v2/models/mlp/infer", json={"id": "r1", "inputs": [MLP_INPUT]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "r1" and body["model_name"] == "mlp"
    [output] = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("output", "FP32", [1, 10])
    pool = dataplane.repository.get("mlp").pool
    assert pool is not None
    runner = pool.instances[0].runner
    expected = runner.predict({"input": np.full((1, 784), 0.25, dtype=np.float32)})["output"]
    np.testing.assert_allclose(output["data"], expected.reshape(-1), rtol=1e-6)


async def test_v1_predict_returns_rows(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/models/mlp:predict", json={"instances": [[0.1] * 784] * 3})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 3 and all(len(row) == 10 for row in predictions)


async def test_v1_with_several_inputs_uses_objects(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/models/identity:predict",
        json={"instances": [{"INPUT_INT32": [1, 2], "INPUT_BYTES": ["a"]}]},
    )
    assert response.status_code == 200, response.text
    [row] = response.json()["predictions"]
    assert row == {"OUTPUT_INT32": [1, 2], "OUTPUT_BYTES": ["a"]}
    ambiguous = await client.post("/v1/models/identity:predict", json={"instances": [[1]]})
    assert ambiguous.status_code == 400
    assert "keyed by input name" in ambiguous.json()["error"]


async def test_requested_output_subset_and_unknown_output(client: httpx.AsyncClient) -> None:
    inputs = [
        {"name": "INPUT_INT8", "datatype": "INT8", "shape": [1, 1], "data": [1]},
        {"name": "INPUT_FP64", "datatype": "FP64", "shape": [1, 1], "data": [2.5]},
    ]
    response = await client.post(
        "/v2/models/identity/infer", json={"inputs": inputs, "outputs": [{"name": "OUTPUT_FP64"}]}
    )
    assert [o["name"] for o in response.json()["outputs"]] == ["OUTPUT_FP64"]
    response = await client.post(
        "/v2/models/identity/infer", json={"inputs": inputs, "outputs": [{"name": "NOPE"}]}
    )
    assert response.status_code == 400
    assert "unknown output 'NOPE'" in response.json()["error"]


async def test_versions_route_and_wrong_version(client: httpx.AsyncClient) -> None:
    ok = await client.post("/v2/models/mlp/versions/1/infer", json={"inputs": [MLP_INPUT]})
    assert ok.status_code == 200
    assert (await client.get("/v2/models/mlp/versions/1")).json()["versions"] == ["1"]
    missing = await client.get("/v2/models/mlp/versions/7/ready")
    assert missing.status_code == 404
    assert "version '7'" in missing.json()["error"]


def test_http_table_covers_every_error_code() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)


# Every row of the HTTP table, produced through a real route: the fixture model `raiser`
# raises the error class it is sent, so the path from model to status is the real one.
@pytest.mark.parametrize(
    ("error", "status"),
    [
        ("InvalidInput", 400),
        ("ModelNotReady", 503),
        ("Overloaded", 429),
        ("DeadlineExceeded", 504),
        ("ModelFailed", 500),
        ("Unimplemented", 501),
        ("PayloadTooLarge", 413),
        ("bug", 500),
    ],
)
async def test_error_rows_from_the_model(
    client: httpx.AsyncClient, error: str, status: int
) -> None:
    body = {"inputs": [{"name": "error", "datatype": "BYTES", "shape": [1], "data": [error]}]}
    response = await client.post("/v2/models/raiser/infer", json=body)
    assert response.status_code == status
    assert set(response.json()) == {"error"}
    if status in (429, 503):
        assert response.headers["retry-after"] == "1"
    if error == "bug":
        assert "ZeroDivisionError" in response.json()["error"]
        assert "Traceback" not in response.text
    # The server carries on.
    assert (await client.post("/v2/models/mlp/infer", json={"inputs": [MLP_INPUT]})).is_success


async def test_error_rows_from_the_door(client: httpx.AsyncClient, dataplane: DataPlane) -> None:
    assert (await client.get("/v2/models/nope")).status_code == 404
    assert (
        await client.post("/v1/models/nope:predict", json={"instances": [1]})
    ).status_code == 404
    too_big = await client.post("/v2/models/mlp/infer", content=b"x" * (65 * 1024))
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
    expired = await client.post(
        "/v2/models/mlp/infer", json={"inputs": [MLP_INPUT], "parameters": {"timeout": 0}}
    )
    assert expired.status_code == 504
    explain = await client.post("/v1/models/mlp:explain", json={"instances": [[0.0] * 784]})
    assert explain.status_code == 501
    await dataplane.repository.unload("mlp")
    not_ready = await client.post("/v2/models/mlp/infer", json={"inputs": [MLP_INPUT]})
    assert not_ready.status_code == 503
    assert (await client.get("/v2/models/mlp/ready")).status_code == 503
    assert (await client.get("/v2/health/ready")).status_code == 503
    assert (await client.post("/v2/repository/models/mlp/load")).status_code == 200
    assert (await client.get("/v2/health/ready")).status_code == 200


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [("/nope", "GET", 404), ("/v2/models/mlp/infer", "GET", 405), ("/v2/health/live", "POST", 405)],
)
async def test_framework_errors_use_the_error_body(
    client: httpx.AsyncClient, path: str, method: str, status: int
) -> None:
    response = await client.request(method, path)
    assert response.status_code == status
    assert set(response.json()) == {"error"}


async def test_metrics_count_outcomes_per_protocol(client: httpx.AsyncClient) -> None:
    await client.post("/v2/models/mlp/infer", json={"inputs": [MLP_INPUT]})
    await client.post("/v2/models/mlp/infer", content=b"{not json")
    await client.post("/v1/models/mlp:predict", json={"instances": [[0.0] * 784]})
    await client.post("/v2/models/made-up/infer", json={"inputs": [MLP_INPUT]})
    text = (await client.get("/metrics")).text
    assert 'ember_requests_total{model_name="mlp",outcome="success",protocol="v2"} 1.0' in text
    assert (
        'ember_requests_total{model_name="mlp",outcome="invalid_input",protocol="v2"} 1.0' in text
    )
    assert 'ember_requests_total{model_name="mlp",outcome="success",protocol="v1"} 1.0' in text
    assert 'model_name="made-up"' not in text
    assert 'request_predict_seconds_count{model_name="mlp"} 2.0' in text
    assert 'ember_model_load_seconds{model_name="mlp"}' in text


@pytest.mark.parametrize(
    "path",
    ["/v2/systemsharedmemory/status", "/v2/cudasharedmemory/region/r/register", "/v2/logging"],
)
async def test_triton_only_features_answer_501(client: httpx.AsyncClient, path: str) -> None:
    response = await client.post(path)
    assert response.status_code == 501
    assert response.json() == {"error": f"{path} is not supported by Ember"}


async def test_triton_metric_names_follow_the_statistics(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await client.post("/v2/models/mlp/infer", json={"inputs": [MLP_INPUT]})
    await client.post(
        "/v2/models/raiser/infer",
        json={"inputs": [{"name": "error", "datatype": "BYTES", "shape": [1], "data": ["bug"]}]},
    )
    text = (await client.get("/metrics")).text
    assert "# TYPE nv_inference_request_success counter" in text
    assert 'nv_inference_request_success{model="mlp",version="1"} 3' in text
    assert 'nv_inference_count{model="mlp",version="1"} 3' in text
    assert 'nv_inference_exec_count{model="mlp",version="1"} 3' in text
    assert 'nv_inference_request_failure{model="raiser",version="1",reason="BACKEND"} 1' in text
    assert 'nv_inference_pending_request_count{model="mlp",version="1"} 0' in text
    assert "nv_inference_compute_infer_duration_us" in text
    assert "_total{" not in text.split("# HELP nv_")[1]


async def test_metrics_page_parses_as_prometheus_text(client: httpx.AsyncClient) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    await client.post("/v2/models/mlp/infer", json={"inputs": [MLP_INPUT]})
    families = {
        f.name: f for f in text_string_to_metric_families((await client.get("/metrics")).text)
    }
    assert families["nv_inference_exec_count"].type == "counter"
    assert families["request_predict_seconds"].type == "histogram"
    assert families["ember_queue_depth"].type == "gauge"
