"""The `local` backend: replicas are `ember serve` processes this activator starts and stops.

A replica joins the rotation when its `/v2/health/ready` answers 200; on scale-down it leaves
the rotation first, finishes what it holds, then gets SIGTERM; one that dies unasked is taken
out at once and replaced. A model that cannot start fails its queued requests with the error
from its log instead of letting them wait out their deadline, and is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
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


class _Process:
    __slots__ = ("gpu", "grpc_port", "http_port", "log_path", "model", "proc", "replica", "state")

    def __init__(self, model: str, log_path: Path, gpu: str | None) -> None:
        self.model = model
        self.log_path = log_path
        self.gpu = gpu
        self.http_port = 0
        self.grpc_port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.replica: Replica | None = None
        self.state = "starting"  # -> ready -> stopping -> gone


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


def _in_child(cpus: tuple[int, ...]) -> Callable[[], None]:
    def setup() -> None:
        # A replica must not outlive an activator killed with SIGKILL (Linux only).
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PDEATHSIG
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def last_error(log_path: Path) -> str:
    """The most telling line of a replica's log: its last error, else its last line."""
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
    return chosen[:500] or "(empty log)"


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
        self._tasks: set[asyncio.Task[None]] = set()
        self._count = 0
        self._closing = False
        options.run_dir.mkdir(parents=True, exist_ok=True)

    # -- Backend -------------------------------------------------------------------------------

    def starting(self, model: str) -> int:
        return sum(1 for p in self._procs[model] if p.state == "starting")

    def scale(self, service: Service, desired: int) -> None:
        if self._closing:
            return
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

    async def close(self) -> None:
        """Stop every replica: out of rotation, drained, SIGTERM; in parallel."""
        self._closing = True
        stops = [
            self._stop(self.services[model], p)
            for model, procs in self._procs.items()
            for p in procs
            if p.state in ("starting", "ready")
        ]
        await asyncio.gather(*stops, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

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

    async def _start(self, service: Service) -> None:
        model = service.name
        self._count += 1
        proc = _Process(
            model, self.options.run_dir / f"{model}-{self._count}.log", self._pick_gpu()
        )
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
        replica = Replica(f"127.0.0.1:{proc.http_port}", f"127.0.0.1:{proc.grpc_port}")
        proc.replica = replica
        proc.state = "ready"
        seconds = self.clock() - started
        self.on_ready(model, seconds)
        log.info(
            "replica ready",
            extra={"model": model, "port": proc.http_port, "seconds": round(seconds, 3)},
        )
        service.throttler.add(replica)
        assert proc.proc is not None
        code = await proc.proc.wait()
        if proc.state == "stopping":
            return
        # It died unasked: out of rotation at once (its requests are retried elsewhere), and
        # replaced.
        service.throttler.take_out(replica.address)
        proc.state = "gone"
        log.warning(
            "replica exited",
            extra={"model": model, "exit_code": code, "log": str(proc.log_path)},
        )
        self.scale(service, service.desired)

    async def _launch(self, proc: _Process) -> bool:
        """Start the process and probe it until ready: False if it died or never got ready."""
        options = self.options
        proc.http_port, proc.grpc_port = _free_port(), _free_port()
        env = dict(os.environ)
        if proc.gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = proc.gpu
        command = [
            sys.executable, "-m", "ember.server.cli", "serve",
            "--model-repository", str(options.repository.absolute()),
            "--model", proc.model,
            "--host", "127.0.0.1",
            "--http_port", str(proc.http_port),
            "--grpc_port", str(proc.grpc_port),
            "--log-format", "json",
            *options.serve_args,
        ]  # fmt: skip
        with proc.log_path.open("ab") as out:
            # cwd is the run folder so `-m` puts no source tree on the replica's sys.path.
            proc.proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                cwd=options.run_dir,
                env=env,
                preexec_fn=_in_child(options.replica_cpus) if sys.platform == "linux" else None,
            )
        log.info(
            "replica starting",
            extra={"model": proc.model, "pid": proc.proc.pid, "port": proc.http_port},
        )
        url = f"http://127.0.0.1:{proc.http_port}/v2/health/ready"
        deadline = self.clock() + options.start_timeout_s
        timeout = aiohttp.ClientTimeout(total=options.probe_timeout_s)
        exited = asyncio.ensure_future(proc.proc.wait())
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

    def _failed_start(self, service: Service, proc: _Process) -> None:
        model = service.name
        proc.state = "gone"
        failures = self._failures[model] = self._failures[model] + 1
        delay = min(30.0, 0.5 * 2 ** (failures - 1))
        self._retry_at[model] = self.clock() + delay
        reason = last_error(proc.log_path)
        code = proc.proc.returncode if proc.proc is not None else None
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
        self._procs[model] = [p for p in self._procs[model] if p.state != "gone"]

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
        self._procs[proc.model] = [p for p in self._procs[proc.model] if p is not proc]
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
