"""`ember serve`: start the HTTP server, load models behind it, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import uvicorn

from ember.server import collector, logs
from ember.server.coldstart import ColdStart, ProcessPhases
from ember.server.config import ModelConfig, discover, load_model_config
from ember.server.dataplane import DataPlane
from ember.server.errors import ConfigError
from ember.server.metrics import PredictorMetrics
from ember.server.prefetch import Prefetch
from ember.server.repository import ModelRepository
from ember.server.rest.app import build_app
from ember.server.rest.header_limits import HeadLimits
from ember.server.rest.protocol import InferProtocol
from ember.server.rpc.server import build_server
from ember.server.settings import ServeSettings
from ember.server.storage import fetch
from ember.server.storage.errors import StorageError

log = logging.getLogger("ember.server")


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: `serve()` below owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def resolve_models(
    settings: ServeSettings, downloads: list[float] | None = None
) -> list[tuple[ModelConfig, Path]]:
    """The models to serve, validated; raises ConfigError with one line. Seconds spent
    fetching a remote model folder are appended to `downloads`."""
    if settings.model_dir is not None:
        uri = settings.model_dir
        if fetch.is_remote(uri):
            # KServe's STORAGE_URI with no storage initializer in front: fetch it ourselves.
            fetching = time.monotonic()
            try:
                model_dir = fetch.fetch_folder(uri)
            except StorageError as exc:
                raise ConfigError(str(exc)) from None
            if downloads is not None:
                downloads.append(time.monotonic() - fetching)
        elif "://" in uri and not uri.startswith("file://"):
            raise ConfigError(f"model location '{uri}': unsupported scheme")
        else:
            model_dir = Path(uri.removeprefix("file://"))
        if (
            not (model_dir / "model.toml").is_file()
            and model_dir.is_dir()
            and any((child / "model.toml").is_file() for child in model_dir.iterdir())
        ):
            # A whole repository mounted where one model was expected (`docker run -v
            # $PWD/models:/mnt/models`): serve it as one, as --model-repository would.
            only = [settings.model_name] if settings.model_name else list(settings.models)
            models = discover(model_dir, only or None)
        else:
            models = [(load_model_config(model_dir, settings.model_name), model_dir)]
    else:
        models = discover(settings.model_repository, list(settings.models) or None)
    if settings.no_batching:
        models = [(c.model_copy(update={"batching": None}), d) for c, d in models]
    if settings.no_pipeline:
        models = [(c.model_copy(update={"pipeline": None}), d) for c, d in models]
    return models


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def serve(
    settings: ServeSettings,
    models: list[tuple[ModelConfig, Path]],
    sock: socket.socket,
    process: ProcessPhases | None = None,
    prefetch: Prefetch | None = None,
) -> int:
    metrics = PredictorMetrics()
    remote = None
    if settings.predictor is not None:
        from ember.transformers.remote import RemotePredictor

        remote = RemotePredictor(settings.predictor)
    repository = ModelRepository(
        models, metrics, instance_nice=settings.instance_nice, remote=remote, prefetch=prefetch
    )
    dataplane = DataPlane(repository, metrics)
    app = build_app(dataplane, max_body_bytes=settings.max_body_bytes)
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="off",
        timeout_graceful_shutdown=int(settings.drain_seconds) + 1,
        http=functools.partial(
            InferProtocol, front=app,
            limits=HeadLimits(settings.max_headers, settings.max_header_bytes),
        ),  # type: ignore[arg-type]
    )  # fmt: skip
    server = _Server(config)
    grpc_server = None
    if settings.enable_grpc:
        try:
            grpc_server, grpc_port = build_server(
                dataplane, f"{settings.host}:{settings.grpc_port}",
                max_send_bytes=settings.grpc_max_send_bytes,
                max_receive_bytes=settings.grpc_max_receive_bytes,
                share_port=settings.workers > 1,
            )  # fmt: skip
        except (OSError, RuntimeError) as exc:
            log.error(f"cannot listen for gRPC on {settings.host}:{settings.grpc_port}: {exc}")
            return 2
        await grpc_server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            server.force_exit = True  # a second signal: stop waiting
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    serving = asyncio.create_task(server.serve(sockets=[sock]))
    exit_code = 0
    try:
        # The port answers (live, not ready) while models load, so probes can tell the two apart.
        for handle in repository.handles():
            if stop.is_set():
                break
            try:
                await repository.load(handle.name)
            except Exception as exc:
                log.error("model failed to load", extra={"model": handle.name, "error": str(exc)})
                exit_code = 1
                stop.set()
                continue
            if process is not None:
                report_cold_start(
                    ColdStart.of(handle.name, process, handle.phases, time.monotonic()), metrics
                )
        if exit_code == 0 and not stop.is_set():
            collector.quiet()
            log.info(
                "ready",
                extra={
                    "models": repository.names(),
                    "http_port": sock.getsockname()[1],
                    "grpc_port": grpc_port if grpc_server is not None else None,
                },
            )
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait([serving, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()

        # Graceful shutdown:
        # 1. report not ready at once, so load balancers stop sending new requests;
        dataplane.draining = True
        log.info("draining", extra={"inflight": dataplane.inflight})
        # 2. let in-flight inference finish, bounded by --drain-seconds;
        deadline = loop.time() + settings.drain_seconds
        while dataplane.inflight and loop.time() < deadline and not server.force_exit:
            await asyncio.sleep(0.02)
        # uvicorn's own wait for open connections gets only what is left of the drain budget.
        config.timeout_graceful_shutdown = max(0.5, deadline - loop.time())  # type: ignore[assignment]
        # 3. stop both servers (uvicorn closes idle keep-alive connections; gRPC cancels what is
        #    left after a short grace), then the models.
        server.should_exit = True
        if grpc_server is not None:
            await grpc_server.stop(grace=1.0)
        await serving
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await repository.close()
    abandoned = repository.running()
    log.info("stopped", extra={"exit_code": exit_code, "abandoned": abandoned})
    if abandoned:
        # A forward that outlived the drain budget cannot be interrupted, and Python would
        # join its thread at exit: leave now, as the budget promised.
        logging.shutdown()
        os._exit(exit_code)
    return exit_code


def report_cold_start(cold: ColdStart, metrics: PredictorMetrics) -> None:
    log.info("cold start", extra={"model": cold.model, **cold.fields()})
    for phase, seconds in cold.seconds.items():
        metrics.cold_start.labels(cold.model, phase).set(seconds)


def _run_one(
    settings: ServeSettings,
    models: list[tuple[ModelConfig, Path]],
    sock: socket.socket,
    process: ProcessPhases | None = None,
    prefetch: Prefetch | None = None,
) -> int:
    loop_factory = uvicorn.Config(app=None, log_config=None).get_loop_factory()  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(settings, models, sock, process, prefetch))


def _worker(
    settings: ServeSettings,
    models: list[tuple[ModelConfig, Path]],
    sock: socket.socket,
    process: ProcessPhases | None,
) -> None:
    logs.configure(settings.log_level, settings.log_json)
    _set_torch_threads(settings)
    sys.exit(_run_one(settings, models, sock, process))


def _run_workers(
    settings: ServeSettings,
    models: list[tuple[ModelConfig, Path]],
    sock: socket.socket,
    process: ProcessPhases,
) -> int:
    """Several processes accept on one inherited socket; SIGTERM is passed on to each."""
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(settings, models, sock, process))
        for _ in range(settings.workers)
    ]
    for w in workers:
        w.start()

    def forward(sig: int, _: object) -> None:
        for w in workers:
            if w.pid is not None and w.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = []
    for w in workers:
        w.join()
        codes.append(w.exitcode or 0)
    return max(codes)


def _set_torch_threads(settings: ServeSettings) -> None:
    # torch sizes its pool by the machine's cores, not by the CPUs this process may use: under
    # `taskset -c 0` or a CPU-limited container its threads would fight over one core.
    threads = settings.torch_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, threads))


def run(
    settings: ServeSettings, started: float | None = None, prefetch: Prefetch | None = None
) -> int:
    """Serve until signalled. `started` is when the process began (monotonic; default now),
    for the cold-start report; `prefetch`: the downloads the CLI started before importing
    torch (their handoffs go to the loader; worker processes load from the cache instead)."""
    imported = time.monotonic()
    logs.configure(settings.log_level, settings.log_json)
    _set_torch_threads(settings)
    downloads: list[float] = []
    try:
        models = resolve_models(settings, downloads)
        configured = time.monotonic()
        sock = bind(settings.host, settings.http_port)
    except ConfigError as exc:
        log.error(str(exc))
        return 2
    except OSError as exc:
        log.error(f"cannot listen on {settings.host}:{settings.http_port}: {exc.strerror}")
        return 2
    process = ProcessPhases(
        started=imported if started is None else started,
        imported=imported,
        config_seconds=configured - imported - sum(downloads),
        download_seconds=sum(downloads),
    )
    if settings.workers > 1:
        return _run_workers(settings, models, sock, process)
    return _run_one(settings, models, sock, process, prefetch)
