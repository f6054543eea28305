"""The happy paths of KServe V1 and the Open Inference Protocol against a real server."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.e2e

# conftest.py's EmberProcess (test modules cannot import conftest under importlib mode).
EmberProcess = Any
ErrorCheck = Any

ROOT = Path(__file__).resolve().parents[2]
# Every model folder of the example repository, which main_server serves.
EXAMPLES = sorted(p.name for p in (ROOT / "models").iterdir() if (p / "model.toml").is_file())


def _batch(rows: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.standard_normal((rows, 784)).astype(np.float32)


@pytest.fixture(scope="module")
def reference_mlp() -> Any:
    """The mlp's TorchScript module, run in this process to check the server's answers."""
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load's deprecation
        module = torch.jit.load(str(ROOT / "models" / "mlp" / "model.pt"), map_location="cpu")
    module.eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return np.asarray(module(torch.from_numpy(batch)).numpy())

    return run


# --- server level ------------------------------------------------------------------------------
def test_root_is_alive(main_server: EmberProcess) -> None:
    response = main_server.get("/")
    assert response.status_code == 200
    assert response.json() == {"status": "alive"}


def test_health(main_server: EmberProcess) -> None:
    assert main_server.get("/v2/health/live").status_code == 200
    assert main_server.get("/v2/health/ready").status_code == 200


def test_v2_server_metadata(main_server: EmberProcess) -> None:
    response = main_server.get("/v2")
    assert response.status_code == 200
    doc = response.json()
    assert doc["name"] == "ember"
    assert isinstance(doc["version"], str) and doc["version"]
    assert isinstance(doc["extensions"], list)
    assert "model_repository" in doc["extensions"]


# --- KServe V1 ----------------------------------------------------------------------------------
def test_v1_list_and_ready(main_server: EmberProcess) -> None:
    response = main_server.get("/v1/models")
    assert response.status_code == 200
    assert sorted(response.json()["models"]) == EXAMPLES
    response = main_server.get("/v1/models/mlp")
    assert response.status_code == 200
    assert response.json() == {"name": "mlp", "ready": True}


def test_v1_predict_instances(main_server: EmberProcess, reference_mlp: Any) -> None:
    batch = _batch(3)
    response = main_server.post("/v1/models/mlp:predict", json={"instances": batch.tolist()})
    assert response.status_code == 200, response.text
    predictions = np.asarray(response.json()["predictions"], dtype=np.float32)
    assert predictions.shape == (3, 10)
    np.testing.assert_allclose(predictions, reference_mlp(batch), rtol=1e-4, atol=1e-5)


def test_v1_predict_identity_rows_by_input_name(main_server: EmberProcess) -> None:
    body = {"instances": [{"INPUT_INT32": [1, 2]}, {"INPUT_INT32": [3, 4]}]}
    response = main_server.post("/v1/models/identity:predict", json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": [[1, 2], [3, 4]]}


# --- Open Inference Protocol -------------------------------------------------------------------
def test_v2_models_list(main_server: EmberProcess) -> None:
    response = main_server.get("/v2/models")
    assert response.status_code == 200
    assert sorted(response.json()["models"]) == EXAMPLES


@pytest.mark.parametrize("path", ["/v2/models/mlp", "/v2/models/mlp/versions/1"])
def test_v2_model_metadata(main_server: EmberProcess, path: str) -> None:
    response = main_server.get(path)
    assert response.status_code == 200
    doc = response.json()
    assert doc["name"] == "mlp"
    assert doc["versions"] == ["1"]
    assert doc["platform"] == "pytorch_libtorch"
    assert doc["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
    assert doc["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]


@pytest.mark.parametrize("path", ["/v2/models/mlp/ready", "/v2/models/mlp/versions/1/ready"])
def test_v2_model_ready(main_server: EmberProcess, path: str) -> None:
    response = main_server.get(path)
    assert response.status_code == 200
    assert response.json() == {"name": "mlp", "ready": True}


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_v2_infer_mlp(main_server: EmberProcess, reference_mlp: Any, nested: bool) -> None:
    batch = _batch(2)
    data = batch.tolist() if nested else batch.reshape(-1).tolist()
    body = {
        "id": f"request-{nested}",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 784], "data": data}],
    }
    response = main_server.infer("mlp", body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    doc = response.json()
    assert doc["model_name"] == "mlp"
    assert doc["model_version"] == "1"
    assert doc["id"] == f"request-{nested}"
    [output] = doc["outputs"]
    assert output["name"] == "output"
    assert output["datatype"] == "FP32"
    assert output["shape"] == [2, 10]
    got = np.asarray(output["data"], dtype=np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, reference_mlp(batch), rtol=1e-4, atol=1e-5)


def test_v2_infer_versioned_route(main_server: EmberProcess) -> None:
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.0] * 784}]
    }
    response = main_server.post("/v2/models/mlp/versions/1/infer", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [1, 10]


def test_v2_infer_without_id_has_no_id(main_server: EmberProcess) -> None:
    response = main_server.infer(
        "identity",
        {"inputs": [{"name": "INPUT_INT8", "datatype": "INT8", "shape": [1, 1], "data": [3]}]},
    )
    assert response.status_code == 200, response.text
    assert response.json().get("id") in (None, "")


def test_v2_requested_outputs_subset(main_server: EmberProcess) -> None:
    body = {
        "id": "subset",
        "inputs": [
            {"name": "INPUT_INT32", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]},
            {"name": "INPUT_FP64", "datatype": "FP64", "shape": [1, 2], "data": [0.5, 1.5]},
        ],
        "outputs": [{"name": "OUTPUT_FP64"}],
    }
    response = main_server.infer("identity", body)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["id"] == "subset"
    assert [o["name"] for o in doc["outputs"]] == ["OUTPUT_FP64"]
    assert doc["outputs"][0]["data"] == [0.5, 1.5]

    del body["outputs"]
    response = main_server.infer("identity", body)
    assert sorted(o["name"] for o in response.json()["outputs"]) == ["OUTPUT_FP64", "OUTPUT_INT32"]


# Values at the edges of each datatype that JSON carries exactly.
ROUND_TRIP: dict[str, list[Any]] = {
    "BOOL": [True, False, False, True],
    "UINT8": [0, 1, 254, 255],
    "UINT16": [0, 1, 65534, 65535],
    "UINT32": [0, 1, 2**32 - 2, 2**32 - 1],
    "UINT64": [0, 1, 2**40, 2**63 - 1],
    "INT8": [-128, -1, 0, 127],
    "INT16": [-(2**15), -1, 0, 2**15 - 1],
    "INT32": [-(2**31), -1, 0, 2**31 - 1],
    "INT64": [-(2**63), -1, 0, 2**63 - 1],
    "FP32": [0.5, -1.25, 3.0e38, 1.0e-38],
    "FP64": [0.1, -2.5e-308, 1.7976931348623157e308, 123456789.123456789],
    "BYTES": ["hello", "", "ünïcödé ✓", 'quotes " and \\ backslash'],
}


def test_identity_round_trips_every_json_datatype(main_server: EmberProcess) -> None:
    inputs = [
        {"name": f"INPUT_{dt}", "datatype": dt, "shape": [2, 2], "data": [values[:2], values[2:]]}
        for dt, values in ROUND_TRIP.items()
    ]
    response = main_server.infer("identity", {"id": "every-datatype", "inputs": inputs})
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["id"] == "every-datatype"
    outputs = {o["name"]: o for o in doc["outputs"]}
    assert sorted(outputs) == sorted(f"OUTPUT_{dt}" for dt in ROUND_TRIP)
    for dt, values in ROUND_TRIP.items():
        output = outputs[f"OUTPUT_{dt}"]
        assert output["datatype"] == dt
        assert output["shape"] == [2, 2]
        data = np.asarray(output["data"]).reshape(-1).tolist()
        if dt == "FP32":
            # Exact as float32: what was sent, rounded to float32 once.
            assert np.array_equal(np.asarray(data, np.float32), np.asarray(values, np.float32))
        else:
            assert data == values, (dt, data)
            assert [type(v) for v in data] == [type(v) for v in values], dt


@pytest.mark.parametrize("datatype", sorted(ROUND_TRIP))
def test_identity_round_trip_flat_one_datatype(main_server: EmberProcess, datatype: str) -> None:
    values = ROUND_TRIP[datatype]
    body = {
        "inputs": [
            {"name": f"INPUT_{datatype}", "datatype": datatype, "shape": [1, 4], "data": values}
        ]
    }
    response = main_server.infer("identity", body)
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    assert output == {
        "name": f"OUTPUT_{datatype}",
        "datatype": datatype,
        "shape": [1, 4],
        "data": output["data"],
    }
    if datatype == "FP32":
        assert np.array_equal(np.asarray(output["data"], np.float32), np.float32(values))
    else:
        assert output["data"] == values


def test_identity_uint64_above_int64_range(main_server: EmberProcess) -> None:
    """UINT64 values above 2**63 - 1, mixed with small ones, come back exact (not as floats)."""
    values = [0, 1, 2**63, 2**64 - 1]
    body = {
        "inputs": [{"name": "INPUT_UINT64", "datatype": "UINT64", "shape": [1, 4], "data": values}]
    }
    response = main_server.infer("identity", body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == values
    main_server.assert_serves("identity")


# --- repository extension ----------------------------------------------------------------------
def test_repository_index_unload_and_load(
    test_models_server: EmberProcess, expect_error: ErrorCheck
) -> None:
    server = test_models_server
    response = server.post("/v2/repository/index")
    assert response.status_code == 200, response.text
    index = {entry["name"]: entry for entry in response.json()}
    assert sorted(index) == ["failing", "required", "slow"]
    assert index["required"]["state"] == "READY"
    assert index["required"]["version"] == "1"

    try:
        response = server.post("/v2/repository/models/required/unload")
        assert response.status_code == 200, response.text
        expect_error(server.get("/v2/models/required/ready"), 503, "'required'")
        expect_error(
            server.infer(
                "required",
                {"inputs": [{"name": "a", "datatype": "INT32", "shape": [1], "data": [1]}]},
            ),
            503,
            "'required'",
            "not ready",
        )
        expect_error(
            server.post("/v1/models/required:predict", json={"instances": [1, 2]}),
            503,
            "'required'",
        )
        assert server.get("/v1/models/required").json() == {"name": "required", "ready": False}
        assert server.get("/v2/health/ready").status_code == 503
        states = {e["name"]: e["state"] for e in server.post("/v2/repository/index").json()}
        assert states["required"] != "READY"
        server.assert_serves("slow")  # the other models still serve
    finally:
        response = server.post("/v2/repository/models/required/load")
    assert response.status_code == 200, response.text
    assert server.get("/v2/models/required/ready").status_code == 200
    assert server.get("/v2/health/ready").status_code == 200
    server.assert_serves("required")


def test_repository_load_unknown_model_is_404(
    test_models_server: EmberProcess, expect_error: ErrorCheck
) -> None:
    expect_error(test_models_server.post("/v2/repository/models/nope/load"), 404, "'nope'")
    expect_error(test_models_server.post("/v2/repository/models/nope/unload"), 404, "'nope'")
    test_models_server.assert_serves("required")
