"""`ember bench` arguments, parsed into one typed options object.

`ember` builds every subcommand's parser on each start, `ember serve` included, so this module
imports nothing heavy; the bench itself (`run.py`) is imported when the bench runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ember.server.bench.cpus import parse_cpu_list
from ember.server.bench.options import (
    COMPARE_FLAGS,
    DEFAULT_COPY_SECONDS,
    DEFAULT_FLOOR_SECONDS,
    DEFAULT_RETRY_AFTER_CAP,
    PRIMARY,
    TRANSPORTS,
    BenchOptions,
    torch_threads,
)

# The names in `protocols.PROTOCOLS`, repeated so that building the parser imports no
# numpy/aiohttp/grpc/torch (a unit test keeps the two equal).
PROTOCOL_NAMES = tuple(TRANSPORTS)


def concurrency_list(text: str) -> tuple[int, ...]:
    """`1,4,16` -> (1, 4, 16): positive integers, in the order given, no repeats."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"each concurrency must be at least 1, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a concurrency is repeated in {text!r}")
    return values


def _names(text: str) -> tuple[str, ...]:
    """`a,b` -> ("a", "b"): non-empty names, in the order given, no repeats."""
    names = tuple(part.strip() for part in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a name is repeated in {text!r}")
    return names


def protocol_list(text: str) -> tuple[str, ...]:
    """`v2-json,grpc` -> ("v2-json", "grpc"): known protocols, measured in the order given."""
    names = _names(text)
    unknown = [n for n in names if n not in PROTOCOL_NAMES]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown protocol {', '.join(unknown)}; choose from {', '.join(PROTOCOL_NAMES)}"
        )
    return names


def shape(text: str) -> tuple[int, ...]:
    """`1,4194304` -> (1, 4194304): positive dimensions."""
    try:
        dims = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected dimensions separated by commas, got {text!r}"
        ) from None
    if any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"each dimension must be at least 1, got {text!r}")
    return dims


def host_port(text: str) -> str:
    """`host:port` for gRPC (no scheme: grpc takes targets, not URLs)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in text:
        raise argparse.ArgumentTypeError(f"expected host:port, got {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected seconds > 0, got 0")
    return value


def cpu_list(text: str) -> tuple[int, ...]:
    """`0`, `0-2,5` -> (0,), (0, 1, 2, 5): taskset's CPU list format."""
    try:
        return parse_cpu_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value >= 1:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a factor >= 1, got {text!r}")
    return value


