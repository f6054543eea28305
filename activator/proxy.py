"""HTTP/1.1 forwarding to one replica: a keep-alive pool, bodies passed through as bytes,
hop-by-hop headers dropped, `X-Forwarded-For` added."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from ember.activator.errors import UpstreamFailed

# RFC 9110 7.6.1, plus the framing headers each client writes itself (aiohttp also its Host).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)

# Bodies up to this size are read before forwarding, so a request whose connection fails
# before any response byte can be sent again to another replica; larger ones are streamed.
REPLAYABLE_BYTES = 4 * 1024 * 1024
# Answers up to this size are sent to the client in one piece.
_WHOLE_ANSWER_BYTES = 1024 * 1024
# aiohttp 3.10 and later tell a connect timeout from the others; 3.9 does not.
_CONNECT_TIMEOUT: tuple[type[Exception], ...] = tuple(
    t for t in (getattr(aiohttp, "ConnectionTimeoutError", None),) if t is not None
)


class ConnectFailed(Exception):
    """No response byte came back from the replica; `replayable` says whether the request may
    be sent again (its body was not consumed)."""

    def __init__(self, message: str, replayable: bool) -> None:
        super().__init__(message)
        self.replayable = replayable


def forward_headers(
    raw: Iterable[tuple[bytes, bytes]], client: str | None
) -> list[tuple[str, str]]:
    """The client's headers as a replica should see them."""
    listed: set[bytes] = set()
    kept: list[tuple[bytes, bytes]] = []
    forwarded_for: bytes | None = None
    for name, value in raw:
        lowered = name.lower()
        if lowered == b"connection":
            listed.update(v.strip().lower() for v in value.split(b","))
        elif lowered == b"x-forwarded-for":
            forwarded_for = value if forwarded_for is None else forwarded_for + b", " + value
        elif lowered not in HOP_BY_HOP:
            kept.append((lowered, value))
    headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in kept if n not in listed]
    if client:
        chain = f"{forwarded_for.decode('latin-1')}, {client}" if forwarded_for else client
        headers.append(("x-forwarded-for", chain))
    elif forwarded_for:
        headers.append(("x-forwarded-for", forwarded_for.decode("latin-1")))
    return headers


def answer_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    listed: set[bytes] = set()
    kept: list[tuple[bytes, bytes]] = []
    for name, value in raw:
        lowered = name.lower()
        if lowered == b"connection":
            listed.update(v.strip().lower() for v in value.split(b","))
        elif lowered not in HOP_BY_HOP or lowered == b"content-length":
            kept.append((lowered, value))
    return [(n, v) for n, v in kept if n not in listed]


def _is_encoded(path_qs: str) -> bool:
    """A request target yarl can send untouched: printable ASCII, no space."""
    return path_qs.isascii() and path_qs.isprintable() and " " not in path_qs


@dataclass(slots=True)
class Upstream:
    """One forwarded request, as the client sent it."""

    method: str
    path_qs: str
    headers: list[tuple[str, str]]
    body: bytes | None  # None: streamed from `stream`
    stream: Callable[[], AsyncIterator[bytes]] | None = None
    client_gone: bool = False  # the client disconnected before its answer started


Send = Callable[[dict[str, Any]], Awaitable[None]]


class HttpPool:
    """Keep-alive connections to every replica (aiohttp's pool, one per activator)."""

    def __init__(self, connect_timeout: float = 5.0) -> None:
        self.connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None, force_close=False),
                # The client's body and encoding pass through untouched.
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def forward(
        self,
        address: str,
        request: Upstream,
        send: Send,
        timeout: float,
        extra_headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    ) -> int:
        """Send `request` to the replica at host:port and stream its answer through `send`
        (ASGI messages). Returns the replica's status. Raises ConnectFailed when nothing came
        back."""
        consumed = False
        data: Any = request.body
        if data is None and request.stream is not None:
            source = request.stream

            async def body() -> AsyncIterator[bytes]:
                nonlocal consumed
                consumed = True
                async for chunk in source():
                    yield chunk

            data = body()
        # The request target as the client sent it: yarl would otherwise normalise it (%2F in a
        # query string becomes '/', %7E becomes '~').
        target = f"http://{address}{request.path_qs}"
        url = URL(target, encoded=True) if _is_encoded(request.path_qs) else URL(target)
        client_timeout = aiohttp.ClientTimeout(
            total=max(0.001, timeout), sock_connect=self.connect_timeout
        )
        try:
            response = await self._client().request(
                request.method,
                url,
                headers=request.headers,
                data=data,
                timeout=client_timeout,
                allow_redirects=False,
                compress=None,
            )
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            # A connect timeout (sock_connect: a replica that is gone, its SYNs dropped) sent
            # nothing, like a refused connection; other timeouts end the request.
            timed_out = isinstance(exc, aiohttp.ServerTimeoutError)
            if timed_out and not isinstance(exc, _CONNECT_TIMEOUT):
                raise
            raise ConnectFailed(f"{address}: {exc or type(exc).__name__}", not consumed) from exc
        async with response:
            headers = answer_headers(response.raw_headers)
            headers.extend(extra_headers)
            length = response.content_length
            if length is not None and length <= _WHOLE_ANSWER_BYTES:
                try:
                    payload = await response.read()
                except aiohttp.ClientPayloadError as exc:
                    # Nothing has reached the client yet: it still gets a clean 502.
                    raise UpstreamFailed(f"replica {address} broke off its answer: {exc}") from exc
                await send({"type": "http.response.start", "status": response.status,
                            "headers": headers})  # fmt: skip
                await send({"type": "http.response.body", "body": payload})
                return response.status
            await send({"type": "http.response.start", "status": response.status,
                        "headers": headers})  # fmt: skip
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return response.status
