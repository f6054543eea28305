"""Real `ember serve` processes on free ports, for tests that talk to them over HTTP.

`launch()` starts one, `EmberProcess.wait_ready()` waits for `/v2/health/ready` (failing with
the server's stderr if it dies first) and `EmberProcess.stop()` sends SIGTERM, then SIGKILL.
Every process started here is stopped by its fixture's teardown, and, as a last resort, at
the end of the session.

Fixtures:
- `main_server`: one server over `models/` (identity, mlp, minilm, resnet) for the session;
- `test_models_server`: one server over `tests/models/serving` (slow, failing, required);
- `ember`: a factory for servers with their own repository, flags or environment, stopped
  when the test ends.

pytest runs with `--import-mode=importlib`, so test modules cannot import this file: what
they share is reached through fixtures and the `EmberProcess` methods.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
TEST_MODELS = ROOT / "tests" / "models"

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
# Environment variables `ember serve` reads; tests set them explicitly or not at all.
_SERVE_ENV = ("PORT", "STORAGE_URI", "KSERVE_LOGLEVEL", "PROTOCOL")

# Requests each known model answers with 200, so a test can check a server still serves.
GOOD_REQUESTS: dict[str, dict[str, Any]] = {
    "identity": {"inputs": [{"name": "INPUT_INT32", "datatype": "INT32", "shape": [1, 2],
                             "data": [1, 2]}]},
    "mlp": {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784],
                        "data": [0.0] * 784}]},
    "required": {"inputs": [{"name": "a", "datatype": "INT32", "shape": [2], "data": [1, 2]}]},
    "slow": {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]},
                        {"name": "delay", "datatype": "FP32", "shape": [1], "data": [0.0]}]},
}  # fmt: skip


def ember_executable() -> str:
    found = shutil.which("ember", path=str(Path(sys.executable).parent)) or shutil.which("ember")
    if found is None:
        pytest.fail("the `ember` console script is not installed (pip install -e .)")
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


MetricKey = tuple[str, frozenset[tuple[str, str]]]


@dataclass(eq=False)
class EmberProcess:
    """One `ember serve` process and the ways tests talk to it."""

    process: subprocess.Popen[bytes]
    port: int
    args: list[str]
    stderr_path: Path
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def describe(self) -> str:
        return f"`ember {' '.join(self.args)}` (pid {self.pid}); stderr:\n{self.stderr()[-6000:]}"

    # --- HTTP ------------------------------------------------------------------------------
    def client(self, timeout: float = 30.0) -> httpx.Client:
        """A keep-alive client bound to this server, closed when the server is stopped."""
        client = httpx.Client(base_url=self.base_url, timeout=timeout)
        self.clients.append(client)
        return client

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        with httpx.Client(base_url=self.base_url, timeout=30.0) as client:
            return client.get(path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        with httpx.Client(base_url=self.base_url, timeout=30.0) as client:
            return client.post(path, **kwargs)

    def infer(self, model: str, body: Any) -> httpx.Response:
        return self.post(f"/v2/models/{model}/infer", json=body)

    def assert_serves(self, model: str = "identity", kind: str | None = None) -> None:
        """A good request to `model` (a model like `kind`, default itself) answers 200."""
        body = GOOD_REQUESTS[kind or model]
        response = self.infer(model, body)
        assert response.status_code == 200, (response.status_code, response.text)
        doc = response.json()
        assert doc["model_name"] == model
        assert doc["outputs"], doc

    def metrics(self) -> dict[MetricKey, float]:
        """Every sample of `/metrics`, keyed by (sample name, labels)."""
        response = self.get("/metrics")
        assert response.status_code == 200, response.text
        samples: dict[MetricKey, float] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    # --- lifecycle -------------------------------------------------------------------------
    def _wait_for(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        with httpx.Client(base_url=self.base_url, timeout=2.0) as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code is not None:
                    pytest.fail(f"ember serve exited with {code} before {path}: {self.describe()}")
                try:
                    response = client.get(path)
                    if response.status_code == 200:
                        return
                    last = f"{response.status_code} {response.text}"
                except httpx.TransportError as exc:
                    last = repr(exc)
                time.sleep(0.05)
        pytest.fail(f"{path} not 200 after {timeout} s (last: {last}): {self.describe()}")

    def wait_live(self, timeout: float = READY_TIMEOUT_S) -> None:
        self._wait_for("/v2/health/live", timeout)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        self._wait_for("/v2/health/ready", timeout)

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait_exit(self, timeout: float) -> int:
        """The exit code; fails the test if the process is still running `timeout` s later."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        pytest.fail(f"ember serve still running {timeout} s later: {self.describe()}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL (to its whole process group) if it does not exit in time."""
        for client in self.clients:
            client.close()
        self.clients.clear()
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            return self.process.wait(timeout)


# Every process launched in this session, so none outlives it whatever happens to a fixture.
_LAUNCHED: list[EmberProcess] = []


def launch(
    *args: str | Path,
    env: dict[str, str] | None = None,
    port: int | None = None,
    port_flag: bool = True,
    cwd: Path | None = None,
    command: str = "serve",
) -> EmberProcess:
    """Start `ember serve ARGS --host 127.0.0.1 --http_port PORT`; does not wait for it.

    `command="activator"` starts `ember activator` the same way.

    `env` is added to this process's environment, minus the variables `ember serve` reads.
    With `port_flag=False` no `--http_port` is passed (the caller sets `PORT` in `env`).
    """
    port = free_port() if port is None else port
    argv = [command, *(str(a) for a in args), "--host", "127.0.0.1"]
    if "--grpc_port" not in argv:
        # Servers run side by side: each gets its own gRPC port too.
        argv += ["--grpc_port", str(free_port())]
    if port_flag:
        argv += ["--http_port", str(port)]
    full_env = {k: v for k, v in os.environ.items() if k not in _SERVE_ENV}
    full_env.update(env or {})
    fd, name = tempfile.mkstemp(prefix="ember-serve-", suffix=".stderr")
    with os.fdopen(fd, "wb") as stderr:
        process = subprocess.Popen(
            [ember_executable(), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=full_env,
            cwd=cwd or ROOT,
            # Its own process group: a leftover worker can be killed with it.
            start_new_session=True,
        )
    server = EmberProcess(process=process, port=port, args=argv, stderr_path=Path(name))
    _LAUNCHED.append(server)
    return server


def start_ready(
    *args: str | Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    command: str = "serve",
) -> EmberProcess:
    """Launch and wait until ready, retrying with another port if this one was taken."""
    for _ in range(3):
        server = launch(*args, env=env, cwd=cwd, command=command)
        try:
            server.wait_ready()
            return server
        except pytest.fail.Exception:
            if server.process.poll() is not None and "listen" in server.stderr():
                continue
            server.stop()
            raise
    pytest.fail("could not find a free port for ember serve")


def _finish(server: EmberProcess) -> None:
    server.stop()
    with contextlib.suppress(OSError):
        server.stderr_path.unlink()


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_servers() -> Iterator[None]:
    yield
    for server in _LAUNCHED:
        if server.process.poll() is None:
            server.stop(timeout=5.0)


class EmberFactory(Protocol):
    def __call__(
        self,
        *args: str | Path,
        env: dict[str, str] | None = None,
        wait: str | None = "ready",
        port_flag: bool = True,
        port: int | None = None,
        cwd: Path | None = None,
        command: str = "serve",
    ) -> EmberProcess: ...


@pytest.fixture
def ember() -> Iterator[EmberFactory]:
    """Start servers for one test: `ember(args..., wait="ready"|"live"|None)`."""
    started: list[EmberProcess] = []

    def start(
        *args: str | Path,
        env: dict[str, str] | None = None,
        wait: str | None = "ready",
        port_flag: bool = True,
        port: int | None = None,
        cwd: Path | None = None,
        command: str = "serve",
    ) -> EmberProcess:
        if wait == "ready" and port_flag and port is None:
            server = start_ready(*args, env=env, cwd=cwd, command=command)
        else:
            server = launch(
                *args, env=env, port=port, port_flag=port_flag, cwd=cwd, command=command
            )
            if wait == "ready":
                server.wait_ready()
            elif wait == "live":
                server.wait_live()
        started.append(server)
        return server

    yield start
    for server in started:
        _finish(server)


@pytest.fixture(scope="session")
def main_server() -> Iterator[EmberProcess]:
    """`ember serve` over the example repository `models/` (identity, mlp, minilm, resnet)."""
    server = start_ready("--model-repository", MODELS)
    yield server
    _finish(server)


@pytest.fixture(scope="session")
def test_models_server() -> Iterator[EmberProcess]:
    """`ember serve` over `tests/models/serving` (slow, failing, required)."""
    server = start_ready("--model-repository", TEST_MODELS / "serving")
    yield server
    _finish(server)


ErrorCheck = Callable[..., str]


def check_error(response: httpx.Response, status: int, *fragments: str) -> str:
    """`response` has `status` and a body of exactly `{"error": "..."}` holding every fragment.

    Returns the message. Fragments are compared case-insensitively.
    """
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    doc = response.json()
    assert isinstance(doc, dict) and set(doc) == {"error"}, doc
    message = doc["error"]
    assert isinstance(message, str) and message, doc
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"
    return message


@pytest.fixture
def expect_error() -> ErrorCheck:
    """`expect_error(response, status, *fragments) -> message`; see `check_error`."""
    return check_error


@pytest.fixture(scope="session")
def ember_session() -> Iterator[Callable[..., EmberProcess]]:
    """Like `ember`, for module- or session-scoped fixtures: started ready, stopped at the end
    of the session."""
    started: list[EmberProcess] = []

    def start(*args: str | Path, env: dict[str, str] | None = None, command: str = "serve") \
            -> EmberProcess:  # fmt: skip
        server = start_ready(*args, env=env, command=command)
        started.append(server)
        return server

    yield start
    for server in started:
        _finish(server)