def _count(what: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected {what} >= 1, got {text!r}")
    return value


def _threads(text: str) -> int:
    return _count("a thread count", text)


def _queue_size(text: str) -> int:
    return _count("a queue size", text)


def _repeat(text: str) -> int:
    return _count("a pass count", text)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Closed-loop load against a V2 endpoint (REST JSON, REST binary tensors, gRPC), beside "
        "its own ceilings measured in the same run: the raw forward in this process, the "
        "server's HTTP floor, the client's floor and, when protocols or payloads are compared, "
        "an in-process copy of the same bytes. Exits 1 if any request failed."
    )
    add = parser.add_argument
    add("--model", required=True, help="the model to load (as named in its model.toml)")
    add("--url", default="http://127.0.0.1:8080", help="the server (default %(default)s)")
    add(
        "--grpc-url",
        "--grpc_url",
        dest="grpc_url",
        type=host_port,
        default=None,
        metavar="HOST:PORT",
        help="the server's gRPC port, for --protocol grpc (default: --url's host, port 8081)",
    )
    add(
        "--serve",
        action="store_true",
        help="start `ember serve --model-repository REPO --model MODEL` on free ports, "
        "bench it, stop it (ignores --url and --grpc-url)",
    )
    add(
        "--model-repository",
        "--model_repository",
        dest="model_repository",
        type=Path,
        default=Path("models"),
        metavar="PATH",
        help="where the model is, for the raw forward and its declared inputs (default models)",
    )
    add(
        "--protocol",
        dest="protocols",
        type=protocol_list,
        default=("v2-json",),
        metavar="P[,P...]",
        help=f"wire protocols, each measured in turn: {', '.join(PROTOCOL_NAMES)} "
        "(default v2-json)",
    )
    add(
        "--input",
        dest="inputs",
        type=_names,
        default=(),
        metavar="NAME[,NAME...]",
        help="the inputs to send (default: every declared input); for models with optional "
        "inputs, such as identity",
    )
    add(
        "--output",
        dest="outputs",
        type=_names,
        default=(),
        metavar="NAME[,NAME...]",
        help="the outputs to ask for by name (default: all the model gives; with --input, "
        "the OUTPUT* named like each INPUT* when the model declares them)",
    )
    add(
        "--shape",
        type=shape,
        default=None,
        metavar="D[,D...]",
        help="the shape of every input sent (default: the declared shape, -1 -> 1)",
    )
    add(
        "--concurrency",
        type=concurrency_list,
        default=(1,),
        metavar="N[,N...]",
        help="closed-loop workers, one connection (or gRPC channel) each; one level per value "
        "(default 1)",
    )
    add(
        "--duration",
        type=_positive_seconds,
        default=10.0,
        metavar="S",
        help="measured seconds per level (default 10)",
    )
    add(
        "--warmup",
        type=_seconds,
        default=1.0,
        metavar="S",
        help="unmeasured seconds before each level (default 1)",
    )
    add(
        "--floor-duration",
        dest="floor_seconds",
        type=_seconds,
        default=None,
        metavar="S",
        help=f"measured seconds per floor level (default: --duration, at most "
        f"{DEFAULT_FLOOR_SECONDS:g}; 0 skips the floors)",
    )
    add(
        "--raw-seconds",
        type=_seconds,
        default=2.0,
        metavar="S",
        help="seconds of raw in-process forwards (default 2; 0 skips them)",
    )
    add(
        "--copy-seconds",
        type=_seconds,
        default=None,
        metavar="S",
        help=f"seconds of in-process copies of the payload, the copy floor of the throughput "
        f"table (default {DEFAULT_COPY_SECONDS:g} when --protocol is not just v2-json or "
        f"--input/--shape/--output is given, else 0; 0 skips it and the table)",
    )
    add(
        "--torch-threads",
        type=_threads,
        default=None,
        metavar="N",
        help="torch intra-op threads for the raw forward and, with --serve, for the server "
        "(OMP_NUM_THREADS); default: half the CPUs with --serve, which leaves the client "
        "cores of its own, else torch's default (what a plain `ember serve` uses)",
    )
    add("--timeout", type=_positive_seconds, default=30.0, metavar="S", help="per request")
    add(
        "--ready-timeout",
        type=_positive_seconds,
        default=120.0,
        metavar="S",
        help="--serve: how long the server may take to become ready",
    )
    add("--seed", type=int, default=0, help="seed of the request data (default 0)")
    add("--json", type=Path, default=None, metavar="PATH", help="write every number here")
    add(
        "--serve-cpus",
        dest="serve_cpus",
        type=cpu_list,
        default=None,
        metavar="LIST",
        help="--serve: pin the server to these CPUs (taskset -c LIST, e.g. 0 or 0-3) and this "
        "bench to the others; the raw forward runs on the server's CPUs with one torch "
        "thread per CPU (unless --torch-threads), so it is the ceiling of that core",
    )
    add(
        "--compare",
        choices=tuple(COMPARE_FLAGS),
        default=None,
        help=f"--serve: also measure a second server, started after the first is stopped "
        f"(so the two never share a core), with the same levels; rows are labelled "
        f"'{PRIMARY}' and the name given",
    )
    add(
        "--overload",
        type=factor,
        default=None,
        metavar="F",
        help="after the levels, one closed-loop level of F x the largest concurrency over the "
        "first HTTP protocol, where each client that gets 429 waits the Retry-After "
        "(capped) before its next request: goodput, refusals and their latency",
    )
    add(
        "--retry-after-cap",
        type=_positive_seconds,
        default=DEFAULT_RETRY_AFTER_CAP,
        metavar="S",
        help="the longest an overload client waits after a 429 (default %(default)g s)",
    )
    add(
        "--queue-size",
        type=_queue_size,
        default=None,
        metavar="N",
        help="--serve: serve a copy of the model (in a temporary folder, weights linked) with "
        "[batching] max_queue_size = N, so the overload level meets a queue it can fill",
    )
    add(
        "--plot",
        type=Path,
        default=None,
        metavar="PATH",
        help="write a PNG of rows/s and p99 against concurrency (needs matplotlib)",
    )
    add(
        "--repeat",
        type=_repeat,
        default=1,
        metavar="N",
        help="run the whole measurement N times in a row (with --serve the servers are "
        "restarted; the raw forwards follow each pass, so every pass has its own ceiling) "
        "and judge each target on the median pass, with its range and the passes that met "
        "it (default 1); --json then holds every pass, --plot the last",
    )


