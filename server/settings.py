"""`ember serve` settings: parsed once in main(), from flags with KServe's names and env."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ember.transformers.settings import PredictorSettings


@dataclass(frozen=True, slots=True)
class ServeSettings:
    model_repository: Path = Path("models")
    models: tuple[str, ...] = ()
    # KServe's single-model form: a model folder (as the storage initializer leaves /mnt/models).
    model_dir: str | None = None  # a folder, file://, s3:// or https://
    model_name: str | None = None
    host: str = "0.0.0.0"
    http_port: int = 8080
    grpc_port: int = 8081
    workers: int = 1
    log_level: str = "info"
    log_json: bool | None = None
    max_body_bytes: int = 64 * 1024 * 1024
    # A request's head (request line and headers): beyond either, 431.
    max_headers: int = 100
    max_header_bytes: int = 64 * 1024
    drain_seconds: float = 30.0
    enable_grpc: bool = True
    # Serve every model without its [batching] section (one request per forward): an A/B switch.
    no_batching: bool = False
    # Serve every model without its [pipeline]: the chain runs in a separate `ember transformer`.
    no_pipeline: bool = False
    # `ember transformer`: run each model's pipeline here and send its tensors to this predictor.
    predictor: PredictorSettings | None = None
    # torch intra-op threads; None = the CPUs this process may run on (taskset, cgroups).
    torch_threads: int | None = None
    # Added to the nice value of each model instance's thread (Linux). Where the forward and
    # the event loop share CPUs, the loop then runs first when both can: health probes and
    # 429s answer in milliseconds under saturation, and batches fill while a forward waits.
    # The forward still gets a quarter of a contended CPU at 5; 0 leaves threads as they are.
    instance_nice: int = 5
    # Room for a 64 MiB tensor plus the message around it.
    grpc_max_send_bytes: int = 128 * 1024 * 1024
    grpc_max_receive_bytes: int = 128 * 1024 * 1024


def _nice(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number <= 19:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 19, got {value!r}")
    return number


def parse_flag(value: str) -> bool:
    """true/false, yes/no, on/off, 1/0, as KServe's boolean flags take them."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    # Defaults come from ServeSettings, so each is written once.
    d = ServeSettings()
    add = parser.add_argument
    add(
        "--model-repository",
        "--model_repository",
        dest="model_repository",
        type=Path,
        default=None,
        help="folder of model folders, each with a model.toml (default ./models)",
    )
    add(
        "--model",
        dest="models",
        action="append",
        default=[],
        metavar="NAME",
        help="serve only this model (repeatable)",
    )
    add(
        "--model_dir",
        "--model-dir",
        dest="model_dir",
        default=None,
        help="one model folder, as KServe's storage initializer leaves it (/mnt/models)",
    )
    add(
        "--model_name",
        "--model-name",
        dest="model_name",
        default=None,
        help="the name to serve the --model_dir model under",
    )
    add("--host", default=d.host)
    add(
        "--http_port",
        "--http-port",
        dest="http_port",
        type=int,
        default=None,
        help="HTTP port (default 8080, or $PORT)",
    )
    add("--grpc_port", "--grpc-port", dest="grpc_port", type=int, default=d.grpc_port)
    add("--workers", type=int, default=d.workers, help="server processes sharing the HTTP port")
    add(
        "--log-level",
        "--log_level",
        dest="log_level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="default info, or $KSERVE_LOGLEVEL",
    )
    add("--log-format", dest="log_format", choices=["auto", "json", "text"], default="auto")
    add(
        "--max-body-bytes",
        dest="max_body_bytes",
        type=int,
        default=d.max_body_bytes,
        help="larger request bodies get 413 (default 64 MiB)",
    )
    add(
        "--max-headers",
        dest="max_headers",
        type=int,
        default=d.max_headers,
        help="requests with more headers get 431 (default %(default)s)",
    )
    add(
        "--max-header-bytes",
        dest="max_header_bytes",
        type=int,
        default=d.max_header_bytes,
        help="bytes of request line and headers; more get 431 (default 64 KiB)",
    )
    add(
        "--drain-seconds",
        dest="drain_seconds",
        type=float,
        default=d.drain_seconds,
        help="on SIGTERM, how long in-flight requests may take to finish",
    )
    add(
        "--enable_grpc",
        "--enable-grpc",
        dest="enable_grpc",
        default="true",
        type=parse_flag,
        help="serve V2 gRPC on --grpc_port (default true)",
    )
    add(
        "--grpc_max_send_message_length",
        dest="grpc_max_send_bytes",
        type=int,
        default=d.grpc_max_send_bytes,
        help="bytes (default 128 MiB)",
    )
    add(
        "--grpc_max_receive_message_length",
        dest="grpc_max_receive_bytes",
        type=int,
        default=d.grpc_max_receive_bytes,
        help="bytes (default 128 MiB)",
    )
    add(
        "--no-batching",
        dest="no_batching",
        action="store_true",
        help="ignore every model's [batching] section: one request per forward",
    )
    add(
        "--no-pipeline",
        "--no_pipeline",
        dest="no_pipeline",
        action="store_true",
        help="ignore every model's [pipeline]: serve the model's own tensors (behind a "
        "separate `ember transformer`)",
    )
    add(
        "--torch-threads",
        dest="torch_threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: the CPUs this process may use)",
    )
    add(
        "--instance-nice",
        dest="instance_nice",
        type=_nice,
        default=d.instance_nice,
        help="nice increment for model instance threads, 0-19 (default %(default)s; 0 = off)",
    )
    # Accepted so KServe's standard container args do not fail; they change nothing here.
    add("--enable_docs_url", dest="enable_docs_url", default=None, help=argparse.SUPPRESS)
    add("--max_threads", dest="max_threads", type=int, default=None, help=argparse.SUPPRESS)


def settings_from(args: argparse.Namespace, env: dict[str, str] | None = None) -> ServeSettings:
    env = dict(os.environ) if env is None else env
    model_dir: str | None = args.model_dir
    if model_dir is None and args.model_repository is None:
        # KServe passes the model's location in STORAGE_URI when no initializer copied it.
        model_dir = env.get("STORAGE_URI") or None
    if model_dir is not None:
        # KServe writes file:// URIs; Path would fold "file:///x" into "file:/x".
        model_dir = model_dir.removeprefix("file://")
    port = args.http_port if args.http_port is not None else int(env.get("PORT", "8080"))
    log_level = args.log_level or env.get("KSERVE_LOGLEVEL", "info").lower()
    return ServeSettings(
        model_repository=args.model_repository or Path("models"),
        models=tuple(args.models),
        model_dir=model_dir or None,
        model_name=args.model_name,
        host=args.host,
        http_port=port,
        grpc_port=args.grpc_port,
        workers=max(1, args.workers),
        log_level=log_level,
        log_json={"auto": None, "json": True, "text": False}[args.log_format],
        max_body_bytes=args.max_body_bytes,
        max_headers=args.max_headers,
        max_header_bytes=args.max_header_bytes,
        drain_seconds=args.drain_seconds,
        enable_grpc=args.enable_grpc,
        torch_threads=args.torch_threads,
        instance_nice=args.instance_nice,
        no_batching=args.no_batching,
        no_pipeline=getattr(args, "no_pipeline", False),
        grpc_max_send_bytes=args.grpc_max_send_bytes,
        grpc_max_receive_bytes=args.grpc_max_receive_bytes,
    )
