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
# The overload level's request: None when answered 200, the seconds the server asked to wait
# (its Retry-After) when it refused the request as overloaded; raises on anything else.
RetryCall = Callable[[], Awaitable[float | None]]
OpenRetryWorker = Callable[[], AbstractAsyncContextManager[RetryCall]]
Clock = Callable[[], float]
# Called when a level's measured window opens and when it closes (`run_level`).
Hook = Callable[[], Awaitable[None]]

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
class Observed:
    """What happened on both sides during one level's measured window (`observe.Probe`)."""

    # From the server's statistics (None: it has none): executions per batch size (rows
    # per forward), and the totals they add up to.
    seconds: float  # the window, as the probe saw it
    batches: dict[int, int] | None
    inferences: int | None  # rows answered
    executions: int | None  # forwards run
    forward_seconds: float | None  # the forwards' own time (batch_stats compute_infer)
    # CPU used over the window, in cores (1.0 = one core busy the whole window).
    client_cpu: float
    client_cores: int  # CPUs the client may use
    server_cpu: float | None  # None: the server is not a child of this bench
    server_cores: int | None
    # CPU every other process on the machine used meanwhile, in cores: other work on a shared
    # machine skews the numbers, so the report says when there was any. None: unknown.
    other_cpu: float | None = None

    @property
    def mean_batch(self) -> float | None:
        """Rows per forward, on average, from the executions per batch size: both sides of
        that ratio are counted when a forward ends (`inference_count` grows when each answer
        leaves, so it can lag a forward that ended inside the window)."""
        if not self.batches:
            return None
        executions = sum(self.batches.values())
        return sum(size * count for size, count in self.batches.items()) / executions

    @property
    def forward_share(self) -> float | None:
        """The part of the window the server spent inside forwards (1.0: all of it)."""
        if self.forward_seconds is None:
            return None
        return self.forward_seconds / self.seconds


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
    # Which server answered (`--compare`: "batching", "no-batching"); "" with one server.
    server: str = ""
    rows_per_request: int = 1  # rows (the batch dimension) in each request sent
    observed: Observed | None = None

    @property
    def rows_per_s(self) -> float:
        return self.rps * self.rows_per_request


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


# The longest a hook waits between looks at the clock: a fake clock (tests) moves with the
# requests, not with the loop's time, so the hooks poll it instead of sleeping to a moment.
HOOK_POLL_SECONDS = 0.05


async def _until(moment: float, clock: Clock) -> None:
    while (left := moment - clock()) > 0:
        await asyncio.sleep(min(left, HOOK_POLL_SECONDS))


async def _hooks(window: _Window, clock: Clock, opened: Hook | None, closed: Hook | None) -> None:
    # Within a poll of the window's edges: close enough for CPU time and statistics over a
    # window of seconds.
    if opened is not None:
        await _until(window.start, clock)
        await opened()
    if closed is not None:
        await _until(window.end, clock)
        await closed()