def options_from(args: argparse.Namespace) -> BenchOptions:
    floor = args.floor_seconds
    if floor is None:
        floor = min(args.duration, DEFAULT_FLOOR_SECONDS)
    copy = args.copy_seconds
    if copy is None:
        # A plain latency run (the default) keeps its table as it was; a run that compares
        # protocols or sizes its payload is about bytes per second, and gets the copy floor.
        compares = tuple(args.protocols) != ("v2-json",)
        sized = bool(args.inputs or args.outputs or args.shape)
        copy = DEFAULT_COPY_SECONDS if compares or sized else 0.0
    return BenchOptions(
        model=args.model, url=args.url, grpc_url=args.grpc_url, serve=args.serve,
        model_repository=args.model_repository, protocols=tuple(args.protocols),
        inputs=tuple(args.inputs), outputs=tuple(args.outputs), shape=args.shape,
        concurrency=tuple(args.concurrency), duration=args.duration, warmup=args.warmup,
        floor_seconds=floor, raw_seconds=args.raw_seconds, copy_seconds=copy,
        torch_threads=args.torch_threads, timeout=args.timeout,
        ready_timeout=args.ready_timeout, seed=args.seed, json=args.json,
        serve_cpus=args.serve_cpus, compare=args.compare, overload=args.overload,
        retry_after_cap=args.retry_after_cap, queue_size=args.queue_size, plot=args.plot,
        repeat=args.repeat,
    )  # fmt: skip


def run_bench(args: argparse.Namespace) -> int:
    options = options_from(args)
    serve_cpus = len(options.serve_cpus) if options.serve_cpus else None
    threads = torch_threads(options.torch_threads, options.serve, os.cpu_count(), serve_cpus)
    if threads is not None:
        # Before torch is imported: OpenMP sizes its pool (and each new thread's default) by
        # this variable, else by every CPU; the server gets the same (`run._start`).
        os.environ["OMP_NUM_THREADS"] = str(threads)
    from ember.server.bench.errors import BenchError
    from ember.server.bench.pipeline import run_pipeline_bench, text_input
    from ember.server.bench.run import execute
    from ember.server.config import discover
    from ember.server.errors import ConfigError

    try:
        ((config, _),) = discover(options.model_repository, [options.model])
    except ConfigError:
        config = None  # a remote --url model: execute() says what it can
    if config is not None and text_input(config) is not None:
        if options.repeat > 1:
            print("ember bench: error: --repeat applies to tensor models; the text pipeline "
                  "bench runs once", file=sys.stderr)  # fmt: skip
            return 2
        try:
            return run_pipeline_bench(options, config, sys.stdout, sys.stderr)
        except BenchError as exc:
            print(f"ember bench: error: {exc}", file=sys.stderr)
            return 2
    return execute(options)
