"""The `local` backend: replicas are `ember serve` processes this activator starts and stops.

A replica joins the rotation when its `/v2/health/ready` answers 200; on scale-down it leaves
the rotation first, finishes what it holds, then gets SIGTERM. One whose readiness turns to
anything else while it serves (someone else sent it SIGTERM: it drains, then exits) leaves the
rotation at once and is replaced; one that dies unasked is taken out at once and replaced. A
model that cannot start fails its queued requests with the error from its log instead of
letting them wait out their deadline, and is retried with backoff.

With a run folder the operator chose (`--run-dir`), replicas outlive the activator: each one is
recorded in `<run dir>/replicas/<pid>.json`, and an activator started again on that folder
adopts the recorded replicas that still run and answer ready instead of starting new ones. With
the default temporary folder nothing would find the records, so replicas die with the
activator instead (PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson

from ember.activator.errors import UpstreamFailed
from ember.activator.service import Service
from ember.activator.throttler import Replica

log = logging.getLogger("ember.activator")


@dataclass(frozen=True, slots=True)
class LocalOptions:
    repository: Path
    run_dir: Path
    serve_args: tuple[str, ...] = ()
    replica_cpus: tuple[int, ...] = ()  # () = the activator's own
    probe_interval_s: float = 0.2
    probe_timeout_s: float = 1.0
    # A replica not ready this long after it was started is killed and started again.
    start_timeout_s: float = 600.0
    # How long a replica leaving the rotation may take to finish its requests.
    drain_s: float = 30.0
    # After SIGTERM, how long before SIGKILL.
    stop_grace_s: float = 35.0
    # Replicas outlive the activator and are recorded in run_dir for the next one to adopt.
    adopt: bool = False
    # How often a replica in rotation is asked whether it is still ready.
    health_interval_s: float = 1.0


class RunDirInUse(Exception):
    pass


# -- records of running replicas, for the next activator --------------------------------------


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    model: str
    pid: int
    http_port: int
    grpc_port: int
    # When the process started, in clock ticks since boot: with the pid it names one process,
    # since a pid reused by another process comes with another start time.
    started: int
    log: str
    gpu: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def parse(cls, data: bytes) -> ReplicaRecord | None:
        """The record in `data`; None when it is not one (truncated, edited, another version)."""
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict):
            return None
        kinds = {"model": str, "pid": int, "http_port": int, "grpc_port": int, "started": int,
                 "log": str}  # fmt: skip
        # `type(...) is`, not isinstance: JSON true is not a port.
        if any(type(doc.get(name)) is not kind for name, kind in kinds.items()):
            return None
        gpu = doc.get("gpu")
        if gpu is not None and not isinstance(gpu, str):
            return None
        return cls(**{name: doc[name] for name in kinds}, gpu=gpu)


def write_record(folder: Path, record: ReplicaRecord) -> Path:
    """`folder/<pid>.json`, whole or not at all: an activator killed mid-write leaves a
    temporary file, never half a record."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record.pid}.json"
    temp = folder / f".{record.pid}.json.tmp"
    temp.write_bytes(record.to_json())
    os.replace(temp, path)
    return path


