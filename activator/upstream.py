"""A lean HTTP/1.1 client to replicas for requests whose body is already in memory: keep-alive
connections per replica, one request in flight on each, the answer parsed by httptools and
kept whole.

Why not aiohttp here: it cost the activator ~120 us of CPU per forwarded request (py-spy,
`ember bench --compare activator`, c=32), a third of its loop, for features a hop to a replica
on the same network never uses (redirects, cookies, compression, proxies, TLS). Streamed
bodies (over `proxy.REPLAYABLE_BYTES`, or chunked) still go through aiohttp (`proxy.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import httptools

from ember.activator import proxy
from ember.activator.proxy import ConnectFailed

# The client's Host is kept here; the body is here already (the front answered any
# 100-continue itself), so Expect is not passed on.
HOP_BY_HOP = (proxy.HOP_BY_HOP - {b"host"}) | {b"expect"}

_IDLE_KEPT = 256  # per replica: enough for every slot of a busy one


@dataclass(slots=True)
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]  # as the replica sent them, minus hop-by-hop ones
    body: bytes


def encode_request(
    method: bytes,
    target: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    client: str | None,
    host: str,
) -> bytes:
    """The request as one buffer for a replica: hop-by-hop headers (and those the client's
    Connection header names) dropped, Content-Length set, the client added to
    X-Forwarded-For; the client's Host kept (`host` when it sent none)."""
    kept: list[tuple[bytes, bytes]] = []
    named: set[bytes] = set()
    forwarded: list[bytes] = []
    has_host = False
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"host":
            has_host = True
            kept.append((name, value))
        elif lowered == b"connection":
            named.update(v.strip().lower() for v in value.split(b","))
        elif lowered == b"x-forwarded-for":
            forwarded.append(value)
        elif lowered not in HOP_BY_HOP:
            kept.append((name, value))
    if client:
        forwarded.append(client.encode("latin-1"))
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    if not has_host:
        parts += (b"host: ", host.encode("latin-1"), b"\r\n")
    for name, value in kept:
        if name.lower() not in named:
            parts += (name, b": ", value, b"\r\n")
    if forwarded:
        parts += (b"x-forwarded-for: ", b", ".join(forwarded), b"\r\n")
    parts.append(b"content-length: %d\r\n\r\n" % len(body))
    parts.append(body)
    return b"".join(parts)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a replica; one request at a time."""

    _loop: asyncio.AbstractEventLoop  # set when connected

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Answer] | None = None
        self.received = False  # any byte of the current answer
        self.closed = False
        self.keep_alive = True
        self._headers: list[tuple[bytes, bytes]] = []
        self._named: set[bytes] = set()
        self._body: list[bytes] = []

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Kept for the exchanges: get_running_loop() makes a getpid() system call each time.
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"not HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            if not self.received:
                self._fail(ConnectFailed("connection closed before any response byte", True))
            else:
                # A body framed by the connection's end is complete now.
                with contextlib.suppress(httptools.HttpParserError):
                    self.parser.feed_data(b"")
                self._fail(ConnectionError("connection closed in the middle of it"))

    # -- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"connection":
            self._named.update(v.strip().lower() for v in value.split(b","))
        elif lowered not in HOP_BY_HOP:
            self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._headers, self._named, self._body = [], set(), []
            return
        self.keep_alive = self.parser.should_keep_alive()
        headers = [(n, v) for n, v in self._headers if n.lower() not in self._named]
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        answer = Answer(status, headers, body)
        self._headers, self._named, self._body = [], set(), []
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(answer)

    # -- use -----------------------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        self.keep_alive = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, request: bytes, deadline: float | None = None) -> Answer:
        """Send `request` and wait for its answer; TimeoutError at `deadline` (the loop's
        clock). One timer, not asyncio.timeout_at: that costs a task lookup and two
        get_running_loop() calls per request."""
        assert self.transport is not None
        self.received = False
        loop = self._loop
        waiter: asyncio.Future[Answer] = loop.create_future()
        self.waiter = waiter
        timer = None if deadline is None else loop.call_at(deadline, self._expire, waiter)
        self.transport.write(request)
        try:
            return await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    @staticmethod
    def _expire(waiter: asyncio.Future[Answer]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())

    def close(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()


class ReplicaClient:
    """Idle keep-alive connections to every replica, by host:port."""

    def __init__(self, connect_timeout: float = 5.0) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[str, list[_Connection]] = {}

    async def send(self, address: str, request: bytes, deadline: float | None = None) -> Answer:
        """One request to the replica at `address`. Raises ConnectFailed when nothing came
        back (the request may be sent elsewhere), ConnectionError when the answer broke off,
        TimeoutError at `deadline` (the loop's clock)."""
        connection = self._take(address)
        try:
            answer = None
            if connection is not None:
                try:
                    answer = await connection.exchange(request, deadline)
                except ConnectFailed:
                    # A kept connection the replica had just closed: one fresh connection more.
                    connection.close()
                    connection = None
            if answer is None:
                if deadline is None:
                    connection = await self._connect(address)
                else:
                    async with asyncio.timeout_at(deadline):
                        connection = await self._connect(address)
                answer = await connection.exchange(request, deadline)
        except ConnectionError as exc:
            if connection is not None:
                connection.close()
            raise ConnectionError(f"replica {address} broke off its answer ({exc})") from None
        except BaseException:
            if connection is not None:
                connection.close()  # timed out or cancelled: its state is unknown
            raise
        assert connection is not None  # an answer came on it
        if connection.keep_alive and not connection.closed:
            idle = self._idle.setdefault(address, [])
            if len(idle) < _IDLE_KEPT:
                idle.append(connection)
            else:
                connection.close()
        else:
            connection.close()
        return answer

    def _take(self, address: str) -> _Connection | None:
        idle = self._idle.get(address)
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        return None

    async def _connect(self, address: str) -> _Connection:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(_Connection, host.strip("[]"), int(port))
        except (OSError, TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect to {address}: {exc}", True) from None
        return protocol

    def prune(self, live: set[str]) -> None:
        """Close the idle connections to replicas no longer in rotation (`live`): each cold
        start brings a new port, so they would otherwise pile up for the activator's life."""
        for address in [a for a in self._idle if a not in live]:
            self.forget(address)

    def forget(self, address: str) -> None:
        """Close the idle connections to a replica that left the rotation."""
        for connection in self._idle.pop(address, []):
            connection.close()

    def close(self) -> None:
        for address in list(self._idle):
            self.forget(address)
