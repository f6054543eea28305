"""`ember bench` arguments, parsed into one typed options object.

`ember` builds every subcommand's parser on each start, `ember serve` included, so this module
imports nothing heavy; the bench itself (`run.py`) is imported when the bench runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ember.server.bench.options import DEFAULT_FLOOR_SECONDS, BenchOptions

# The names in `protocols.PROTOCOLS`, repeated so that building the parser imports no
# numpy/aiohttp/torch (a unit test keeps the two equal).
PROTOCOL_NAMES = ("v2-json",)


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


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a thread count >= 1, got {text!r}")
    return value


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Closed-loop load against a V2 endpoint, beside its own ceilings measured in the same "
        "run: the raw forward in this process, the server's HTTP floor and the client's floor. "
        "Exits 1 if any request failed."
    )
    add = parser.add_argument
    add("--model", required=True, help="the model to load (as named in its model.toml)")
    add("--url", default="http://127.0.0.1:8080", help="the server (default %(default)s)")
    add(
        "--serve",
        action="store_true",
        help="start `ember serve --model-repository REPO --model MODEL` on a free port, "
        "bench it, stop it (ignores --url)",
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
    add("--protocol", choices=PROTOCOL_NAMES, default="v2-json", help="default %(default)s")
    add(
        "--concurrency",
        type=concurrency_list,
        default=(1,),
        metavar="N[,N...]",
        help="closed-loop workers, one connection each; one level per value (default 1)",
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


def options_from(args: argparse.Namespace) -> BenchOptions:
    floor = args.floor_seconds
    if floor is None:
        floor = min(args.duration, DEFAULT_FLOOR_SECONDS)
    return BenchOptions(
        model=args.model, url=args.url, serve=args.serve,
        model_repository=args.model_repository, protocol=args.protocol,
        concurrency=tuple(args.concurrency), duration=args.duration, warmup=args.warmup,
        floor_seconds=floor, raw_seconds=args.raw_seconds, torch_threads=args.torch_threads,
        timeout=args.timeout, ready_timeout=args.ready_timeout, seed=args.seed, json=args.json,
    )  # fmt: skip


def run_bench(args: argparse.Namespace) -> int:
    from ember.server.bench.run import execute

    return execute(options_from(args))