def read_records(folder: Path) -> list[ReplicaRecord]:
    """Every record in `folder`; unreadable ones and leftover temporary files are removed."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = ReplicaRecord.parse(path.read_bytes())
        except OSError:
            record = None
        if record is None or path.stem != str(record.pid):
            log.warning("unreadable replica record removed", extra={"path": str(path)})
            path.unlink(missing_ok=True)
            continue
        found.append(record)
    for temp in folder.glob(".*.tmp"):
        temp.unlink(missing_ok=True)
    return found


def start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot; None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # Field 2, the command name, may hold spaces and ')': count from after the last ')'.
    # The start time is field 22, the 20th after it.
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def command_line(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]]


class _Adopted:
    """A replica an earlier activator started: not this process's child, so its exit is seen
    through a pidfd (readable once it has exited) and signals go through the same fd, which
    never reaches a process that reused the pid. Its exit status went to its parent: `wait`
    returns None."""

    returncode = None

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self._fd = fd
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, self._on_exit)

    @classmethod
    def open(cls, record: ReplicaRecord) -> _Adopted | None:
        """The recorded process if it still runs; None when it has exited or its pid now
        belongs to another process."""
        try:
            fd = os.pidfd_open(record.pid)
        except OSError:
            return None
        # Checked once the fd is open: from then on the fd names this process, pid reuse or not.
        if start_ticks(record.pid) != record.started:
            os.close(fd)
            return None
        return cls(record.pid, fd)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)
        self._exited.set_result(None)

    def _signal(self, sig: signal.Signals) -> None:
        if self._exited.done():
            raise ProcessLookupError(self.pid)
        signal.pidfd_send_signal(self._fd, sig)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    async def wait(self) -> None:
        await asyncio.shield(self._exited)


# -- one replica process --------------------------------------------------------------------


class _Process:
    __slots__ = ("gpu", "grpc_port", "http_port", "log_path", "model", "proc", "record",
                 "replica", "state")  # fmt: skip

    def __init__(self, model: str, log_path: Path, gpu: str | None) -> None:
        self.model = model
        self.log_path = log_path
        self.gpu = gpu
        self.http_port = 0
        self.grpc_port = 0
        self.proc: asyncio.subprocess.Process | _Adopted | None = None
        self.record: Path | None = None
        self.replica: Replica | None = None
        # starting -> ready -> (leaving: stopped by someone else) -> stopping -> gone
        self.state = "starting"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def visible_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """GPU ids replicas may be given, one each: CUDA_VISIBLE_DEVICES when set, else the
    driver's list; none on a machine without NVIDIA's driver."""
    env = os.environ if env is None else env
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    gpus = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(gpus.iterdir())))] if gpus.is_dir() else []


def _in_child(cpus: tuple[int, ...], die_with_parent: bool) -> Callable[[], None]:
    def setup() -> None:
        if die_with_parent:
            # A replica nobody will adopt must not outlive an activator killed with SIGKILL
            # (Linux only).
            with contextlib.suppress(Exception):
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PDEATHSIG
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def last_error(log_path: Path) -> str:
    """The most telling line of a replica's log: its last error, else its last line ("" for
    an empty log)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()[-50:]
    except OSError:
        return "(no log)"
    chosen = ""
    for line in lines:
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            if line.strip():
                chosen = line.strip()
            continue
        if isinstance(doc, dict) and doc.get("level") in ("error", "critical"):
            extra = doc.get("error")
            chosen = f"{doc.get('message')}: {extra}" if extra else str(doc.get("message"))
    return chosen[:500]


def failure_reason(log_path: Path, exit_code: int | None) -> str:
    """Why a replica did not start: its log's telling line, or, when it left none (killed by
    a signal, a crash in the interpreter), how it exited."""
    if reason := last_error(log_path):
        return reason
    if exit_code is None:
        return "(empty log)"
    how = f"signal {-exit_code}" if exit_code < 0 else f"status {exit_code}"
    return f"exited with {how} before writing its log"


