"""Health, metadata, model config, statistics and the model repository through tritonclient."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio

if TYPE_CHECKING:
    from conftest import Api, Server

ROOT = Path(__file__).resolve().parents[2]
# Every model folder of the example repository, which `server` serves.
EXAMPLES = sorted(p.name for p in (ROOT / "models").iterdir() if (p / "model.toml").is_file())

pytestmark = pytest.mark.e2e

IDENTITY_ROW = {"INPUT_INT32": np.array([[1, 2, 3]], dtype=np.int32)}


def test_health(api: Api) -> None:
    assert api.client.is_server_live()
    assert api.client.is_server_ready()
    assert api.client.is_model_ready("identity")
    assert api.client.is_model_ready("mlp")
    assert api.client.is_model_ready("mlp", "1")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_health_aio(server: Server, protocol: str) -> None:
    client: Any = (
        httpaio.InferenceServerClient(server.http)
        if protocol == "http"
        else grpcaio.InferenceServerClient(server.grpc)
    )
    try:
        assert await client.is_server_live()
        assert await client.is_server_ready()
        assert await client.is_model_ready("identity")
        kwargs = {"as_json": True} if protocol == "grpc" else {}
        metadata = await client.get_model_metadata("mlp", **kwargs)
        assert metadata["name"] == "mlp"
    finally:
        await client.close()


def test_unknown_model_is_not_ready(api: Api) -> None:
    # tritonclient's HTTP is_model_ready is True only on 200; gRPC raises NOT_FOUND.
    if api.protocol == "http":
        assert not api.client.is_model_ready("no-such-model")
    else:
        with api.raises(404, "NOT_FOUND", "no-such-model"):
            api.client.is_model_ready("no-such-model")


def test_server_metadata(api: Api) -> None:
    doc = api.doc("get_server_metadata")
    assert doc["name"] == "ember"
    assert doc["version"]
    for extension in ("binary_tensor_data", "statistics", "model_repository",
                      "model_configuration"):  # fmt: skip
        assert extension in doc["extensions"], doc


def test_model_metadata(api: Api) -> None:
    doc = api.doc("get_model_metadata", "mlp")
    assert doc["name"] == "mlp"
    assert doc["versions"] == ["1"]
    assert doc["platform"] == "pytorch_libtorch"
    [tensor] = doc["inputs"]
    assert (tensor["name"], tensor["datatype"]) == ("input", "FP32")
    assert [int(d) for d in tensor["shape"]] == [-1, 784]
    [tensor] = doc["outputs"]
    assert (tensor["name"], tensor["datatype"]) == ("output", "FP32")
    assert [int(d) for d in tensor["shape"]] == [-1, 10]

    identity = api.doc("get_model_metadata", "identity", "1")
    names = {t["name"] for t in identity["inputs"]}
    assert {"INPUT_BF16", "INPUT_BYTES", "INPUT_BOOL"} <= names
    assert len(identity["outputs"]) == 14


def test_model_config(api: Api) -> None:
    doc = api.doc("get_model_config", "mlp")
    config = doc["config"] if api.protocol == "grpc" else doc
    assert config["name"] == "mlp"
    assert config["platform"] == "pytorch_libtorch"
    assert int(config["max_batch_size"]) == 64
    [tensor] = config["input"]
    assert tensor["name"] == "input"
    assert tensor["data_type"] == "TYPE_FP32"
    assert [int(d) for d in tensor["dims"]] == [784]
    [tensor] = config["output"]
    assert tensor["data_type"] == "TYPE_FP32"
    assert [int(d) for d in tensor["dims"]] == [10]

    identity = api.doc("get_model_config", "identity")
    config = identity["config"] if api.protocol == "grpc" else identity
    assert int(config.get("max_batch_size", 0)) == 0
    types = {t["name"]: t["data_type"] for t in config["input"]}
    assert types["INPUT_BYTES"] == "TYPE_STRING"
    assert types["INPUT_BF16"] == "TYPE_BF16"
    assert [int(d) for d in config["input"][0]["dims"]] == [-1, -1]


def _stats(api: Api, model: str) -> dict[str, int]:
    doc = api.doc("get_inference_statistics", model)
    [entry] = doc["model_stats"]
    assert entry["name"] == model
    inference = entry.get("inference_stats", {})
    return {
        # protobuf JSON leaves out zeros and writes int64 as strings
        "inference_count": int(entry.get("inference_count", 0)),
        "execution_count": int(entry.get("execution_count", 0)),
        "success": int(inference.get("success", {}).get("count", 0)),
        "fail": int(inference.get("fail", {}).get("count", 0)),
    }


def test_statistics_count_requests_exactly(api: Api) -> None:
    before = _stats(api, "identity")
    for _ in range(5):
        api.infer("identity", IDENTITY_ROW)
    after = _stats(api, "identity")
    # identity does not batch (max_batch_size 0): one inference per request.
    assert after["inference_count"] - before["inference_count"] == 5
    assert after["execution_count"] - before["execution_count"] == 5
    assert after["success"] - before["success"] == 5
    assert after["fail"] == before["fail"]


def test_statistics_count_batch_rows(api: Api) -> None:
    before = _stats(api, "mlp")
    rows = np.zeros((3, 784), dtype=np.float32)
    for _ in range(4):
        api.infer("mlp", {"input": rows})
    after = _stats(api, "mlp")
    # mlp batches: inference_count counts rows, execution_count forward passes.
    assert after["inference_count"] - before["inference_count"] == 12
    assert after["execution_count"] - before["execution_count"] == 4
    assert after["success"] - before["success"] == 4


def test_statistics_count_failures(api: Api) -> None:
    before = _stats(api, "identity")
    with api.raises(400, "INVALID_ARGUMENT", "INPUT_NOPE"):
        api.infer("identity", {"INPUT_NOPE": np.zeros((1, 1), dtype=np.int32)})
    after = _stats(api, "identity")
    assert after["fail"] - before["fail"] == 1
    assert after["success"] == before["success"]
    assert after["inference_count"] == before["inference_count"]


def test_statistics_for_all_models(api: Api) -> None:
    doc = api.doc("get_inference_statistics")
    assert {s["name"] for s in doc["model_stats"]} == set(EXAMPLES)


def test_repository_index(api: Api) -> None:
    doc = api.doc("get_model_repository_index")
    models = doc["models"] if api.protocol == "grpc" else doc
    states = {m["name"]: m.get("state") for m in models}
    assert states == dict.fromkeys(EXAMPLES, "READY")


def test_unload_then_load(api: Api) -> None:
    rows = np.zeros((1, 784), dtype=np.float32)
    api.client.unload_model("mlp")
    try:
        assert not api.client.is_model_ready("mlp")
        assert not api.client.is_server_ready()
        with api.raises(503, "UNAVAILABLE", "mlp", "not ready"):
            api.infer("mlp", {"input": rows})
        # The other model still serves.
        api.infer("identity", IDENTITY_ROW)
        index = api.doc("get_model_repository_index")
        models = index["models"] if api.protocol == "grpc" else index
        assert {m["name"]: m.get("state") for m in models}["mlp"] != "READY"
    finally:
        api.client.load_model("mlp")
    assert api.client.is_model_ready("mlp")
    assert api.client.is_server_ready()
    assert api.infer("mlp", {"input": rows}).as_numpy("output").shape == (1, 10)


def test_load_unknown_model(api: Api) -> None:
    with api.raises(404, "NOT_FOUND", "no-such-model"):
        api.client.load_model("no-such-model")
