"""The closed loop: N workers, each sending its next request as soon as its last one answered.

The loop knows nothing about HTTP: a worker is an async context manager (its connection) that
yields a `Call`, one request that raises on any failure. Protocols build those (`protocols.py`).
Percentiles and summaries are pure functions, so they are tested without sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

# One request on the worker's own connection; raises on a bad status or a transport error.
Call = Callable[[], Awaitable[None]]
# Opens one worker's connection and yields its `Call`; closing it closes the connection.
OpenWorker = Callable[[], AbstractAsyncContextManager[Call]]
Clock = Callable[[], float]

QUANTILES = (50.0, 90.0, 99.0)


def percentiles(samples: Sequence[float], quantiles: Sequence[float]) -> list[float]:
    """Each quantile (0-100) of `samples`, interpolating linearly between closest ranks.

    The same definition as numpy's default (`method="linear"`), so numbers can be checked
    against it; written out because this module must not need numpy.
    """
    if not samples:
        raise ValueError("percentiles of an empty sample")
    ordered = sorted(samples)
    last = len(ordered) - 1
    values = []
    for q in quantiles:
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"quantile must be within [0, 100], got {q}")
        rank = q / 100.0 * last
        low = int(rank)
        high = min(low + 1, last)
        values.append(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))
    return values


@dataclass(frozen=True, slots=True)
class Stats:
    """One measured level: what was called, how hard, and how it went. Times in ms."""

    target: str
    concurrency: int
    seconds: float
    requests: int  # successful ones; latencies are over these only
    errors: int
    rps: float
    p50_ms: float | None  # None when no request succeeded
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    first_error: str | None = None
    # The infer rows' wire protocol (v2-json, v2-binary, grpc), the floors' transport (http,
    # grpc); "" for rows measured in-process.
    protocol: str = ""


def summarize(
    target: str,
    concurrency: int,
    seconds: float,
    latencies_s: Sequence[float],
    errors: int = 0,
    first_error: str | None = None,
    protocol: str = "",
) -> Stats:
    """Turn raw latencies (seconds) over a window of `seconds` into a `Stats` row."""
    if seconds <= 0:
        raise ValueError(f"window must be positive, got {seconds}")
    count = len(latencies_s)
    p50: float | None
    p90: float | None
    p99: float | None
    mean: float | None
    if count:
        p50, p90, p99 = (v * 1e3 for v in percentiles(latencies_s, QUANTILES))
        mean = sum(latencies_s) / count * 1e3
    else:
        p50 = p90 = p99 = mean = None
    return Stats(
        target=target, concurrency=concurrency, seconds=seconds, requests=count,
        errors=errors, rps=count / seconds, p50_ms=p50, p90_ms=p90, p99_ms=p99,
        mean_ms=mean, first_error=first_error, protocol=protocol,
    )  # fmt: skip


@dataclass(slots=True)
class _Window:
    """What the workers of one level collect; shared safely, they all run on one loop."""

    start: float
    end: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None


async def _work(call: Call, window: _Window, clock: Clock) -> None:
    # Closed loop: the next request leaves when the previous one answered; none leaves after
    # the window. A request counts if it was sent and answered inside the window, so warm-up
    # requests and the ones still in flight at the end are left out, and rps = count / window.
    while (sent := clock()) < window.end:
        try:
            await call()
        except Exception as exc:  # a benchmark reports failures, it does not stop on them
            if sent >= window.start and clock() <= window.end:
                window.errors += 1
                window.first_error = window.first_error or f"{type(exc).__name__}: {exc}"
            continue
        done = clock()
        if sent >= window.start and done <= window.end:
            window.latencies.append(done - sent)


async def run_level(
    target: str,
    open_worker: OpenWorker,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    protocol: str = "",
    clock: Clock = time.perf_counter,
) -> Stats:
    """Run `concurrency` workers for `warmup` + `duration` seconds; measure the last part."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    async with contextlib.AsyncExitStack() as stack:
        calls = [await stack.enter_async_context(open_worker()) for _ in range(concurrency)]
        start = clock() + warmup
        window = _Window(start=start, end=start + duration)
        await asyncio.gather(*(_work(call, window, clock) for call in calls))
    return summarize(
        target, concurrency, duration, window.latencies, window.errors, window.first_error,
        protocol,
    )  # fmt: skip
