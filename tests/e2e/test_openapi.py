"""schemathesis against a real `ember serve`'s own /openapi.json: every operation, with
generated bodies, headers and path parameters, positive and negative. No 5xx, and every
response conforms to the document (status, content type, headers, body schema); a request
the document calls invalid is refused with a 4xx.

The runs go through schemathesis' own command line, so a failure prints the curl command that
reproduces it and tests/fuzz/README.md's longer runs are the same commands with more examples.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

# conftest.py's EmberProcess (fixtures hand it over; --import-mode=importlib).
EmberProcess = Any

MODELS = Path(__file__).resolve().parents[2] / "models"
CHECKS = ",".join([
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_headers_conformance", "response_schema_conformance", "negative_data_rejection",
])  # fmt: skip
EXAMPLES = int(os.environ.get("EMBER_SCHEMATHESIS_EXAMPLES", "10"))
_UNLOAD = "/v2/repository/models/{model_name}/unload"

# /v1/models/NAME:explain answers 501 by design (no model has an explainer, as in KServe);
# the document says so, and that one 5xx is not a failure.
_CONFIG = """
[[operations]]
include-path = "/v1/models/{model_name}:explain"
checks.not_a_server_error.expected-statuses = ["2XX", "3XX", "4XX", "501"]
"""


@pytest.fixture(scope="module")
def server(ember_session: Callable[..., EmberProcess]) -> EmberProcess:
    return ember_session("--model-repository", MODELS, "--model", "identity", "--model", "mlp")


def _schemathesis(server: EmberProcess, folder: Path, *args: str, config: str = "") -> int:
    """Run schemathesis; the number of requests it generated."""
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is not installed (pip install -e '.[test]')"
    config_file = folder / "schemathesis.toml"
    config_file.write_text(_CONFIG + config, encoding="utf-8")
    command = [
        st, "--config-file", str(config_file), "--no-color", "run",
        f"{server.base_url}/openapi.json", "--checks", CHECKS,
        "--phases", "examples,coverage,fuzzing", "--max-examples", str(EXAMPLES),
        "--seed", "0", "--generation-deterministic",
        "--workers", "1", "--request-timeout", "30", *args,
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=folder, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, (
        f"{' '.join(command)}\nexited {result.returncode}:\n{result.stdout[-12000:]}"
        f"{result.stderr[-3000:]}\nserver: {server.describe()[-3000:]}"
    )
    generated = re.search(r"(\d+) generated", result.stdout)
    assert generated is not None and int(generated.group(1)) > 0, result.stdout[-3000:]
    assert server.process.poll() is None, server.describe()
    return int(generated.group(1))


def test_every_operation(server: EmberProcess, tmp_path: Path) -> None:
    """Path parameters generated too, so most requests name no model: the 404s and the
    document's answer for them. Unloading is left to the last test, or the rest would see
    a model that is not there."""
    # At least one request per operation (23: all but unload).
    assert _schemathesis(server, tmp_path, "--exclude-path", _UNLOAD) > 23
    server.assert_serves("identity")


@pytest.mark.parametrize("model", ["identity", "mlp"])
def test_inference_bodies(server: EmberProcess, tmp_path: Path, model: str) -> None:
    """The inference operations with the model named, so generated bodies reach the decoders
    and validation rather than a 404."""
    _schemathesis(
        server, tmp_path, "--include-path-regex", "(infer|predict)$",
        config=f'[parameters]\nmodel_name = "{model}"\nversion = "1"\n',
    )  # fmt: skip
    server.assert_serves(model)


def test_unload_and_load(server: EmberProcess, tmp_path: Path) -> None:
    _schemathesis(
        server, tmp_path, "--include-path-regex", "/v2/repository/models/.*/(un)?load$",
        config='[parameters]\nmodel_name = "identity"\n',
    )  # fmt: skip
    response = server.post("/v2/repository/models/identity/load")
    assert response.status_code == 200, response.text
    server.assert_serves("identity")
