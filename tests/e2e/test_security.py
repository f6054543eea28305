"""Security checks on real processes: weights are never unpickled, model names on the URL
cannot reach anything but a served model, and requests are bounded by configurable limits.

Limits already covered elsewhere: the body (`test_bad_input.py::test_oversized_body_is_413`,
`test_http_wire.py::test_declared_body_over_the_limit...`, `...chunked_body_over_the_limit...`),
absurd shapes over binary HTTP (`tests/conformance/test_errors.py`, "absurd shape") and gRPC
(`tests/conformance/test_raw_grpc.py::test_absurd_shape_is_refused_fast`), the 128 MiB default
gRPC receive limit (`tests/conformance/test_identity.py`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shlex
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

ARCH = """
import torch


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
"""

TOML = """
name = "tiny"
format = "safetensors"
architecture = "arch:Tiny"
storage_uri = "weights.pt"
device = "cpu"

[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 4]

[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1, 3]
"""


class _Payload:
    """Unpickling this runs a shell command: what a planted checkpoint would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        import os

        return (os.system, (self.command,))


def test_a_pickle_payload_in_the_weights_never_runs(ember: Any, tmp_path: Path) -> None:
    """What the user sees: `ember serve` of a model whose `.pt` state dict hides a pickled
    object that would run a command exits non-zero with one error line saying the file holds
    pickled objects Ember never unpickles; the command never ran (its marker file is absent)."""
    folder = tmp_path / "repo" / "tiny"
    folder.mkdir(parents=True)
    (folder / "arch.py").write_text(ARCH)
    (folder / "model.toml").write_text(TOML)
    marker = tmp_path / "payload-ran"
    state = {"linear.weight": _Payload(f"touch {shlex.quote(str(marker))}"),
             "linear.bias": torch.zeros(3)}  # fmt: skip
    torch.save(state, folder / "weights.pt")
    server = ember("--model-repository", folder.parent, "--log-format", "json", wait=None)
    assert server.wait_exit(60) != 0
    errors = [
        json.loads(line) for line in server.stderr().splitlines() if '"level":"error"' in line
    ]
    assert len(errors) == 1, errors
    text = f"{errors[0]['message']}: {errors[0].get('error', '')}"
    assert "weights.pt" in text and "pickled objects other than tensors" in text, text
    assert "weights_only=False" not in text
    assert not marker.exists()


# --- names on the URL ----------------------------------------------------------------------

ESCAPES = [
    "/v2/models/../mlp/ready",
    "/v2/models/..%2Fmlp/ready",
    "/v2/models/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd/infer",
    "/v2/models/identity%2F..%2Fmlp/infer",
    "/v2/models/%2Fetc%2Fpasswd/infer",
    "/v2/models/..%5Cmlp/infer",
    "/v2/models/mlp%00/infer",
    "/v1/models/..%2Fidentity:predict",
    "/v2/models/identity/../../../etc/passwd",
]


def _ask(port: int, path: str) -> tuple[int, bytes]:
    """One request with the path exactly as written (no client normalises it)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, body=b"{}", headers={"content-type": "application/json"})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def _check_escapes(port: int) -> None:
    for path in ESCAPES:
        status, answer = _ask(port, path)
        # Refused as unknown (or, for dot segments after a real name, as no such route):
        # never answered by a model, never a file's content.
        assert status in (404, 405), (path, status, answer)
        assert list(json.loads(answer)) == ["error"], (path, answer)
        assert b"root:" not in answer


def test_names_on_the_url_cannot_leave_the_served_models(main_server: Any, ember: Any) -> None:
    """What the user sees: `..`, encoded slashes, backslashes, NUL and absolute paths in the
    model name part of a URL are answered with a JSON error (404: no such model), by the
    predictor and by the activator, which starts no replica for them; both keep serving. Dot
    segments after a real name stay with that model: the activator hands them to its replica,
    which has no such route (404)."""
    _check_escapes(main_server.port)
    main_server.assert_serves("identity")
    activator = ember("--model-repository", ROOT / "models", command="activator")
    _check_escapes(activator.port)
    status = activator.get("/status").json()["models"]
    assert all(doc["replicas"] == [] for name, doc in status.items() if name != "identity")


# --- limits --------------------------------------------------------------------------------


def test_a_json_shape_larger_than_its_data_is_refused_at_once(main_server: Any) -> None:
    """What the user sees: a V2 JSON tensor declaring 2**40 elements with two values in
    `data` is a 400 naming the shape within a moment; nothing of that size is allocated and
    the server keeps serving."""
    absurd = {"inputs": [{"name": "INPUT_INT32", "datatype": "INT32",
                          "shape": [2**20, 2**20], "data": [1, 2]}]}  # fmt: skip
    started = time.monotonic()
    answer = main_server.infer("identity", absurd)
    assert time.monotonic() - started < 2
    assert answer.status_code == 400, answer.text
    assert "1048576" in answer.json()["error"]
    main_server.assert_serves("identity")


def test_grpc_message_limits_are_the_configured_ones(ember: Any) -> None:
    """What the user sees: with `--grpc_max_receive_message_length 65536` and
    `--grpc_max_send_message_length 8192`, a 100 kB request and an answer over 8 kB both
    end in RESOURCE_EXHAUSTED, and a small request is answered on the same channel."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    grpc_port = _free_port()
    ember(
        "--model-repository", ROOT / "models", "--model", "identity",
        "--grpc_port", str(grpc_port),
        "--grpc_max_receive_message_length", "65536",
        "--grpc_max_send_message_length", "8192",
    )  # fmt: skip
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")

    def ask(count: int) -> Any:
        tensor = grpcclient.InferInput("INPUT_INT32", [1, count], "INT32")
        tensor.set_data_from_numpy(np.arange(count, dtype=np.int32).reshape(1, count))
        return client.infer("identity", [tensor], client_timeout=30)

    for count in (25_000, 4_000):  # 100 kB in; 16 kB in, 16 kB back
        with pytest.raises(InferenceServerException) as caught:
            ask(count)
        assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED", caught.value
    np.testing.assert_array_equal(ask(100).as_numpy("OUTPUT_INT32")[0], np.arange(100))
    client.close()


