"""`ember transformer`'s own flags, with KServe's names: where the predictor is and how to
reach it. Everything else (model folder, ports, logging, gRPC) is `ember serve`'s."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Literal

Protocol = Literal["v1", "v2", "grpc-v2"]
PROTOCOLS: tuple[Protocol, ...] = ("v1", "v2", "grpc-v2")


@dataclass(frozen=True, slots=True)
class PredictorSettings:
    host: str  # HOST:PORT, as KServe passes --predictor_host
    protocol: Protocol = "v1"
    use_ssl: bool = False
    timeout_s: float = 600.0


def _host(value: str) -> str:
    value = value.strip()
    if not value or "/" in value.removeprefix("http://").removeprefix("https://"):
        raise argparse.ArgumentTypeError(f"expected HOST or HOST:PORT, got {value!r}")
    # KServe passes a bare service name; some users paste a URL.
    return value.removeprefix("http://").removeprefix("https://")


def add_transformer_arguments(parser: argparse.ArgumentParser) -> None:
    from ember.server.settings import add_serve_arguments, parse_flag

    add_serve_arguments(parser)
    d = PredictorSettings(host="")
    add = parser.add_argument
    add(
        "--predictor_host",
        "--predictor-host",
        dest="predictor_host",
        type=_host,
        required=True,
        help="the predictor, HOST or HOST:PORT (KServe passes <isvc>-predictor.<namespace>)",
    )
    add(
        "--predictor_protocol",
        "--predictor-protocol",
        dest="predictor_protocol",
        choices=PROTOCOLS,
        default=None,
        help="how to call it (default v1, or $PROTOCOL)",
    )
    add(
        "--predictor_use_ssl",
        "--predictor-use-ssl",
        dest="predictor_use_ssl",
        nargs="?",
        const=True,
        default=d.use_ssl,
        type=parse_flag,
        help="call the predictor over TLS",
    )
    add(
        "--predictor_request_timeout_seconds",
        "--predictor-request-timeout-seconds",
        dest="predictor_timeout_s",
        type=float,
        default=d.timeout_s,
        help="longest wait for one predictor answer (default %(default)s)",
    )


def predictor_from(args: argparse.Namespace, env: dict[str, str]) -> PredictorSettings:
    protocol = args.predictor_protocol or env.get("PROTOCOL") or "v1"
    if protocol not in PROTOCOLS:
        raise ValueError(f"PROTOCOL={protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    return PredictorSettings(
        host=args.predictor_host,
        protocol=protocol,
        use_ssl=args.predictor_use_ssl,
        timeout_s=args.predictor_timeout_s,
    )
