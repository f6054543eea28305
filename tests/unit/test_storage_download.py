"""The range engine with an in-memory source: planning, backoff, per-range retries, stopping."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from pathlib import Path

import pytest

from ember.server.storage.download import (
    ByteRange,
    Downloader,
    DownloadOptions,
    plan_ranges,
)
from ember.server.storage.errors import DownloadFailed, NoSuchKey, StorageError
from ember.server.storage.retry import RetryPolicy, Transient, with_retries
from ember.server.storage.sinks import FileSink, MemorySink


def test_plan_ranges() -> None:
    assert plan_ranges(0, 4) == []
    assert plan_ranges(3, 4) == [ByteRange(0, 3)]
    assert plan_ranges(8, 4) == [ByteRange(0, 4), ByteRange(4, 8)]
    assert plan_ranges(9, 4) == [ByteRange(0, 4), ByteRange(4, 8), ByteRange(8, 9)]
    ranges = plan_ranges(10_000_019, 1 << 20)
    assert sum(len(r) for r in ranges) == 10_000_019
    assert all(a.end == b.start for a, b in itertools.pairwise(ranges))
    assert ByteRange(8, 9).header() == "bytes=8-8"
    with pytest.raises(ValueError):
        plan_ranges(10, 0)


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=1.0)
    low = [policy.delay(n, False, rand=lambda: 0.0) for n in (1, 2, 3, 4, 5, 6)]
    high = [policy.delay(n, False, rand=lambda: 1.0) for n in (1, 2, 3, 4, 5, 6)]
    assert low == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5, 0.5])
    assert high == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    # Throttling (503 SlowDown) starts from a larger step.
    assert policy.delay(1, True, rand=lambda: 1.0) == pytest.approx(0.4)


def test_with_retries_stops_at_the_attempt_count() -> None:
    calls: list[int] = []
    slept: list[float] = []

    def attempt() -> None:
        calls.append(1)
        raise ConnectionResetError("reset")

    with pytest.raises(DownloadFailed, match="after 3 attempts: reset"):
        with_retries(
            attempt,
            RetryPolicy(attempts=3, base_delay=1.0),
            lambda exc: Transient(str(exc)),
            lambda failure, n: DownloadFailed(f"after {n} attempts: {failure.reason}"),
            sleep=slept.append,
        )
    assert len(calls) == 3
    assert len(slept) == 2 and slept[1] > slept[0] * 1.0 - 1e-9


def test_with_retries_final_errors_are_not_retried() -> None:
    calls: list[int] = []

    def attempt() -> None:
        calls.append(1)
        raise KeyError("gone")

    with pytest.raises(NoSuchKey):
        with_retries(
            attempt,
            RetryPolicy(attempts=5),
            lambda exc: NoSuchKey("no such key"),
            lambda failure, n: DownloadFailed("x"),
            sleep=lambda s: None,
        )
    assert calls == [1]


class _Body:
    def __init__(self, data: bytes, cut_after: int | None) -> None:
        self._data = data
        self._pos = 0
        self._cut_after = cut_after

    def readinto(self, buffer: memoryview) -> int:
        limit = len(self._data) if self._cut_after is None else self._cut_after
        if self._pos >= limit:
            if self._cut_after is not None:
                raise ConnectionResetError("connection reset by peer")
            return 0
        n = min(len(buffer), limit - self._pos, 7000)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        pass


class FakeSource:
    """An object in memory; `faults[start]` lists what the next requests for a range starting
    at `start` do: "503", "cut" (half the bytes, then a reset), "short" (half, then EOF) or
    "fatal"."""

    def __init__(self, data: bytes, faults: dict[int, list[str]] | None = None) -> None:
        self.data = data
        self.faults = faults or {}
        self.opened: list[ByteRange] = []
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return len(self.data)

    def open_range(self, byte_range: ByteRange) -> _Body:
        with self._lock:
            self.opened.append(byte_range)
            pending = self.faults.get(byte_range.start, [])
            fault = pending.pop(0) if pending else None
        piece = self.data[byte_range.start : byte_range.end]
        if fault == "503":
            raise OSError("HTTP 503 SlowDown")
        if fault == "fatal":
            raise KeyError("denied")
        if fault == "cut":
            return _Body(piece, cut_after=len(piece) // 2)
        if fault == "short":
            return _Body(piece[: len(piece) // 2], cut_after=None)
        return _Body(piece, cut_after=None)

    def classify(self, exc: Exception) -> StorageError | Transient:
        if isinstance(exc, KeyError):
            return NoSuchKey("access to the fake object denied")
        return Transient(str(exc), throttled="SlowDown" in str(exc))

    def exhausted(self, failure: Transient, attempts: int) -> StorageError:
        return DownloadFailed(f"fake failed after {attempts} attempts: {failure.reason}")


def _options(**kw: int) -> DownloadOptions:
    return DownloadOptions(
        concurrency=kw.get("concurrency", 4),
        chunk_size=kw.get("chunk_size", 100_000),
        read_size=kw.get("read_size", 16_384),
        retry=RetryPolicy(attempts=kw.get("attempts", 3)),
    )


def test_fetch_into_a_file_and_memory(tmp_path: Path) -> None:
    data = os.urandom(1_000_003)
    source = FakeSource(data)
    with Downloader(_options(), sleep=lambda s: None) as downloader:
        with FileSink.create(tmp_path / "out", len(data)) as sink:
            stats = downloader.fetch(source, sink)
        buffer = bytearray(len(data))
        downloader.fetch(FakeSource(data), MemorySink(buffer))
    assert (tmp_path / "out").read_bytes() == data
    assert bytes(buffer) == data
    assert (stats.ranges, stats.requests, stats.retries) == (11, 11, 0)


def test_a_failed_range_is_retried_from_its_first_missing_byte() -> None:
    data = os.urandom(500_000)
    faults = {
        0: ["cut"],
        100_000: ["503", "503"],
        200_000: ["short"],
        # Cut, then cut again on the retry (which starts half-way).
        400_000: ["cut"],
        450_000: ["cut"],
    }
    source = FakeSource(data, {k: list(v) for k, v in faults.items()})
    buffer = bytearray(len(data))
    done: list[int] = []
    with Downloader(_options(), sleep=lambda s: None) as downloader:
        stats = downloader.fetch(source, MemorySink(buffer), done.append)
    assert hashlib.sha256(buffer).digest() == hashlib.sha256(data).digest()
    assert sum(done) == len(data)
    assert stats.retries == 6
    assert stats.requests == 5 + 6
    # Only the failed ranges were asked for again, each from where it broke off.
    again = [r for r in source.opened if r not in plan_ranges(len(data), 100_000)]
    assert ByteRange(50_000, 100_000) in again
    assert ByteRange(250_000, 300_000) in again
    assert ByteRange(450_000, 500_000) in again
    assert ByteRange(475_000, 500_000) in again
    assert source.opened.count(ByteRange(100_000, 200_000)) == 3


def test_too_many_failures_fail_the_download() -> None:
    data = os.urandom(300_000)
    source = FakeSource(data, {100_000: ["503", "503", "503"]})
    with (
        Downloader(_options(attempts=3), sleep=lambda s: None) as downloader,
        pytest.raises(DownloadFailed, match="after 3 attempts: HTTP 503 SlowDown"),
    ):
        downloader.fetch(source, MemorySink(bytearray(len(data))))


def test_a_final_failure_stops_the_other_ranges() -> None:
    data = os.urandom(4_000_000)
    source = FakeSource(data, {0: ["fatal"]})
    with (
        Downloader(_options(concurrency=2), sleep=lambda s: None) as downloader,
        pytest.raises(NoSuchKey, match="denied"),
    ):
        downloader.fetch(source, MemorySink(bytearray(len(data))))
    # 40 ranges planned; the ones not started when the first failed were never requested.
    assert len(source.opened) < 40


def test_empty_object(tmp_path: Path) -> None:
    with (
        Downloader(_options(), sleep=lambda s: None) as downloader,
        FileSink.create(tmp_path / "empty", 0) as sink,
    ):
        stats = downloader.fetch(FakeSource(b""), sink)
    assert stats.requests == 0
    assert (tmp_path / "empty").read_bytes() == b""


def test_file_sink_reserves_the_size(tmp_path: Path) -> None:
    with FileSink.create(tmp_path / "f", 12345) as sink:
        sink.write_at(12340, memoryview(b"tail!"))
        sink.write_at(0, memoryview(b"head"))
        sink.sync()
    content = (tmp_path / "f").read_bytes()
    assert len(content) == 12345
    assert content.startswith(b"head") and content.endswith(b"tail!")


def test_options_are_checked() -> None:
    with pytest.raises(StorageError, match="concurrency must be at least 1"):
        DownloadOptions(concurrency=0)