def test_the_activator_grpc_limit_is_configurable_and_wakes_nothing(ember: Any) -> None:
    """What the user sees: `ember activator --grpc_max_receive_message_length 65536` answers
    a 100 kB gRPC request with RESOURCE_EXHAUSTED itself, without starting a replica for it."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    grpc_port = _free_port()
    activator = ember(
        "--model-repository", ROOT / "models", "--model", "identity", "--grpc_port",
        str(grpc_port), "--grpc_max_receive_message_length", "65536", command="activator",
    )  # fmt: skip
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    tensor = grpcclient.InferInput("INPUT_INT32", [1, 25_000], "INT32")
    tensor.set_data_from_numpy(np.zeros((1, 25_000), dtype=np.int32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("identity", [tensor], client_timeout=30)
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED", caught.value
    client.close()
    assert activator.get("/status").json()["models"]["identity"]["replicas"] == []


def test_the_body_limit_holds_through_the_activator(ember: Any, tmp_path: Path) -> None:
    """What the user sees: a replica's `--max-body-bytes` (passed with --serve-arg) answers
    413 through the activator for a body over it, whether the activator buffers the body or
    streams it; a request within it is served."""
    activator = ember(
        "--model-repository", ROOT / "models", "--model", "identity", "--run-dir",
        tmp_path / "run", "--serve-arg=--max-body-bytes", "--serve-arg=2000",
        "--tick-seconds", "0.2", "--probe-interval", "0.05", command="activator",
    )  # fmt: skip
    small = {"inputs": [{"name": "INPUT_INT32", "datatype": "INT32", "shape": [1, 2],
                         "data": [1, 2]}]}  # fmt: skip
    assert activator.infer("identity", small).status_code == 200
    big = {"inputs": [{"name": "INPUT_INT32", "datatype": "INT32", "shape": [1, 2000],
                       "data": [7] * 2000}]}  # fmt: skip
    answer = activator.infer("identity", big)
    assert answer.status_code == 413 and "2000" in answer.json()["error"], answer.text

    def chunks() -> Any:
        data = json.dumps(big).encode()
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    streamed = activator.post("/v2/models/identity/infer", content=chunks())
    assert streamed.status_code == 413, streamed.text
    assert activator.infer("identity", small).status_code == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _headers_answer(port: int, count: int, value_bytes: int) -> int:
    fields = b"".join(b"x-h%d: %s\r\n" % (i, b"v" * value_bytes) for i in range(count))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n")
        head = sock.recv(100)
    return int(head.split(b" ", 2)[1])


@pytest.mark.parametrize(("count", "value_bytes"), [(10_000, 8), (1, 1 << 20)])
def test_request_headers_are_bounded(main_server: Any, count: int, value_bytes: int) -> None:
    """What the user should see: too many or too large request headers get 431 before the
    server holds them all, and the server keeps serving."""
    assert _headers_answer(main_server.port, count, value_bytes) == 431
    main_server.assert_serves("identity")


def test_the_activator_bounds_headers_with_its_own_flags(ember: Any) -> None:
    """The activator answers 431 itself (no replica is woken for it); its limits are flags."""
    activator = ember(
        "--model-repository", ROOT / "models", "--model", "identity", "--max-headers", "5",
        "--max-header-bytes", "2048", command="activator",
    )  # fmt: skip
    assert _headers_answer(activator.port, 3, 8) == 200
    assert _headers_answer(activator.port, 10, 8) == 431
    assert _headers_answer(activator.port, 1, 4096) == 431
    assert _headers_answer(activator.port, 1, 1 << 20) == 431
    status = activator.get("/status").json()
    assert "identity" in json.dumps(status)
    assert activator.get("/v2/health/live").status_code == 200


def test_header_probe_reaches_the_server(main_server: Any) -> None:
    """The 431s above are the limit, not a broken probe: a few headers get 200."""
    assert _headers_answer(main_server.port, 3, 8) == 200
