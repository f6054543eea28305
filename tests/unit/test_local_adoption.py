"""The local backend's replica records and their adoption by a restarted activator.

The replicas here are small HTTP servers that answer `/v2/health/ready` (503 while a flag file
exists), started by the test as an earlier activator would have started `ember serve`; the
backend under test expects their command line instead of `ember serve`'s.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ember.activator.local import (
    LocalBackend,
    LocalOptions,
    ReplicaRecord,
    RunDirInUse,
    command_line,
    read_records,
    start_ticks,
    write_record,
)
from ember.activator.scaling import ScalingSettings
from ember.activator.service import Service

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="pidfd and /proc are Linux's")

FAKE_REPLICA = r"""
import http.server, os, sys

port, flag = int(sys.argv[1]), sys.argv[2]


class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503 if os.path.exists(flag) else 200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", port), Ready).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fake_command(port: int, flag: Path) -> list[str]:
    return [sys.executable, "-c", FAKE_REPLICA, str(port), str(flag)]


class Backend(LocalBackend):
    """Expects the fake replicas' command line where the real one expects `ember serve`'s."""

    flag = Path("/nonexistent")

    def _command(self, proc: object) -> list[str]:
        return fake_command(proc.http_port, self.flag)  # type: ignore[attr-defined]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fakes() -> Iterator[Callable[[Path], tuple[subprocess.Popen[bytes], int]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(flag: Path) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        process = subprocess.Popen(fake_command(port, flag))
        started.append(process)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return process, port
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def record_of(process: subprocess.Popen[bytes], port: int, model: str = "m") -> ReplicaRecord:
    started = start_ticks(process.pid)
    assert started is not None
    return ReplicaRecord(model, process.pid, port, port + 1, started, "/dev/null")


def backend(tmp_path: Path, clock: Clock, *, adopt: bool = True) -> tuple[Backend, Service]:
    service = Service("m", ScalingSettings(stable_window_s=6.0), clock())
    options = LocalOptions(
        repository=tmp_path / "repo", run_dir=tmp_path / "run", adopt=adopt,
        health_interval_s=0.05,
    )  # fmt: skip
    chosen = Backend(options, {"m": service}, clock=clock, gpus=[])
    chosen.flag = tmp_path / "draining"
    return chosen, service


async def until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def records(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "run" / "replicas").glob("*"))


# -- records ------------------------------------------------------------------------------------


def test_records_round_trip_and_unreadable_ones_are_removed(tmp_path: Path) -> None:
    folder = tmp_path / "replicas"
    good = ReplicaRecord("m", 41, 8000, 8001, 123456, "/run/m-1.log", "0")
    other = ReplicaRecord("team.m-2", 42, 8002, 8003, 7, "/run/x.log")
    assert write_record(folder, good) == folder / "41.json"
    write_record(folder, other)
    (folder / "43.json").write_bytes(b'{"model": "m", "pid": 43')  # cut off mid-write
    (folder / "44.json").write_bytes(good.to_json())  # names another pid than it holds
    (folder / "45.json").write_bytes(
        b'{"model":"m","pid":45,"http_port":true,"grpc_port":1,"started":1,"log":"x"}'
    )
    (folder / "46.json").write_bytes(b"[1, 2]")
    (folder / ".47.json.tmp").write_bytes(b"{")
    assert read_records(folder) == [good, other]
    assert sorted(p.name for p in folder.iterdir()) == ["41.json", "42.json"]
    assert read_records(tmp_path / "absent") == []


def test_start_ticks_and_command_line_name_one_process(
    fakes: Callable[[Path], tuple[subprocess.Popen[bytes], int]], tmp_path: Path
) -> None:
    process, port = fakes(tmp_path / "flag")
    ticks = start_ticks(process.pid)
    assert ticks is not None and ticks == start_ticks(process.pid)
    assert ticks != start_ticks(os.getpid())  # started seconds later
    assert command_line(process.pid) == fake_command(port, tmp_path / "flag")
    process.kill()
    process.wait()
    assert start_ticks(process.pid) is None and command_line(process.pid) is None


# -- adoption -----------------------------------------------------------------------------------


async def test_a_ready_replica_is_adopted_kept_and_stopped_on_close(
    fakes: Callable[[Path], tuple[subprocess.Popen[bytes], int]], tmp_path: Path
) -> None:
    clock = Clock()
    chosen, service = backend(tmp_path, clock)
    process, port = fakes(chosen.flag)
    write_record(tmp_path / "run" / "replicas", record_of(process, port))
    await chosen.adopt()
    assert service.throttler.ready == 1
    [replica] = chosen.replicas("m")
    assert (replica["pid"], replica["state"], replica["http_port"]) == (process.pid, "ready", port)
    # The scaler knows nothing of its traffic yet: asking for 0 keeps it for a stable window,
    # asking for 1 starts nothing new.
    chosen.scale(service, 0)
    chosen.scale(service, 1)
    await asyncio.sleep(0.2)
    assert chosen.starting("m") == 0 and [r["pid"] for r in chosen.replicas("m")] == [process.pid]
    assert process.poll() is None
    # Graceful shutdown stops adopted replicas like its own, and forgets them.
    await chosen.close()
    assert process.wait(5) == -signal.SIGTERM
    assert records(tmp_path) == []


