"""The bench's settings, parsed once from the command line (`cli.options_from`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_FLOOR_SECONDS = 3.0
# Seconds of in-process copies when a run compares protocols or payloads (`cli.options_from`).
DEFAULT_COPY_SECONDS = 2.0
# KServe's default gRPC port, where `ember serve` listens unless told otherwise.
DEFAULT_GRPC_PORT = 8081

# Each protocol's transport: the floors measured for it (`run.py`) and the breakdown of its
# p50 (`report.breakdown`) use the rows of its transport. The keys are `--protocol`'s choices,
# kept equal to `protocols.PROTOCOLS` by a unit test; here so that building the parser imports
# nothing heavy.
TRANSPORTS = {"v2-json": "http", "v2-binary": "http", "grpc": "grpc"}

# `--compare`: a second server measured in the same run, and the `ember serve` flags that make
# it. Its rows are labelled with the name, the first server's with `primary_label()`.
# `activator`: the same model served by a replica that `ember activator` starts, through it.
ACTIVATOR = "activator"
COMPARE_FLAGS: dict[str, tuple[str, ...]] = {"no-batching": ("--no-batching",), ACTIVATOR: ()}
PRIMARY = "batching"


def primary_label(compare: str | None) -> str:
    return "direct" if compare == ACTIVATOR else PRIMARY


DEFAULT_RETRY_AFTER_CAP = 1.0


@dataclass(frozen=True, slots=True)
class BenchOptions:
    model: str
    url: str = "http://127.0.0.1:8080"
    grpc_url: str | None = None  # host:port; None: --url's host, port 8081
    serve: bool = False
    model_repository: Path = Path("models")
    protocols: tuple[str, ...] = ("v2-json",)
    inputs: tuple[str, ...] = ()  # (): every declared input
    outputs: tuple[str, ...] = ()  # (): see `payload.select_outputs`
    shape: tuple[int, ...] | None = None  # None: declared shapes, -1 -> 1
    concurrency: tuple[int, ...] = (1,)
    duration: float = 10.0
    warmup: float = 1.0
    floor_seconds: float = DEFAULT_FLOOR_SECONDS  # 0: no floors
    raw_seconds: float = 2.0  # 0: no raw forward (and no overhead column)
    copy_seconds: float = 0.0  # 0: no copy floor and no throughput table
    torch_threads: int | None = None  # None: see `torch_threads()`
    timeout: float = 30.0
    ready_timeout: float = 120.0
    seed: int = 0
    json: Path | None = None
    # --serve: the server's CPUs (taskset -c); the bench takes the others. None: unpinned.
    serve_cpus: tuple[int, ...] | None = None
    compare: str | None = None  # a name in COMPARE_FLAGS
    overload: float | None = None  # x the largest concurrency; None: no overload level
    retry_after_cap: float = DEFAULT_RETRY_AFTER_CAP
    queue_size: int | None = None  # --serve: the model's max_queue_size, in a copy of it
    plot: Path | None = None
    # Whole measurements in a row (servers restarted, raw forwards after each), each target
    # summarised over them: on a shared VM one pass's ratio is a sample, not a result.
    repeat: int = 1

    @property
    def overload_concurrency(self) -> int | None:
        if self.overload is None:
            return None
        return max(1, round(self.overload * max(self.concurrency)))


def problems(options: BenchOptions) -> list[str]:
    """What makes a combination of options unusable (each flag alone parsed fine)."""
    found = []
    for flag, value in (("--serve-cpus", options.serve_cpus), ("--compare", options.compare),
                        ("--queue-size", options.queue_size)):  # fmt: skip
        if value is not None and not options.serve:
            found.append(f"{flag} needs --serve (the bench starts the servers it configures)")
    if options.overload is not None and all(TRANSPORTS[p] != "http" for p in options.protocols):
        found.append(
            "--overload needs an HTTP protocol (v2-json or v2-binary): gRPC refusals carry "
            "no Retry-After to wait on"
        )
    return found


def torch_threads(
    requested: int | None, serve: bool, cpus: int | None, serve_cpus: int | None = None
) -> int | None:
    """Torch intra-op threads for the raw forward and a --serve server; None: torch's default.

    With --serve-cpus, one thread per server CPU: what `ember serve` itself picks under
    `taskset` (the CPUs it may use), and what the raw forward, run on the same CPUs, uses.

    With --serve the server and this client share the machine, so by default the server's
    torch gets half the cores and the client loop keeps the rest: an intra-op pool over every
    core would put torch's worker threads (and their spin-wait after each forward) on the core
    the client needs to read the answer. Against another server, torch's default is what a
    plain `ember serve` runs with, so the raw forward uses it too.
    """
    if requested is not None:
        return requested
    if serve and serve_cpus:
        return serve_cpus
    if serve:
        return max(1, (cpus or 1) // 2)
    return None


def grpc_target(url: str, grpc_url: str | None) -> str:
    """Where the gRPC load goes: --grpc-url, else the host of --url on KServe's gRPC port."""
    if grpc_url is not None:
        return grpc_url
    host = urlsplit(url).hostname or "127.0.0.1"
    if ":" in host:  # an IPv6 literal, bracketed again for a gRPC target
        host = f"[{host}]"
    return f"{host}:{DEFAULT_GRPC_PORT}"