async def run_level(
    target: str,
    open_worker: OpenWorker,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    protocol: str = "",
    clock: Clock = time.perf_counter,
    on_open: Hook | None = None,
    on_close: Hook | None = None,
) -> Stats:
    """Run `concurrency` workers for `warmup` + `duration` seconds; measure the last part.

    `on_open` and `on_close` run when the measured window opens and closes (a `Probe`
    reads CPU time and the server's statistics there)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    async with contextlib.AsyncExitStack() as stack:
        calls = [await stack.enter_async_context(open_worker()) for _ in range(concurrency)]
        start = clock() + warmup
        window = _Window(start=start, end=start + duration)
        await asyncio.gather(
            _hooks(window, clock, on_open, on_close),
            *(_work(call, window, clock) for call in calls),
        )
    return summarize(
        target, concurrency, duration, window.latencies, window.errors, window.first_error,
        protocol,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class RawRate:
    """Back-to-back forwards of one batch size in the bench process (`raw.time_forward`)."""

    batch: int  # requests merged into each forward
    rows: int  # rows per forward (batch x rows per request)
    calls: int
    p50_ms: float
    rows_per_s: float  # rows x calls / the time spent in forwards


def raw_rate(batch: int, rows: int, latencies_s: Sequence[float]) -> RawRate:
    """A `RawRate` from the latencies (seconds) of back-to-back forwards."""
    if not latencies_s:
        raise ValueError("no forwards were timed")
    (p50,) = percentiles(latencies_s, (50.0,))
    return RawRate(
        batch, rows, len(latencies_s), p50 * 1e3, rows * len(latencies_s) / sum(latencies_s)
    )


# --- the overload level ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OverloadStats:
    """One closed-loop level beyond what the server can take: answers, refusals, and how
    fast each came. Times in ms; rates per second of the window."""

    concurrency: int
    seconds: float
    protocol: str
    ok: int  # answered 200 (goodput = ok / seconds)
    rejected: int  # refused as overloaded (HTTP 429)
    errors: int  # anything else
    goodput: float
    ok_p50_ms: float | None
    ok_p99_ms: float | None
    rejected_p50_ms: float | None
    rejected_p99_ms: float | None
    retry_after_s: float | None  # the largest Retry-After the server sent
    waited_s: float  # what the clients slept, after the cap
    retry_after_cap_s: float
    first_error: str | None = None
    rows_per_request: int = 1
    observed: Observed | None = None


@dataclass(slots=True)
class _RetryWindow:
    start: float
    end: float
    ok: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    retry_after: float | None = None
    waited: float = 0.0


async def _work_retrying(call: RetryCall, window: _RetryWindow, cap: float, clock: Clock) -> None:
    # The closed loop of a well-behaved client: after a refusal it waits what the server
    # asked (at most `cap`) before its next request, so refusals cost the server little.
    while (sent := clock()) < window.end:
        try:
            retry = await call()
        except Exception as exc:
            if sent >= window.start and clock() <= window.end:
                window.errors += 1
                window.first_error = window.first_error or f"{type(exc).__name__}: {exc}"
            continue
        done = clock()
        counted = sent >= window.start and done <= window.end
        if retry is None:
            if counted:
                window.ok.append(done - sent)
            continue
        wait = min(retry, cap)
        if counted:
            window.rejected.append(done - sent)
            window.retry_after = max(retry, window.retry_after or 0.0)
            window.waited += wait
        await asyncio.sleep(wait)


def _ms(samples: Sequence[float]) -> tuple[float | None, float | None]:
    if not samples:
        return None, None
    p50, p99 = percentiles(samples, (50.0, 99.0))
    return p50 * 1e3, p99 * 1e3


async def run_overload_level(
    open_worker: OpenRetryWorker,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    retry_after_cap: float,
    protocol: str = "",
    clock: Clock = time.perf_counter,
    on_open: Hook | None = None,
    on_close: Hook | None = None,
) -> OverloadStats:
    """`concurrency` well-behaved clients for `warmup` + `duration` s; the last part counts."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    if duration <= 0:
        raise ValueError(f"window must be positive, got {duration}")
    async with contextlib.AsyncExitStack() as stack:
        calls = [await stack.enter_async_context(open_worker()) for _ in range(concurrency)]
        start = clock() + warmup
        window = _RetryWindow(start=start, end=start + duration)
        edges = _Window(start=window.start, end=window.end)
        await asyncio.gather(
            _hooks(edges, clock, on_open, on_close),
            *(_work_retrying(call, window, retry_after_cap, clock) for call in calls),
        )
    ok_p50, ok_p99 = _ms(window.ok)
    rejected_p50, rejected_p99 = _ms(window.rejected)
    return OverloadStats(
        concurrency=concurrency, seconds=duration, protocol=protocol, ok=len(window.ok),
        rejected=len(window.rejected), errors=window.errors,
        goodput=len(window.ok) / duration, ok_p50_ms=ok_p50, ok_p99_ms=ok_p99,
        rejected_p50_ms=rejected_p50, rejected_p99_ms=rejected_p99,
        retry_after_s=window.retry_after, waited_s=window.waited,
        retry_after_cap_s=retry_after_cap, first_error=window.first_error,
    )  # fmt: skip
