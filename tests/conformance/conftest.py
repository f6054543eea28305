"""Real `ember serve` processes driven by unmodified tritonclient (HTTP, gRPC, sync and aio).

Fixtures:
- `server`: one server over `models/` (identity, mlp, minilm, resnet) for the whole session;
- `sleepy_server`: one over `tests/conformance/models/` (a model that sleeps), started on
  first use;
- `api`: a sync tritonclient for `server`, parametrized over "http" and "grpc", behind the few
  calls the tests share (see `Api`); `http_api` and `grpc_api` for one protocol only;
  `make_api(protocol, server)` for any other server.

pytest runs with `--import-mode=importlib`: test modules cannot import this file, so what they
share comes through fixtures.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Server:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    stderr_path: Path

    @property
    def http(self) -> str:
        """host:port, as tritonclient wants it (no scheme)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")[-6000:]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@contextlib.contextmanager
def _serve(repository: Path, log_dir: Path) -> Iterator[Server]:
    http_port, grpc_port = _free_ports(2)
    ember = Path(sys.executable).with_name("ember")
    args = [str(ember), "serve", "--model-repository", str(repository), "--host", "127.0.0.1",
            "--http_port", str(http_port), "--grpc_port", str(grpc_port),
            "--drain-seconds", "2"]  # fmt: skip
    stderr_path = log_dir / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    server = Server(process, http_port, grpc_port, stderr_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ember exited with {process.returncode}:\n{server.stderr()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.http_url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"ember not ready after {READY_TIMEOUT_S} s:\n{server.stderr()}")
            time.sleep(0.1)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with _serve(ROOT / "models", tmp_path_factory.mktemp("ember")) as started:
        yield started


@pytest.fixture(scope="session")
def sleepy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repository = Path(__file__).parent / "models"
    with _serve(repository, tmp_path_factory.mktemp("ember-sleepy")) as started:
        yield started


class Api:
    """One protocol's sync tritonclient and the calls tests share across protocols."""

    def __init__(self, protocol: str, server: Server) -> None:
        self.protocol = protocol
        self.module: Any = httpclient if protocol == "http" else grpcclient
        self.url = server.http if protocol == "http" else server.grpc
        self.client: Any = self.module.InferenceServerClient(self.url)

    def inputs(self, arrays: dict[str, np.ndarray], binary: bool = True) -> list[Any]:
        """InferInputs for `arrays`; also fits the aio clients (they share these classes)."""
        made = []
        for name, array in arrays.items():
            item = self.module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            if self.protocol == "http":
                item.set_data_from_numpy(array, binary_data=binary)
            else:
                item.set_data_from_numpy(array)
            made.append(item)
        return made

    def outputs(self, names: list[str], binary: bool = True) -> list[Any]:
        if self.protocol == "http":
            return [self.module.InferRequestedOutput(n, binary_data=binary) for n in names]
        return [self.module.InferRequestedOutput(n) for n in names]

    def infer(
        self, model: str, arrays: dict[str, np.ndarray], outputs: list[str] | None = None,
        binary: bool = True, binary_out: bool = True, **kwargs: Any,
    ) -> Any:  # fmt: skip
        requested = None if outputs is None else self.outputs(outputs, binary_out)
        return self.client.infer(model, self.inputs(arrays, binary), outputs=requested, **kwargs)

    def doc(self, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """A metadata call's answer as a dict (gRPC: protobuf JSON, int64s as strings)."""
        if self.protocol == "grpc":
            kwargs["as_json"] = True
        result: dict[str, Any] = getattr(self.client, method)(*args, **kwargs)
        return result

    def response(self, result: Any) -> dict[str, Any]:
        """An InferResult's response as a dict (gRPC: protobuf JSON, int64s as strings)."""
        if self.protocol == "grpc":
            # get_output(as_json=True) of tritonclient 2.73's gRPC result returns None.
            doc: dict[str, Any] = result.get_response(as_json=True)
            return doc
        doc = result.get_response()
        return doc

    @contextlib.contextmanager
    def raises(self, http: int, grpc: str, *words: str) -> Iterator[None]:
        """The block fails with HTTP status `http` or gRPC code `grpc`, and a message naming
        each of `words` (case-insensitive)."""
        with pytest.raises(InferenceServerException) as info:
            yield
        exc = info.value
        want = str(http) if self.protocol == "http" else f"StatusCode.{grpc}"
        assert exc.status() == want, f"want {want}, got {exc.status()}: {exc.message()}"
        for word in words:
            assert word.lower() in exc.message().lower(), f"{word!r} not in {exc.message()!r}"

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def make_api() -> Iterator[Callable[[str, Server], Api]]:
    """A factory of `Api`s for any server, each closed when the test ends."""
    made: list[Api] = []

    def make(protocol: str, server: Server) -> Api:
        made.append(Api(protocol, server))
        return made[-1]

    yield make
    for item in made:
        item.close()


@pytest.fixture(params=["http", "grpc"])
def api(request: pytest.FixtureRequest, server: Server, make_api: Callable[..., Api]) -> Api:
    return make_api(request.param, server)


@pytest.fixture
def http_api(server: Server, make_api: Callable[..., Api]) -> Api:
    return make_api("http", server)


@pytest.fixture
def grpc_api(server: Server, make_api: Callable[..., Api]) -> Api:
    return make_api("grpc", server)
