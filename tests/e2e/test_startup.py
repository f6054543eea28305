"""How `ember serve` starts: which models it serves from flags and env, and how it refuses a
bad model.toml (exit non-zero at once, one line naming the file and the field).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

# conftest.py's `ember` factory and check_error (conftest cannot be imported).
EmberFactory = Any
ErrorCheck = Any

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
TEST_MODELS = ROOT / "tests" / "models"

MLP_BODY = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.0] * 784}]
}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- a bad model.toml --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "file", "fields"),
    [
        pytest.param(
            ["--model-repository", TEST_MODELS / "bad_key"],
            TEST_MODELS / "bad_key" / "typo" / "model.toml",
            ["max_batch_sise", "unknown key"],
            id="unknown-key",
        ),
        pytest.param(
            ["--model-repository", TEST_MODELS / "bad_datatype"],
            TEST_MODELS / "bad_datatype" / "typo" / "model.toml",
            ["inputs", "datatype", "FP32"],
            id="bad-datatype",
        ),
        pytest.param(
            ["--model_dir", TEST_MODELS / "bad_datatype" / "typo"],
            TEST_MODELS / "bad_datatype" / "typo" / "model.toml",
            ["inputs", "datatype"],
            id="bad-datatype-model-dir",
        ),
    ],
)
@pytest.mark.parametrize("log_format", ["auto", "text"])
def test_bad_model_toml_exits_with_one_line(
    ember: EmberFactory, args: list[Any], file: Path, fields: list[str], log_format: str
) -> None:
    started = time.monotonic()
    server = ember(*args, "--log-format", log_format, wait=None)
    code = server.wait_exit(30.0)
    elapsed = time.monotonic() - started
    stderr = server.stderr()
    assert code != 0, stderr
    assert elapsed < 20.0, f"took {elapsed:.1f} s to refuse the model"
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    [line] = lines
    assert str(file) in line, line
    for field in fields:
        assert field in line, (field, line)
    assert "Traceback" not in stderr
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.base_url}/v2/health/live", timeout=1.0)


def test_unknown_model_flag_exits_naming_it(ember: EmberFactory) -> None:
    server = ember("--model-repository", MODELS, "--model", "nope", wait=None)
    assert server.wait_exit(30.0) != 0
    lines = [line for line in server.stderr().splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "nope" in lines[0]
    assert "Traceback" not in server.stderr()


# --- which models are served -------------------------------------------------------------------
def test_model_flag_serves_only_that_model(ember: EmberFactory, expect_error: ErrorCheck) -> None:
    server = ember("--model-repository", MODELS, "--model", "identity")
    assert server.get("/v2/models").json()["models"] == ["identity"]
    assert server.get("/v1/models").json()["models"] == ["identity"]
    expect_error(server.infer("mlp", MLP_BODY), 404, "'mlp'")
    expect_error(server.get("/v2/models/mlp"), 404, "'mlp'")
    expect_error(server.post("/v1/models/mlp:predict", json={"instances": [[0.0] * 784]}), 404)
    server.assert_serves("identity")
    assert server.get("/v2/health/ready").status_code == 200


def test_kserve_model_dir_and_model_name(ember: EmberFactory, expect_error: ErrorCheck) -> None:
    # Relative to the working directory, as KServe users pass it.
    server = ember("--model_dir", "models/mlp", "--model_name", "foo", cwd=ROOT)
    assert server.get("/v2/models").json()["models"] == ["foo"]
    assert server.get("/v1/models").json()["models"] == ["foo"]
    metadata = server.get("/v2/models/foo").json()
    assert metadata["name"] == "foo"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]
    server.assert_serves("foo", kind="mlp")
    predict = server.post("/v1/models/foo:predict", json={"instances": [[0.0] * 784]})
    assert predict.status_code == 200, predict.text
    expect_error(server.infer("mlp", MLP_BODY), 404, "'mlp'")
    server.assert_serves("foo", kind="mlp")


def test_model_dir_holding_a_whole_repository(ember: EmberFactory) -> None:
    # `docker run -v $PWD/models:/mnt/models IMAGE` with the image's `--model_dir /mnt/models`.
    server = ember("--model_dir", str(MODELS), "--model", "identity")
    assert server.get("/v2/models").json()["models"] == ["identity"]
    server.assert_serves("identity")


def test_port_env_when_no_http_port_flag(ember: EmberFactory) -> None:
    port = _free_port()
    server = ember(
        "--model-repository",
        MODELS,
        "--model",
        "identity",
        port_flag=False,
        port=port,
        env={"PORT": str(port)},
    )
    assert server.base_url.endswith(f":{port}")
    assert server.get("/v2/health/ready").status_code == 200
    server.assert_serves("identity")


def test_http_port_flag_wins_over_port_env(ember: EmberFactory) -> None:
    other = _free_port()
    server = ember("--model-repository", MODELS, "--model", "identity", env={"PORT": str(other)})
    server.assert_serves("identity")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{other}/v2/health/live", timeout=1.0)


@pytest.mark.parametrize("scheme", ["", "file://"], ids=["path", "file-uri"])
def test_storage_uri_env_names_the_model_folder(
    ember: EmberFactory, tmp_path: Path, scheme: str
) -> None:
    # Run somewhere without a ./models folder, so STORAGE_URI is the only way to a model.
    uri = f"{scheme}{MODELS / 'identity'}"
    server = ember(env={"STORAGE_URI": uri}, cwd=tmp_path)
    assert server.get("/v2/models").json()["models"] == ["identity"]
    server.assert_serves("identity")


def test_workers_share_the_port_and_stop_together(ember: EmberFactory) -> None:
    server = ember("--model-repository", MODELS, "--model", "identity", "--workers", "2")
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    workers = [
        pid for pid in children
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]  # fmt: skip
    assert len(workers) == 2, children
    for _ in range(10):
        server.assert_serves("identity")
    server.signal(signal.SIGTERM)
    assert server.wait_exit(20.0) == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


# --- the cold-start report ---------------------------------------------------------------------
def test_each_model_reports_its_cold_start_once(ember: EmberFactory) -> None:
    import json

    server = ember("--model-repository", MODELS, "--model", "identity", "--model", "mlp")
    lines = [json.loads(line) for line in server.stderr().splitlines() if line.startswith("{")]
    reports = {r["model"]: r for r in lines if r["message"] == "cold start"}
    assert sorted(reports) == ["identity", "mlp"]
    assert len([r for r in lines if r["message"] == "cold start"]) == 2
    for report in reports.values():
        phases = [report[f"{p}_s"] for p in ("imports", "config", "download", "load", "warmup")]
        assert all(p >= 0 for p in phases) and report["download_s"] == 0
        assert 0 < sum(phases) <= report["total_s"] + 0.01
    # torch is imported before any model loads, and mlp's warm-up runs a forward.
    assert reports["mlp"]["imports_s"] > 0.1 and reports["mlp"]["warmup_s"] > 0
    # A reload through the repository API is not a cold start: no second report.
    assert server.post("/v2/repository/models/mlp/unload").status_code == 200
    assert server.post("/v2/repository/models/mlp/load").status_code == 200
    later = [line for line in server.stderr().splitlines() if '"cold start"' in line]
    assert len(later) == 2