async def test_an_adopted_replica_that_dies_is_taken_out_and_forgotten(
    fakes: Callable[[Path], tuple[subprocess.Popen[bytes], int]], tmp_path: Path
) -> None:
    clock = Clock()
    chosen, service = backend(tmp_path, clock)
    process, port = fakes(chosen.flag)
    write_record(tmp_path / "run" / "replicas", record_of(process, port))
    await chosen.adopt()
    assert service.throttler.ready == 1
    clock.now += 7  # past the stable window: nothing asks for a replacement
    process.kill()
    await until(lambda: service.throttler.ready == 0, "out of rotation")
    await until(lambda: records(tmp_path) == [], "record removed")
    assert chosen.replicas("m") == [] and chosen.starting("m") == 0
    await chosen.close()


async def test_a_replica_no_longer_ready_leaves_the_rotation_before_it_exits(
    fakes: Callable[[Path], tuple[subprocess.Popen[bytes], int]], tmp_path: Path
) -> None:
    clock = Clock()
    chosen, service = backend(tmp_path, clock)
    process, port = fakes(chosen.flag)
    write_record(tmp_path / "run" / "replicas", record_of(process, port))
    await chosen.adopt()
    clock.now += 7
    chosen.flag.touch()  # what a replica told to stop answers while it drains
    await until(lambda: service.throttler.ready == 0, "out of rotation")
    assert [r["state"] for r in chosen.replicas("m")] == ["leaving"]
    assert process.poll() is None
    process.terminate()
    await until(lambda: chosen.replicas("m") == [], "gone once exited")
    assert records(tmp_path) == []
    await chosen.close()


async def test_stale_records_are_removed_and_signal_nobody(
    fakes: Callable[[Path], tuple[subprocess.Popen[bytes], int]], tmp_path: Path
) -> None:
    clock = Clock()
    chosen, service = backend(tmp_path, clock)
    folder = tmp_path / "run" / "replicas"
    gone, gone_port = fakes(chosen.flag)
    dead = record_of(gone, gone_port)
    gone.kill()
    gone.wait()
    write_record(folder, dead)
    # A live process whose start time is not the recorded one: the pid was reused.
    alive, port = fakes(chosen.flag)
    reused = record_of(alive, port)
    write_record(folder, ReplicaRecord("m", reused.pid, port, 0, reused.started - 1, "x"))
    await chosen.adopt()
    assert records(tmp_path) == [] and service.throttler.ready == 0
    assert chosen.replicas("m") == []
    await asyncio.sleep(0.1)
    assert alive.poll() is None
    await chosen.close()
    assert alive.poll() is None


@pytest.mark.parametrize("problem", ["not ready", "unknown model", "other settings"])
async def test_a_recorded_replica_that_cannot_serve_is_stopped(
    fakes: Callable[[Path], tuple[subprocess.Popen[bytes], int]], tmp_path: Path, problem: str
) -> None:
    clock = Clock()
    chosen, service = backend(tmp_path, clock)
    process, port = fakes(chosen.flag)
    record = record_of(process, port, "gone-model" if problem == "unknown model" else "m")
    if problem == "not ready":
        chosen.flag.touch()
    elif problem == "other settings":
        chosen.flag = tmp_path / "another-flag"  # another command line than the recorded one
    write_record(tmp_path / "run" / "replicas", record)
    await chosen.adopt()
    assert process.wait(5) == -signal.SIGTERM
    assert records(tmp_path) == [] and service.throttler.ready == 0
    assert chosen.replicas("m") == []
    await chosen.close()


async def test_without_an_operator_chosen_run_dir_nothing_is_adopted(
    fakes: Callable[[Path], tuple[subprocess.Popen[bytes], int]], tmp_path: Path
) -> None:
    clock = Clock()
    chosen, service = backend(tmp_path, clock, adopt=False)
    process, port = fakes(chosen.flag)
    write_record(tmp_path / "run" / "replicas", record_of(process, port))
    await chosen.adopt()
    assert service.throttler.ready == 0 and records(tmp_path) == [f"{process.pid}.json"]
    await chosen.close()
    assert process.poll() is None


async def test_two_activators_cannot_share_a_run_dir(tmp_path: Path) -> None:
    first, _ = backend(tmp_path, Clock())
    second, _ = backend(tmp_path, Clock())
    await first.adopt()
    with pytest.raises(RunDirInUse, match="in use by another activator"):
        await second.adopt()
    await first.close()
    await second.adopt()  # free once the first has gone
    await second.close()


def test_a_reused_run_dir_gets_new_log_names(tmp_path: Path) -> None:
    chosen, _ = backend(tmp_path, Clock())
    (tmp_path / "run" / "m-1.log").write_text("an earlier run's replica")
    (tmp_path / "run" / "m-2.log").write_text("")
    assert chosen._log_path("m") == tmp_path / "run" / "m-3.log"
    assert chosen._log_path("other") == tmp_path / "run" / "other-4.log"


def test_a_replica_that_left_no_log_is_described_by_how_it_exited(tmp_path: Path) -> None:
    from ember.activator.local import failure_reason

    log = tmp_path / "echo-1.log"
    log.write_text("")
    assert failure_reason(log, -9) == "exited with signal 9 before writing its log"
    assert failure_reason(log, 3) == "exited with status 3 before writing its log"
    assert failure_reason(log, None) == "(empty log)"
    log.write_text('{"level":"error","message":"cannot load","error":"bad weights"}\n')
    assert failure_reason(log, 2) == "cannot load: bad weights"
