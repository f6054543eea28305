"""`ember activator`: the whole process assembled in one place, outermost first, and its
shutdown as a short sequence of steps."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import uvicorn

from ember.activator.app import ActivatorApp
from ember.activator.autoscaler import Autoscaler, Backend
from ember.activator.dns import DnsBackend
from ember.activator.errors import ShuttingDown
from ember.activator.grpc_proxy import GrpcProxy
from ember.activator.keda import start_keda_server
from ember.activator.local import LocalBackend, LocalOptions, RunDirInUse
from ember.activator.metrics import ActivatorMetrics
from ember.activator.protocol import ProxyProtocol
from ember.activator.proxy import HttpPool
from ember.activator.scaling import ScalingSettings
from ember.activator.service import Service
from ember.activator.settings import ActivatorSettings
from ember.activator.upstream import ReplicaClient
from ember.server import logs
from ember.server.config import discover
from ember.server.errors import ConfigError
from ember.server.rest.header_limits import HeadLimits

log = logging.getLogger("ember.activator")


def resolve_scaling(settings: ActivatorSettings) -> dict[str, ScalingSettings]:
    """Every model in the repository with its `[scaling]` over the activator's flags."""
    resolved = {}
    for config, model_dir in discover(settings.model_repository, list(settings.models) or None):
        try:
            resolved[config.name] = settings.scaling.with_model(config.scaling)
        except ValueError as exc:
            raise ConfigError(f"{model_dir / 'model.toml'}: scaling: {exc}") from None
    return resolved


class _KedaView:
    """What KEDA's external scaler reads: the KPA's decision and the demand behind it."""

    def __init__(self, services: dict[str, Service], autoscaler: Autoscaler) -> None:
        self._services = services
        self._autoscaler = autoscaler

    def has_model(self, model: str) -> bool:
        return model in self._services

    def is_active(self, model: str) -> bool:
        return self._services[model].desired > 0

    def concurrency(self, model: str) -> float:
        return self._services[model].demand()

    def target(self, model: str) -> float:
        return self._services[model].settings.target

    async def wait_change(self, timeout: float) -> None:
        await self._autoscaler.wait_change(timeout)


def _status(
    services: dict[str, Service], backend: LocalBackend | DnsBackend, settings: ActivatorSettings
) -> dict[str, Any]:
    models = {}
    for name, service in services.items():
        decision = service.decision
        models[name] = {
            "desired": service.desired,
            "ready": service.throttler.ready,
            "starting": backend.starting(name),
            "queued": service.throttler.queued,
            "in_flight": service.throttler.in_flight,
            "container_concurrency": service.settings.container_concurrency,
            "target": service.settings.target,
            "concurrency": service.window.current,
            "stable_avg": decision.stable_avg if decision else 0.0,
            "panic_avg": decision.panic_avg if decision else 0.0,
            "panic": bool(decision and decision.panic),
            "reason": decision.reason if decision else None,
            "replicas": backend.replicas(name),
        }
    return {"backend": settings.backend, "models": models}


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def run(settings: ActivatorSettings) -> int:
    logs.configure(settings.log_level, settings.log_json)
    try:
        scaling = resolve_scaling(settings)
        sock = _listen(settings.host, settings.http_port)
    except ConfigError as exc:
        log.error(str(exc))
        return 2
    except OSError as exc:
        log.error(f"cannot listen on {settings.host}:{settings.http_port}: {exc}")
        return 2
    loop_factory = uvicorn.Config(app=None, log_config=None).get_loop_factory()  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(settings, scaling, sock))


SWEEP_S = 10.0


async def _sweep(
    services: Mapping[str, Service], client: ReplicaClient, grpc_proxy: GrpcProxy
) -> None:
    """Drop connections and channels to replicas that have left every rotation."""
    while True:
        await asyncio.sleep(SWEEP_S)
        replicas = [r for s in services.values() for r in s.throttler.replicas()]
        client.prune({r.address for r in replicas})
        await grpc_proxy.prune({r.grpc_address or r.address for r in replicas})


