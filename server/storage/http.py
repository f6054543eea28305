"""One file over HTTP(S): parallel ranged GETs when the server allows them, one GET otherwise.

A first `GET` with `Range: bytes=0-0` learns the size, the validator (ETag or Last-Modified) and
whether ranges work, and follows redirects (a HEAD would be turned into a GET of the whole body
by urllib's redirect handling). Each later range carries `If-Match` (a strong ETag) or `If-Range`
(a date), so a file replaced mid-download fails instead of mixing versions.
"""

from __future__ import annotations

import http.client
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from ember.server.storage.download import (
    ByteRange,
    Downloader,
    DownloadOptions,
    FetchStats,
    Progress,
    RangeBody,
)
from ember.server.storage.errors import (
    AccessDenied,
    DownloadFailed,
    EndpointUnreachable,
    NoSuchKey,
    ObjectChanged,
    StorageError,
)
from ember.server.storage.retry import Transient, with_retries
from ember.server.storage.sinks import Sink
from ember.server.storage.uri import redacted

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


@dataclass(frozen=True, slots=True)
class HttpObject:
    # After redirects.
    url: str
    size: int
    # A strong ETag as the server sent it (quotes included), or None.
    etag: str | None
    last_modified: str | None
    ranged: bool

    @property
    def version(self) -> str | None:
        """What identifies this version of the file, if the server says."""
        return self.etag or self.last_modified


class HttpStore:
    def __init__(
        self,
        options: DownloadOptions,
        *,
        timeout: float = 30.0,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.options = options
        self.timeout = timeout
        self._sleep = sleep
        self._downloader = Downloader(options, sleep=sleep)

    def cancel(self) -> None:
        """Stop the downloads in progress (from any thread)."""
        self._downloader.cancel()

    def close(self) -> None:
        self._downloader.close()

    def __enter__(self) -> HttpStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def probe(self, url: str) -> HttpObject:
        where = _Where(url)

        def attempt() -> HttpObject:
            request = urllib.request.Request(url, headers={"Range": "bytes=0-0"})
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                headers = reply.headers
                etag = headers.get("ETag")
                strong = etag if etag and not etag.startswith("W/") else None
                match = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", ""))
                if reply.status == 206 and match is not None:
                    size, ranged = int(match.group(3)), True
                elif headers.get("Content-Length") is not None:
                    size, ranged = int(headers["Content-Length"]), False
                else:
                    raise DownloadFailed(f"{where}: the server sent no Content-Length")
                return HttpObject(
                    reply.geturl(), size, strong, headers.get("Last-Modified"), ranged
                )

        return with_retries(
            attempt, self.options.retry, where.classify, where.exhausted, sleep=self._sleep
        )

    def download(self, obj: HttpObject, sink: Sink, progress: Progress | None = None) -> FetchStats:
        source = _HttpRanges(obj, self.timeout)
        return self._downloader.fetch(source, sink, progress, whole=not obj.ranged)

    def read(self, obj: HttpObject, byte_range: ByteRange) -> bytearray:
        """One range of `obj` into memory; the server must take ranges (`obj.ranged`)."""
        return self._downloader.read(_HttpRanges(obj, self.timeout), byte_range)


@dataclass(frozen=True, slots=True)
class _Where:
    url: str

    def __str__(self) -> str:
        return redacted(self.url)

    def classify(self, exc: Exception) -> StorageError | Transient:
        if isinstance(exc, urllib.error.HTTPError):
            status = exc.code
            if status == 404:
                return NoSuchKey(f"{self}: HTTP 404 Not Found")
            if status in (401, 403):
                return AccessDenied(f"{self}: HTTP {status} {exc.reason}")
            if status in (412, 416):
                return ObjectChanged(f"{self} changed during download; pull again")
            if status >= 500 or status == 429:
                return Transient(f"HTTP {status} {exc.reason}", throttled=status in (429, 503))
            return DownloadFailed(f"{self}: HTTP {status} {exc.reason}")
        if isinstance(exc, urllib.error.URLError):
            reason = exc.reason
            unreachable = isinstance(
                reason, ConnectionRefusedError | socket.gaierror | TimeoutError
            )
            return Transient(str(reason), unreachable=unreachable)
        if isinstance(exc, OSError | http.client.HTTPException):
            return Transient(f"{type(exc).__name__}: {exc}")
        return DownloadFailed(f"{self}: {type(exc).__name__}: {exc}")

    def exhausted(self, failure: Transient, attempts: int) -> StorageError:
        if failure.unreachable:
            return EndpointUnreachable(
                f"cannot reach {self} after {attempts} attempts: {failure.reason}"
            )
        return DownloadFailed(f"{self} failed after {attempts} attempts: {failure.reason}")


class _HttpRanges:
    def __init__(self, obj: HttpObject, timeout: float) -> None:
        self._obj = obj
        self._timeout = timeout
        self._where = _Where(obj.url)

    @property
    def size(self) -> int:
        return self._obj.size

    def open_range(self, byte_range: ByteRange) -> RangeBody:
        obj = self._obj
        headers: dict[str, str] = {}
        if obj.ranged:
            headers["Range"] = byte_range.header()
            if obj.etag:
                headers["If-Match"] = obj.etag
            elif obj.last_modified:
                headers["If-Range"] = obj.last_modified
        reply = urllib.request.urlopen(
            urllib.request.Request(obj.url, headers=headers), timeout=self._timeout
        )
        try:
            self._check(reply, byte_range)
        except BaseException:
            reply.close()
            raise
        return cast(RangeBody, reply)

    def _check(self, reply: http.client.HTTPResponse, byte_range: ByteRange) -> None:
        obj = self._obj
        etag = reply.headers.get("ETag")
        if obj.etag and etag and etag != obj.etag:
            raise ObjectChanged(f"{self._where} changed during download; pull again")
        if not obj.ranged:
            # No ranges: a retry starts from the top and skips what is already in place.
            skip = byte_range.start
            while skip:
                dropped = len(reply.read(min(skip, 1 << 20)))
                if not dropped:
                    raise ConnectionResetError("connection closed while skipping")
                skip -= dropped
            return
        match = _CONTENT_RANGE.fullmatch(reply.headers.get("Content-Range", ""))
        if reply.status != 206 or match is None:
            # If-Range answers 200 with the whole file when the date no longer matches.
            raise ObjectChanged(f"{self._where} changed during download; pull again")
        first, last, total = (int(g) for g in match.groups())
        if total != obj.size:
            raise ObjectChanged(f"{self._where} changed during download; pull again")
        if first != byte_range.start or last != byte_range.end - 1:
            raise DownloadFailed(
                f"{self._where}: asked for {byte_range.header()}, got {first}-{last}"
            )

    def classify(self, exc: Exception) -> StorageError | Transient:
        return self._where.classify(exc)

    def exhausted(self, failure: Transient, attempts: int) -> StorageError:
        return self._where.exhausted(failure, attempts)