class LocalBackend:
    def __init__(
        self,
        options: LocalOptions,
        services: Mapping[str, Service],
        *,
        clock: Callable[[], float],
        on_ready: Callable[[str, float], None] = lambda model, seconds: None,
        gpus: list[str] | None = None,
    ) -> None:
        self.options = options
        self.services = services
        self.clock = clock
        self.on_ready = on_ready
        self.gpus = visible_gpus() if gpus is None else gpus
        self._procs: dict[str, list[_Process]] = {name: [] for name in services}
        self._failures: dict[str, int] = dict.fromkeys(services, 0)
        self._retry_at: dict[str, float] = dict.fromkeys(services, 0.0)
        # model -> (replicas adopted, kept until): the scaler has no record of the traffic
        # they served before the restart, and would otherwise stop them as idle at once.
        self._adopted: dict[str, tuple[int, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._count = 0
        self._closing = False
        self._records = options.run_dir / "replicas"
        self._lock = -1
        options.run_dir.mkdir(parents=True, exist_ok=True)

    # -- Backend -------------------------------------------------------------------------------

    def starting(self, model: str) -> int:
        return sum(1 for p in self._procs[model] if p.state == "starting")

    def scale(self, service: Service, desired: int) -> None:
        if self._closing:
            return
        adopted, until = self._adopted.get(service.name, (0, 0.0))
        if adopted and self.clock() < until:
            desired = max(desired, adopted)
        procs = self._procs[service.name]
        alive = [p for p in procs if p.state in ("starting", "ready")]
        if desired > len(alive) and self.clock() >= self._retry_at[service.name]:
            for _ in range(desired - len(alive)):
                self._spawn(self._start(service))
        elif desired < len(alive):
            # Replicas still loading go first (they hold no requests), then the least busy.
            def order(p: _Process) -> tuple[int, int]:
                held = p.replica.in_flight if p.replica is not None else 0
                return (0 if p.state == "starting" else 1, held)

            for proc in sorted(alive, key=order)[: len(alive) - desired]:
                self._spawn(self._stop(service, proc))

    def replicas(self, model: str) -> list[dict[str, object]]:
        return [
            {
                "state": p.state,
                "http_port": p.http_port,
                "grpc_port": p.grpc_port,
                "pid": p.proc.pid if p.proc is not None else None,
                "in_flight": p.replica.in_flight if p.replica is not None else 0,
                "gpu": p.gpu,
                "log": str(p.log_path),
            }
            for p in self._procs[model]
            if p.state != "gone"
        ]

    async def adopt(self) -> None:
        """Take over the replicas an earlier activator on this run folder left running: those
        that answer ready join the rotation as if started here, the others are stopped. Runs
        before the autoscaler's first step, which would otherwise start duplicates. Raises
        RunDirInUse while another activator runs on the folder: the two would stop each
        other's replicas."""
        if not self.options.adopt or sys.platform != "linux":
            return
        self._lock = os.open(self.options.run_dir / "activator.lock", os.O_RDWR | os.O_CREAT)
        try:
            # Held until this process exits, however it exits.
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirInUse(
                f"run folder {self.options.run_dir} is in use by another activator"
            ) from None
        await asyncio.gather(*(self._adopt(r) for r in read_records(self._records)))

    async def close(self) -> None:
        """Stop every replica: out of rotation, drained, SIGTERM; in parallel."""
        self._closing = True
        stops = [
            self._stop(self.services[model], p)
            for model, procs in self._procs.items()
            for p in procs
            if p.state in ("starting", "ready", "leaving")
        ]
        await asyncio.gather(*stops, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    # -- one replica ---------------------------------------------------------------------------

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pick_gpu(self) -> str | None:
        if not self.gpus:
            return None
        used = [p.gpu for procs in self._procs.values() for p in procs if p.state != "gone"]
        return min(self.gpus, key=used.count)

    def _log_path(self, model: str) -> Path:
        # A run folder may be reused: never share a log with a replica of an earlier run.
        while True:
            self._count += 1
            path = self.options.run_dir / f"{model}-{self._count}.log"
            if not path.exists():
                return path

    async def _start(self, service: Service) -> None:
        model = service.name
        proc = _Process(model, self._log_path(model), self._pick_gpu())
        self._procs[model].append(proc)
        started = self.clock()
        try:
            ready = await self._launch(proc)
        except Exception as exc:  # the process could not even be created
            log.error("replica failed to launch", extra={"model": model, "error": str(exc)})
            ready = False
        if proc.state != "starting":
            await self._terminate(proc)  # scaled down while it loaded
            return
        if not ready:
            self._failed_start(service, proc)
            return
        self._failures[model] = 0
        self._join(service, proc)
        seconds = self.clock() - started
        self.on_ready(model, seconds)
        log.info(
            "replica ready",
            extra={"model": model, "port": proc.http_port, "seconds": round(seconds, 3)},
        )
        await self._watch(service, proc)

    def _join(self, service: Service, proc: _Process) -> None:
        proc.replica = Replica(f"127.0.0.1:{proc.http_port}", f"127.0.0.1:{proc.grpc_port}")
        proc.state = "ready"
        service.throttler.add(proc.replica)

    async def _watch(self, service: Service, proc: _Process) -> None:
        """Until the replica exits: out of rotation when it stops answering ready, and
        replaced when it exits unasked."""
        assert proc.proc is not None and proc.replica is not None
        exited = asyncio.ensure_future(proc.proc.wait())
        try:
            while not exited.done():
                await asyncio.wait([exited], timeout=self.options.health_interval_s)
                if exited.done() or proc.state != "ready":
                    continue
                # Asked again after the probe: a scale-down may have begun while it ran.
                if await self._ready(proc) is not False or proc.state != "ready":
                    continue
                # Stopped by someone else: it finishes what it holds (its own drain), and gets
                # nothing new.
                service.throttler.take_out(proc.replica.address)
                proc.state = "leaving"
                log.warning(
                    "replica no longer ready: out of rotation",
                    extra={"model": proc.model, "port": proc.http_port},
                )
                self.scale(service, service.desired)
        finally:
            exited.cancel()
        if proc.state in ("stopping", "gone"):
            return
        # It died unasked: out of rotation at once (its requests are retried elsewhere), and
        # replaced.
        service.throttler.take_out(proc.replica.address)
        proc.state = "gone"
        self._forget(proc)
        log.warning(
            "replica exited",
            extra={"model": proc.model, "exit_code": exited.result(), "log": str(proc.log_path)},
        )
        self.scale(service, service.desired)

    def _command(self, proc: _Process) -> list[str]:
        return [
            sys.executable, "-m", "ember.server.cli", "serve",
            "--model-repository", str(self.options.repository.absolute()),
            "--model", proc.model,
            "--host", "127.0.0.1",
            "--http_port", str(proc.http_port),
            "--grpc_port", str(proc.grpc_port),
            "--log-format", "json",
            *self.options.serve_args,
        ]  # fmt: skip

    async def _launch(self, proc: _Process) -> bool:
        """Start the process and probe it until ready: False if it died or never got ready."""
        options = self.options
        proc.http_port, proc.grpc_port = _free_port(), _free_port()
        env = dict(os.environ)
        if proc.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = proc.gpu
        with proc.log_path.open("ab") as out:
            # cwd is the run folder so `-m` puts no source tree on the replica's sys.path.
            proc.proc = child = await asyncio.create_subprocess_exec(
                *self._command(proc),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=options.run_dir,
                env=env,
                preexec_fn=_in_child(options.replica_cpus, not options.adopt)
                if sys.platform == "linux"
                else None,
            )
        log.info(
            "replica starting",
            extra={"model": proc.model, "pid": child.pid, "port": proc.http_port},
        )
        if options.adopt:
            self._record(proc, child.pid)
        url = f"http://127.0.0.1:{proc.http_port}/v2/health/ready"
        deadline = self.clock() + options.start_timeout_s
        timeout = aiohttp.ClientTimeout(total=options.probe_timeout_s)
        exited = asyncio.ensure_future(child.wait())
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                while self.clock() < deadline and proc.state == "starting":
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with session.get(url) as answer:
                            if answer.status == 200:
                                return True
                    await asyncio.wait([exited], timeout=options.probe_interval_s)
                    if exited.done():
                        return False
        finally:
            exited.cancel()
        if proc.state == "starting":
            log.error("replica not ready in time", extra={"model": proc.model})
            await self._terminate(proc)
        return False

    async def _ready(self, proc: _Process) -> bool | None:
        """One readiness probe: None when it could not tell (a timeout: busy, not gone)."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.options.probe_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        url = f"http://127.0.0.1:{proc.http_port}/v2/health/ready"
        try:
            async with self._session.get(url) as answer:
                return answer.status == 200
        except aiohttp.ClientConnectorError:
            return False  # nothing listens there any more
        except (aiohttp.ClientError, TimeoutError):
            return None

    async def _ready_at_adoption(self, proc: _Process) -> bool:
        # A replica busy with requests may answer its probe late: stopping it for that would
        # turn a restart into a cold start.
        for _ in range(3):
            ready = await self._ready(proc)
            if ready is not None:
                return ready
        return False

    def _record(self, proc: _Process, pid: int) -> None:
        started = start_ticks(pid)
        if started is None:
            return  # already gone: its exit is seen next
        record = ReplicaRecord(
            proc.model, pid, proc.http_port, proc.grpc_port, started, str(proc.log_path), proc.gpu
        )
        try:
            proc.record = write_record(self._records, record)
        except OSError as exc:
            log.warning(
                "cannot record replica: a restarted activator will not adopt it",
                extra={"model": proc.model, "pid": pid, "error": str(exc)},
            )

    def _forget(self, proc: _Process) -> None:
        if proc.record is not None:
            proc.record.unlink(missing_ok=True)
            proc.record = None
        self._procs[proc.model] = [p for p in self._procs[proc.model] if p is not proc]

    async def _adopt(self, record: ReplicaRecord) -> None:
        path = self._records / f"{record.pid}.json"
        child = _Adopted.open(record)
        if child is None:
            path.unlink(missing_ok=True)  # it exited, and its pid may be another process's
            return
        proc = _Process(record.model, Path(record.log), record.gpu)
        proc.http_port, proc.grpc_port = record.http_port, record.grpc_port
        proc.proc, proc.record = child, path
        service = self.services.get(record.model)
        if service is None:
            why = "its model is not served here"
        elif command_line(record.pid) != self._command(proc):
            why = "it was started with other settings"
        elif not await self._ready_at_adoption(proc):
            why = "it is not ready"
        else:
            self._procs[record.model].append(proc)
            self._join(service, proc)
            adopted, _ = self._adopted.get(record.model, (0, 0.0))
            until = self.clock() + service.settings.stable_window_s
            self._adopted[record.model] = (adopted + 1, until)
            log.info(
                "replica adopted",
                extra={"model": record.model, "pid": record.pid, "port": record.http_port},
            )
            self._spawn(self._watch(service, proc))
            return
        log.warning(
            f"stopping a replica an earlier activator left: {why}",
            extra={"model": record.model, "pid": record.pid},
        )
        await self._terminate(proc)
        proc.record = None
        path.unlink(missing_ok=True)

    def _failed_start(self, service: Service, proc: _Process) -> None:
        model = service.name
        proc.state = "gone"
        self._forget(proc)
        failures = self._failures[model] = self._failures[model] + 1
        delay = min(30.0, 0.5 * 2 ** (failures - 1))
        self._retry_at[model] = self.clock() + delay
        code = proc.proc.returncode if proc.proc is not None else None
        reason = failure_reason(proc.log_path, code)
        log.error(
            "replica failed to start",
            extra={
                "model": model,
                "exit_code": code,
                "error": reason,
                "log": str(proc.log_path),
                "retry_in_s": delay,
            },
        )
        others = [p for p in self._procs[model] if p.state in ("starting", "ready")]
        if not others:
            service.throttler.fail_waiters(
                UpstreamFailed(f"model '{model}' failed to start: {reason} (log: {proc.log_path})")
            )

    async def _stop(self, service: Service, proc: _Process) -> None:
        if proc.state in ("stopping", "gone"):
            return
        proc.state = "stopping"
        if proc.replica is not None:
            replica = service.throttler.take_out(proc.replica.address) or proc.replica
            try:
                await asyncio.wait_for(replica.wait_idle(), self.options.drain_s)
            except TimeoutError:
                log.warning(
                    "replica drain timed out",
                    extra={"model": proc.model, "in_flight": replica.in_flight},
                )
        await self._terminate(proc)
        proc.state = "gone"
        self._forget(proc)
        log.info("replica stopped", extra={"model": proc.model, "port": proc.http_port})

    async def _terminate(self, proc: _Process) -> None:
        child = proc.proc
        if child is None or child.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.terminate()
        # One still loading holds no request: it need not finish its load before it goes.
        grace = self.options.stop_grace_s if proc.replica is not None else 2.0
        try:
            await asyncio.wait_for(child.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