async def serve(
    settings: ActivatorSettings, scaling: dict[str, ScalingSettings], sock: socket.socket
) -> int:
    loop = asyncio.get_running_loop()
    # One clock for every deadline and window: the loop's, which asyncio's timeouts use.
    clock = loop.time
    services = {name: Service(name, chosen, clock()) for name, chosen in scaling.items()}
    metrics: ActivatorMetrics
    backend: LocalBackend | DnsBackend
    if settings.backend == "local":
        run_dir = settings.run_dir or Path(tempfile.mkdtemp(prefix="ember-activator-"))
        backend = LocalBackend(
            LocalOptions(
                repository=settings.model_repository,
                run_dir=run_dir,
                serve_args=settings.serve_args,
                replica_cpus=settings.replica_cpus,
                probe_interval_s=settings.probe_interval_s,
                probe_timeout_s=settings.probe_timeout_s,
                start_timeout_s=settings.start_timeout_s,
                drain_s=settings.drain_seconds,
                # A folder the operator named outlives this process: a restarted activator
                # finds its replicas' records there.
                adopt=settings.run_dir is not None,
            ),
            services,
            clock=clock,
            on_ready=lambda model, seconds: metrics.replica_ready(model, seconds),
        )
    else:
        backend = DnsBackend(
            services,
            host_template=settings.replica_host,
            http_port=settings.replica_http_port,
            grpc_port=settings.replica_grpc_port,
            interval_s=settings.discovery_interval_s,
            probe_timeout_s=settings.probe_timeout_s,
        )
    if isinstance(backend, LocalBackend):
        try:
            await backend.adopt()
        except RunDirInUse as exc:
            log.error(str(exc))
            return 2
    metrics = ActivatorMetrics(services, backend.starting)
    scaling_backend: Backend = backend
    autoscaler = Autoscaler(services, scaling_backend, tick_s=settings.tick_s, clock=clock)
    pool = HttpPool()
    app = ActivatorApp(services, pool, metrics, lambda: _status(services, backend, settings), clock)
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="off",
        http=functools.partial(
            ProxyProtocol, front=app,
            limits=HeadLimits(settings.max_headers, settings.max_header_bytes),
        ),  # type: ignore[arg-type]
        timeout_graceful_shutdown=int(settings.drain_seconds) + 1,
    )  # fmt: skip
    server = _Server(config)

    grpc_server: grpc.aio.Server | None = None
    grpc_proxy = GrpcProxy(
        services, metrics, clock, lambda: app.draining,
        max_message_bytes=max(settings.grpc_max_send_bytes, settings.grpc_max_receive_bytes),
    )  # fmt: skip
    keda_server: grpc.aio.Server | None = None
    try:
        if settings.enable_grpc:
            grpc_server = grpc.aio.server(options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_send_message_length", settings.grpc_max_send_bytes),
                ("grpc.max_receive_message_length", settings.grpc_max_receive_bytes),
            ])  # fmt: skip
            grpc_server.add_generic_rpc_handlers((grpc_proxy,))
            if not grpc_server.add_insecure_port(f"{settings.host}:{settings.grpc_port}"):
                raise OSError(f"cannot listen for gRPC on {settings.host}:{settings.grpc_port}")
            await grpc_server.start()
        if settings.backend == "keda":
            keda_server, _ = await start_keda_server(
                _KedaView(services, autoscaler), f"{settings.host}:{settings.keda_port}"
            )
    except (OSError, RuntimeError) as exc:
        log.error(str(exc))
        return 2

    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            server.force_exit = True
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    tasks = [
        asyncio.create_task(autoscaler.run()),
        asyncio.create_task(_sweep(services, app.client, grpc_proxy)),
    ]
    if isinstance(backend, DnsBackend):
        tasks.append(asyncio.create_task(backend.run()))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    log.info(
        "activator ready",
        extra={
            "models": sorted(services),
            "backend": settings.backend,
            "http_port": sock.getsockname()[1],
            "grpc_port": settings.grpc_port if grpc_server is not None else None,
            "run_dir": str(backend.options.run_dir) if isinstance(backend, LocalBackend) else None,
        },
    )
    try:
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait([serving, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()

        # Graceful shutdown:
        # 1. refuse new requests (ready answers 503), keep scaling so queued ones get a replica;
        app.draining = True
        log.info("draining", extra={"queued": _held(services)})
        # 2. let queued and in-flight requests finish, bounded by --drain-seconds;
        deadline = loop.time() + settings.drain_seconds
        while _held(services) and loop.time() < deadline and not server.force_exit:
            await asyncio.sleep(0.05)
        for service in services.values():
            service.throttler.fail_waiters(ShuttingDown("the activator is shutting down"))
        # 3. stop the front doors;
        server.should_exit = True
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)
        if keda_server is not None:
            await keda_server.stop(grace=0.5)
        await serving
        # 4. stop scaling, then the replicas last.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if isinstance(backend, LocalBackend):
            await backend.close()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        with contextlib.suppress(Exception):
            await pool.close()
            await grpc_proxy.close()
    log.info("stopped")
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: `serve()` above owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _held(services: dict[str, Service]) -> int:
    return sum(s.window.current for s in services.values())
