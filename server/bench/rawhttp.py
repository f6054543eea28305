"""A lean HTTP/1.1 client for the load loop: one keep-alive connection, one request in flight.

Why not aiohttp in the loop: at concurrency 32 over V2 binary it cost the bench ~150 us of
CPU per request (one core was 59% busy at 3,900 rps), so a server near the batching issue's
target (~9,000 rps on one core) would have been measured against a client at its limit. This
client writes a request encoded once with one `transport.write` and reads the answer with a
bare `asyncio.Protocol`: the status line, the headers, and a body framed by Content-Length
(or chunked). It supports exactly what the load needs and nothing else (no redirects, no
compression, no TLS, no proxies); checks before the load still go through aiohttp.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from ember.server.bench.errors import BenchError


class HttpError(Exception):
    """A broken answer or connection: malformed framing, a reset, or a timeout."""


class Headers(dict[str, str]):
    """Answer headers under lower-case names, looked up without regard to case."""

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes
    keep_alive: bool


def encode_request(
    method: str, base_url: str, path: str, body: bytes | None, headers: Mapping[str, str]
) -> bytes:
    """The whole request on the wire, built once: request line, headers, body."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or not parts.hostname:
        raise BenchError(f"{base_url}: the load client speaks plain http:// only")
    host = parts.netloc
    prefix = parts.path.rstrip("/")
    lines = [f"{method} {prefix}{path} HTTP/1.1", f"Host: {host}"]
    names = {name.lower() for name in headers}
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body is not None and "content-length" not in names:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


def parse_head(head: bytes) -> tuple[int, Headers]:
    """Status and headers of an answer's head (without the blank line that ends it)."""
    status_line, _, rest = head.partition(b"\r\n")
    version, _, tail = status_line.partition(b" ")
    code = tail[:3]
    if not version.startswith(b"HTTP/1.") or not code.isdigit():
        raise HttpError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    headers = Headers()
    for line in rest.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            if line:
                raise HttpError(f"malformed header line: {line[:80]!r}")
            continue
        headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
    return int(code), headers


def dechunk(data: bytes | bytearray) -> tuple[bytes, int] | None:
    """A chunked body from the start of `data`: (body, bytes used), or None if incomplete."""
    pieces: list[bytes] = []
    at = 0
    while True:
        end = data.find(b"\r\n", at)
        if end < 0:
            return None
        size_text = bytes(data[at:end]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpError(f"bad chunk size {size_text[:20]!r}") from None
        start = end + 2
        if size == 0:
            # No trailers are expected: the last chunk ends with one blank line.
            if len(data) < start + 2:
                return None
            if data[start : start + 2] != b"\r\n":
                raise HttpError("trailers after the last chunk are not supported")
            return b"".join(pieces), start + 2
        if len(data) < start + size + 2:
            return None
        pieces.append(bytes(data[start : start + size]))
        at = start + size + 2


class _Connection(asyncio.Protocol):
    """One connection; `request` sends bytes and waits for the one answer they ask for."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._head: tuple[int, Headers] | None = None
        self._body_at = 0
        self._length: int | None = None  # None: chunked
        self._waiter: asyncio.Future[Answer] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP connection's transport is a stream transport (uvloop's as well).
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # One write per request: no Nagle delay waiting for an ACK of the last one.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(HttpError(f"connection closed: {exc or 'by the server'}"))

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        try:
            answer = self._answer()
        except HttpError as exc:
            waiter.set_exception(exc)
            self.close()
            return
        if answer is not None:
            waiter.set_result(answer)

    def _answer(self) -> Answer | None:
        buffer = self._buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return None
            self._head = parse_head(bytes(buffer[:end]))
            self._body_at = end + 4
            headers = self._head[1]
            if "chunked" in (headers.get("transfer-encoding") or "").lower():
                self._length = None
            else:
                length = headers.get("content-length") or "0"
                if not length.isdigit():
                    raise HttpError(f"bad Content-Length {length!r}")
                self._length = int(length)
        status, headers = self._head
        start = self._body_at
        if self._length is None:
            found = dechunk(memoryview(buffer)[start:].tobytes())
            if found is None:
                return None
            body, used = found
            end = start + used
        else:
            end = start + self._length
            if len(buffer) < end:
                return None
            body = bytes(buffer[start:end])
        del buffer[:end]
        self._head = None
        keep_alive = (headers.get("connection") or "").lower() != "close"
        return Answer(status, headers, body, keep_alive)

    async def request(self, wire: bytes, timeout: float) -> Answer:
        transport = self._transport
        if transport is None or self.closed:
            raise HttpError("connection closed")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Answer] = loop.create_future()
        self._waiter = waiter
        transport.write(wire)
        timer = loop.call_later(timeout, _expire, waiter, timeout)
        try:
            answer = await waiter
        except BaseException:
            # A timeout or a broken answer leaves the connection in an unknown state.
            self.close()
            raise
        finally:
            timer.cancel()
            self._waiter = None
        if not answer.keep_alive:
            self.close()
        return answer

    def close(self) -> None:
        self.closed = True
        self._head = None
        self._buffer.clear()
        if self._transport is not None:
            self._transport.close()


def _expire(waiter: asyncio.Future[Answer], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"no answer in {timeout:g} s"))


class Client:
    """One worker's connection to `base_url`, opened on first use and again after the server
    closed it (a refusal may come with `Connection: close`)."""

    def __init__(self, base_url: str, timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise BenchError(f"{base_url}: the load client speaks plain http:// only")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._timeout = timeout
        self._connection: _Connection | None = None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await asyncio.wait_for(
            loop.create_connection(_Connection, self._host, self._port), self._timeout
        )
        return protocol

    async def send(self, wire: bytes) -> Answer:
        connection = self._connection
        if connection is None or connection.closed:
            connection = self._connection = await self._connect()
        return await connection.request(wire, self._timeout)

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
