"""The bench's settings, parsed once from the command line (`cli.options_from`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_FLOOR_SECONDS = 3.0


@dataclass(frozen=True, slots=True)
class BenchOptions:
    model: str
    url: str = "http://127.0.0.1:8080"
    serve: bool = False
    model_repository: Path = Path("models")
    protocol: str = "v2-json"
    concurrency: tuple[int, ...] = (1,)
    duration: float = 10.0
    warmup: float = 1.0
    floor_seconds: float = DEFAULT_FLOOR_SECONDS  # 0: no floors
    raw_seconds: float = 2.0  # 0: no raw forward (and no overhead column)
    torch_threads: int | None = None  # None: see `torch_threads()`
    timeout: float = 30.0
    ready_timeout: float = 120.0
    seed: int = 0
    json: Path | None = None


def torch_threads(requested: int | None, serve: bool, cpus: int | None) -> int | None:
    """Torch intra-op threads for the raw forward and a --serve server; None: torch's default.

    With --serve the server and this client share the machine, so by default the server's
    torch gets half the cores and the client loop keeps the rest: an intra-op pool over every
    core would put torch's worker threads (and their spin-wait after each forward) on the core
    the client needs to read the answer. Against another server, torch's default is what a
    plain `ember serve` runs with, so the raw forward uses it too.
    """
    if requested is not None:
        return requested
    if serve:
        return max(1, (cpus or 1) // 2)
    return None
