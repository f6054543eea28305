"""`--serve`: run `ember serve` as a child on a free port for the length of the bench."""

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
import urllib.request
from collections.abc import Collection, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from ember.server.bench.cpus import format_cpu_list
from ember.server.bench.errors import BenchError

POLL_SECONDS = 0.05
STOP_SECONDS = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ember_executable() -> str:
    # The console script beside this interpreter first: the same install as this bench.
    found = shutil.which("ember", path=str(Path(sys.executable).parent)) or shutil.which("ember")
    if found is None:
        raise BenchError("--serve needs the `ember` console script on PATH (pip install -e .)")
    return found


def taskset_executable() -> str:
    found = shutil.which("taskset")
    if found is None:
        raise BenchError("--serve-cpus needs `taskset` (util-linux) on PATH")
    return found


class ServerProcess:
    """One `ember serve` (or `ember activator`) child: started by `start()`, stopped (SIGTERM,
    then SIGKILL) on exit."""

    def __init__(
        self,
        repository: Path,
        model: str,
        *,
        env: dict[str, str] | None = None,
        cpus: Collection[int] | None = None,
        extra_args: Sequence[str] = (),
        command: str = "serve",
    ) -> None:
        self.command = command
        self.repository = repository
        self.model = model
        self.env = env
        self.cpus = None if cpus is None else tuple(sorted(cpus))
        self.extra_args = tuple(extra_args)
        self.host = "127.0.0.1"
        self.port = 0
        self.grpc_port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def grpc_target(self) -> str:
        """Its gRPC port as grpc wants it (`host:port`, no scheme)."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        self.port = free_port(self.host)
        # Its gRPC door too gets a free port: the default 8081 may be taken (another server,
        # another bench). `--protocol grpc` loads it (`grpc_target`).
        self.grpc_port = free_port(self.host)
        # Kept open for the server's life (closed by stop()): its log, shown if it fails.
        self._log = tempfile.TemporaryFile(prefix="ember-bench-serve-")  # noqa: SIM115
        argv = [
            ember_executable(), self.command, "--model-repository", str(self.repository),
            "--model", self.model, "--host", self.host, "--http_port", str(self.port),
            "--grpc_port", str(self.grpc_port),
            # Warnings only: a log line per request would be measured as server time.
            "--log-level", "warning", "--drain-seconds", "5", *self.extra_args,
        ]  # fmt: skip
        if self.cpus is not None:
            # taskset, so `ps` shows the pinning as a person would have typed it; the server
            # sizes its torch pool by the CPUs it may use unless --torch-threads says.
            argv = [taskset_executable(), "-c", format_cpu_list(self.cpus), *argv]
        self._process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            # Its own session: a Ctrl-C meant for the bench reaches the server as our SIGTERM.
            start_new_session=True,
        )

    def log_tail(self, chars: int = 3000) -> str:
        if self._log is None or self._log.closed:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    def wait_ready(self, timeout: float) -> None:
        """Poll `/v2/health/ready` until 200; fail with the server's log if it dies first."""
        process = self._process
        if process is None:
            raise BenchError("the server was not started")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BenchError(
                    f"ember {self.command} exited with {process.returncode}:\n{self.log_tail()}"
                )
            # Refused while it starts, 503 while it loads: both are OSErrors here.
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(self.url + "/v2/health/ready", timeout=2) as answer,
            ):
                if answer.status == 200:
                    return
            time.sleep(POLL_SECONDS)
        raise BenchError(
            f"ember {self.command} not ready after {timeout:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> int | None:
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                # Its whole session: workers it may have spawned go with it.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(STOP_SECONDS)
        if self._log is not None:
            self._log.close()
        return process.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
