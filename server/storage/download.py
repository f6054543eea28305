"""Parallel ranged reads of one object into a `Sink`, on a fixed pool of threads.

An object is cut into `chunk_size` ranges; `concurrency` threads each fetch one range at a time
and read it in `read_size` pieces into a per-thread buffer (or straight into a `BufferSink`'s
memory), writing each piece at its offset. Memory in use is `concurrency * read_size` however large
the object is. A range that fails transiently is requested again from the first byte it is still
missing, after a backoff; the other ranges carry on. The first final failure stops every range
and is raised.

Backends (`s3.py`, `http.py`) supply a `RangeSource`: how to open one range and how to read a
failure. The pool is shared: several objects may be fetched at once from different threads and
the number of requests in flight stays at `concurrency`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

from ember.server.storage.errors import BadSetting, StorageError
from ember.server.storage.retry import RetryPolicy, Transient, with_retries
from ember.server.storage.sinks import BufferSink, Sink

MiB = 1024 * 1024

# Chosen with tests/storage/bench_download.py: a 512 MiB object from `rclone serve s3` on
# loopback, 2 cores shared with rclone, best of 3. Chunk size is what loopback can judge: 4 MiB
# ranges ran at 312 MB/s and 1.25 s of client CPU, 8 MiB at 540 MB/s, 16-64 MiB at 570-820 MB/s
# and ~0.4 s of CPU (per-request work: signing, parsing, the server opening the file). 16 MiB is
# the smallest size on that plateau, so a retried range stays cheap and a 100 MiB file still
# gets 7 streams. Concurrency is not something loopback can judge (one range at a time already
# ran at 667 MB/s: the two cores are the limit; 4 to 32 ranges measured the same within the
# noise, at the same CPU). 16 follows the network instead: S3 serves ~80 MB/s per connection,
# so 16 fill a 10 Gb/s link; faster nodes should pass more (Run:ai's streamer uses 32).
DEFAULT_CONCURRENCY = 16
DEFAULT_CHUNK_SIZE = 16 * MiB
# One readinto per MiB: large enough that Python's per-call cost vanishes, small enough that
# 16 threads hold 16 MiB.
DEFAULT_READ_SIZE = 1 * MiB


@dataclass(frozen=True, slots=True)
class DownloadOptions:
    concurrency: int = DEFAULT_CONCURRENCY
    chunk_size: int = DEFAULT_CHUNK_SIZE
    read_size: int = DEFAULT_READ_SIZE
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise BadSetting(f"concurrency must be at least 1, got {self.concurrency}")
        if self.chunk_size < 1 or self.read_size < 1:
            raise BadSetting(
                f"chunk and read sizes must be positive, got {self.chunk_size}, {self.read_size}"
            )


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    # Exclusive.
    end: int

    def __len__(self) -> int:
        return self.end - self.start

    def header(self) -> str:
        """The HTTP `Range` header value (inclusive end)."""
        return f"bytes={self.start}-{self.end - 1}"


def plan_ranges(size: int, chunk_size: int) -> list[ByteRange]:
    """`size` bytes cut into consecutive ranges of `chunk_size` (the last one shorter)."""
    if size < 0 or chunk_size < 1:
        raise ValueError(f"cannot plan {size} bytes in chunks of {chunk_size}")
    return [ByteRange(s, min(s + chunk_size, size)) for s in range(0, size, chunk_size)]


class RangeBody(Protocol):
    def readinto(self, buffer: memoryview) -> int: ...

    def close(self) -> None: ...


class RangeSource(Protocol):
    """One object as a backend serves it: its size and how to read any range of it."""

    @property
    def size(self) -> int: ...

    def open_range(self, byte_range: ByteRange) -> RangeBody:
        """Start a request for `byte_range`; raise on a refused or unexpected answer."""
        ...

    def classify(self, exc: Exception) -> StorageError | Transient:
        """A final error, or why the attempt may succeed next time."""
        ...

    def exhausted(self, failure: Transient, attempts: int) -> StorageError:
        """The error for a range that failed transiently on every attempt."""
        ...


class ShortRead(Exception):
    """The connection ended before the range did."""


class _Stopped(StorageError):
    """Another range failed for good: this one gives up quietly."""


@dataclass
class FetchStats:
    size: int = 0
    ranges: int = 0
    # Requests made, retries included.
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, requests: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.retries += retries


Progress = Callable[[int], None]


class _ShiftedSink:
    """A buffer holding the bytes from `base` on, addressed by offsets in the object."""

    def __init__(self, buffer: bytearray, base: int) -> None:
        self._view = memoryview(buffer)
        self._base = base

    def view(self, offset: int, length: int) -> memoryview:
        return self._view[offset - self._base : offset - self._base + length]

    def write_at(self, offset: int, data: memoryview) -> None:
        self.view(offset, len(data))[:] = data


class Downloader:
    """Owns the range threads; one per process is enough, shared by every object fetched."""

    def __init__(
        self, options: DownloadOptions, *, sleep: Callable[[float], None] | None = None
    ) -> None:
        self.options = options
        self._sleep = sleep
        self._pool = ThreadPoolExecutor(options.concurrency, thread_name_prefix="ember-range")
        self._buffers = threading.local()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop every fetch in progress at its next read (Ctrl-C, another file failed); each
        raises a `StorageError`. The downloader cannot be used afterwards."""
        self._cancelled.set()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Downloader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fetch(
        self,
        source: RangeSource,
        sink: Sink,
        progress: Progress | None = None,
        *,
        whole: bool = False,
    ) -> FetchStats:
        """Every byte of `source` into `sink`; raises the first final `StorageError`.

        `whole`: one request for the whole object (a server without range support).
        """
        started = time.monotonic()
        chunk = max(1, source.size) if whole else self.options.chunk_size
        ranges = plan_ranges(source.size, chunk)
        stats = FetchStats(size=source.size, ranges=len(ranges))
        stop = threading.Event()
        futures: list[Future[None]] = [
            self._pool.submit(self._fetch_range, source, sink, r, stop, stats, progress)
            for r in ranges
        ]
        try:
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            # Ctrl-C in the waiting thread: the ranges must not run on to the last byte.
            stop.set()
            for future in futures:
                future.cancel()
            raise
        failed = [f for f in futures if f in done and f.exception() is not None]
        if failed:
            # Stop the ranges in flight at their next read and drop those not started, so the
            # caller can delete the file as soon as this returns.
            stop.set()
            for future in pending:
                future.cancel()
            wait(pending)
            errors = [e for f in failed if (e := f.exception()) is not None]
            # A range stopped because of another's failure is not the news: that failure is.
            raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
        stats.seconds = time.monotonic() - started
        return stats

    def read(self, source: RangeSource, byte_range: ByteRange) -> bytearray:
        """One range of `source` into memory, in the calling thread, with the same retries as
        a fetch's ranges (a safetensors header before the object's download starts)."""
        buffer = bytearray(len(byte_range))
        stats = FetchStats(size=len(byte_range), ranges=1)
        self._fetch_range(
            source,
            _ShiftedSink(buffer, byte_range.start),
            byte_range,
            threading.Event(),
            stats,
            None,
        )
        return buffer

    def _buffer(self) -> memoryview:
        buffer: memoryview | None = getattr(self._buffers, "view", None)
        if buffer is None or len(buffer) != self.options.read_size:
            buffer = memoryview(bytearray(self.options.read_size))
            self._buffers.view = buffer
        return buffer

    def _fetch_range(
        self,
        source: RangeSource,
        sink: Sink,
        byte_range: ByteRange,
        stop: threading.Event,
        stats: FetchStats,
        progress: Progress | None,
    ) -> None:
        read_size = self.options.read_size
        # A sink that lends its memory is read into directly: no buffer, no copy.
        direct = sink if isinstance(sink, BufferSink) else None
        done = 0

        def halted() -> bool:
            return stop.is_set() or self._cancelled.is_set()

        def attempt() -> None:
            nonlocal done
            if halted():
                raise _Stopped("stopped")
            stats.count(requests=1)
            # A retry asks only for the bytes still missing: what arrived before the
            # connection broke is already in place.
            body = source.open_range(ByteRange(byte_range.start + done, byte_range.end))
            try:
                while done < len(byte_range):
                    if halted():
                        raise _Stopped("stopped")
                    offset = byte_range.start + done
                    want = min(read_size, len(byte_range) - done)
                    if direct is not None:
                        got = body.readinto(direct.view(offset, want))
                    else:
                        buffer = self._buffer()[:want]
                        got = body.readinto(buffer)
                        sink.write_at(offset, buffer[:got])
                    if got <= 0:
                        raise ShortRead(
                            f"connection closed after {done} of {len(byte_range)} bytes"
                        )
                    done += got
                    if progress is not None:
                        progress(got)
            finally:
                body.close()

        def classify(exc: Exception) -> StorageError | Transient:
            if isinstance(exc, ShortRead):
                return Transient(str(exc))
            return source.classify(exc)

        def retried(failure: Transient, failures: int) -> None:
            stats.count(retries=1)

        def sleep(seconds: float) -> None:
            if self._sleep is not None:
                self._sleep(seconds)
            elif stop.wait(seconds) or halted():
                raise _Stopped("stopped")

        with_retries(
            attempt,
            self.options.retry,
            classify,
            source.exhausted,
            sleep=sleep,
            on_retry=retried,
        )
