"""`ember activator` settings: parsed once in main(). Every scaling setting is a flag whose
default is Knative's, and model.toml `[scaling]` overrides it per model."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ember.activator.scaling import ScalingSettings
from ember.server.settings import parse_flag


@dataclass(frozen=True, slots=True)
class ActivatorSettings:
    model_repository: Path = Path("models")
    models: tuple[str, ...] = ()
    host: str = "0.0.0.0"
    http_port: int = 8080
    grpc_port: int = 8081
    enable_grpc: bool = True
    # The same defaults as `ember serve`'s: a message its replicas take passes through here.
    grpc_max_send_bytes: int = 128 * 1024 * 1024
    grpc_max_receive_bytes: int = 128 * 1024 * 1024
    # A request's head (request line and headers): beyond either, 431 (as `ember serve`).
    max_headers: int = 100
    max_header_bytes: int = 64 * 1024
    backend: str = "local"  # local | keda
    keda_port: int = 9090
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    tick_s: float = 2.0
    probe_interval_s: float = 0.2
    probe_timeout_s: float = 1.0
    start_timeout_s: float = 600.0
    # On SIGTERM: how long queued and in-flight requests may take; also a replica's drain.
    drain_seconds: float = 30.0
    # Where local replicas write their logs and records; default a fresh folder under the
    # temp dir. Given explicitly, replicas outlive the activator and a restart adopts them.
    run_dir: Path | None = None
    # Extra arguments for each local replica's `ember serve`.
    serve_args: tuple[str, ...] = ()
    # CPUs each local replica may run on (sched_setaffinity); () = the activator's own.
    replica_cpus: tuple[int, ...] = ()
    # keda: replicas are the addresses of this DNS name (a headless Service); {model} is the
    # model's name.
    replica_host: str = "{model}-predictor"
    replica_http_port: int = 8080
    replica_grpc_port: int = 8081
    discovery_interval_s: float = 1.0
    log_level: str = "info"
    log_json: bool | None = None


def _scaling_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_activator_arguments(parser: argparse.ArgumentParser) -> None:
    d = ActivatorSettings()
    add = parser.add_argument
    add(
        "--model-repository",
        "--model_repository",
        dest="model_repository",
        type=Path,
        default=d.model_repository,
        help="folder of model folders, each with a model.toml (default ./models)",
    )
    add("--model", dest="models", action="append", default=[], metavar="NAME",
        help="serve only this model (repeatable)")  # fmt: skip
    add("--host", default=d.host)
    add("--http_port", "--http-port", dest="http_port", type=int, default=d.http_port)
    add("--grpc_port", "--grpc-port", dest="grpc_port", type=int, default=d.grpc_port)
    add("--enable_grpc", "--enable-grpc", dest="enable_grpc", default="true",
        type=parse_flag, help="forward V2 gRPC on --grpc_port (default true)")  # fmt: skip
    add("--backend", choices=["local", "keda"], default=d.backend,
        help="local: start and stop `ember serve` processes; keda: serve KEDA's external "
        "scaler and find replicas through DNS")  # fmt: skip
    add("--max-headers", dest="max_headers", type=int, default=d.max_headers,
        help="requests with more headers get 431 (default %(default)s)")  # fmt: skip
    add("--max-header-bytes", dest="max_header_bytes", type=int, default=d.max_header_bytes,
        help="bytes of request line and headers; more get 431 (default 64 KiB)")  # fmt: skip
    add("--grpc_max_send_message_length", dest="grpc_max_send_bytes", type=int,
        default=d.grpc_max_send_bytes, help="bytes (default 128 MiB)")  # fmt: skip
    add("--grpc_max_receive_message_length", dest="grpc_max_receive_bytes", type=int,
        default=d.grpc_max_receive_bytes, help="larger requests get RESOURCE_EXHAUSTED "
        "(default 128 MiB)")  # fmt: skip
    add("--keda-port", "--keda_port", dest="keda_port", type=int, default=d.keda_port)
    group = parser.add_argument_group(
        "scaling (Knative's defaults; model.toml [scaling] overrides them per model)"
    )
    for spec in dataclasses.fields(ScalingSettings):
        default = getattr(d.scaling, spec.name)
        kind = int if isinstance(default, int) else float
        group.add_argument(
            _scaling_flag(spec.name), dest=f"scaling_{spec.name}", type=kind, default=default,
            metavar="N", help=f"default {default if default is not None else 'auto'}",
        )  # fmt: skip
    add("--tick-seconds", dest="tick_s", type=float, default=d.tick_s,
        help="how often the scaler evaluates (default 2 s)")  # fmt: skip
    add("--probe-interval", dest="probe_interval_s", type=float, default=d.probe_interval_s,
        help="seconds between readiness probes of a starting replica (default 0.2)")  # fmt: skip
    add("--probe-timeout", dest="probe_timeout_s", type=float, default=d.probe_timeout_s)
    add("--start-timeout", dest="start_timeout_s", type=float, default=d.start_timeout_s,
        help="a replica not ready this long after start is replaced (default 600 s)")  # fmt: skip
    add("--drain-seconds", dest="drain_seconds", type=float, default=d.drain_seconds)
    add("--run-dir", dest="run_dir", type=Path, default=None,
        help="folder for local replicas' logs and records; replicas then outlive the "
        "activator, and one restarted on the same folder adopts them (default: a new "
        "temporary folder, replicas stop with the activator)")  # fmt: skip
    add("--serve-arg", dest="serve_args", action="append", default=[], metavar="ARG",
        help="an argument for each local replica's `ember serve` (repeatable)")  # fmt: skip
    add("--replica-cpus", dest="replica_cpus", type=_cpu_list, default=(), metavar="LIST",
        help="local: run replicas on these CPUs, e.g. 0 or 0-3,8")  # fmt: skip
    add("--replica-host", dest="replica_host", default=d.replica_host,
        help="keda: DNS name whose addresses are the replicas ({model} = model name)")  # fmt: skip
    add("--replica-http-port", dest="replica_http_port", type=int, default=d.replica_http_port)
    add("--replica-grpc-port", dest="replica_grpc_port", type=int, default=d.replica_grpc_port)
    add("--discovery-interval", dest="discovery_interval_s", type=float,
        default=d.discovery_interval_s)  # fmt: skip
    add("--log-level", "--log_level", dest="log_level", default=d.log_level,
        choices=["debug", "info", "warning", "error"])  # fmt: skip
    add("--log-format", dest="log_format", choices=["auto", "json", "text"], default="auto")


def _cpu_list(value: str) -> tuple[int, ...]:
    cpus: set[int] = set()
    try:
        for part in value.split(","):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CPUs like 0 or 0-3,8, got {value!r}") from None
    if not cpus or min(cpus) < 0:
        raise argparse.ArgumentTypeError(f"expected CPUs like 0 or 0-3,8, got {value!r}")
    return tuple(sorted(cpus))


def settings_from(args: argparse.Namespace) -> ActivatorSettings:
    """Raises ValueError for settings that cannot work together."""
    scaling = ScalingSettings(
        **{s.name: getattr(args, f"scaling_{s.name}") for s in dataclasses.fields(ScalingSettings)}
    )
    scaling.check()
    return ActivatorSettings(
        model_repository=args.model_repository,
        models=tuple(args.models),
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        enable_grpc=args.enable_grpc,
        grpc_max_send_bytes=args.grpc_max_send_bytes,
        grpc_max_receive_bytes=args.grpc_max_receive_bytes,
        max_headers=args.max_headers,
        max_header_bytes=args.max_header_bytes,
        backend=args.backend,
        keda_port=args.keda_port,
        scaling=scaling,
        tick_s=args.tick_s,
        probe_interval_s=args.probe_interval_s,
        probe_timeout_s=args.probe_timeout_s,
        start_timeout_s=args.start_timeout_s,
        drain_seconds=args.drain_seconds,
        run_dir=args.run_dir,
        serve_args=tuple(args.serve_args),
        replica_cpus=args.replica_cpus,
        replica_host=args.replica_host,
        replica_http_port=args.replica_http_port,
        replica_grpc_port=args.replica_grpc_port,
        discovery_interval_s=args.discovery_interval_s,
        log_level=args.log_level,
        log_json={"auto": None, "json": True, "text": False}[args.log_format],
    )
