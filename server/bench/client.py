"""The HTTP side of the load: one keep-alive connection per worker.

Everything a request needs (URL, headers, body) is encoded once; a request in the loop only
sends bytes and reads the answer, so the client adds as little as it can to what is measured.
The loop's workers use the lean client of `rawhttp`; the checks before the load (`fetch`) use
aiohttp, a full client, so a server that only works with the lean one is caught.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from ember.server.bench.load import Call, RetryCall
from ember.server.bench.rawhttp import Client, encode_request

# The status an overloaded server refuses with (Triton, KServe: a full queue).
TOO_MANY_REQUESTS = 429


class BadStatus(Exception):
    """An answer other than 200; the message holds the start of the body."""


class BadAnswer(Exception):
    """A 200 whose body is not what the protocol promised (sizes, framing)."""


# Checks one 200 answer (headers, body) and raises `BadAnswer`; as cheap as it can be, since
# it runs inside the measured latency.
Verify = Callable[[Mapping[str, str], bytes], None]


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request, prepared once and sent many times."""

    method: str
    path: str
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


def _session(timeout: float, connections: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=connections, ttl_dns_cache=None)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        # No User-Agent or Accept-Encoding negotiation: fewer bytes, no decompression path.
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        auto_decompress=False,
    )


async def _send(
    session: aiohttp.ClientSession, url: URL, request: HttpRequest
) -> tuple[int, Mapping[str, str], bytes]:
    async with session.request(
        request.method, url, data=request.body, headers=request.headers
    ) as response:
        # The body is always read to the end: the connection can only be reused after it.
        return response.status, response.headers, await response.read()


@asynccontextmanager
async def http_worker(
    base_url: str, request: HttpRequest, timeout: float, verify: Verify | None = None
) -> AsyncIterator[Call]:
    """A worker with its own connection, yielding a call that sends `request` once and, with
    `verify`, checks each 200 answer. The loop's client is `rawhttp` (see there for why)."""
    wire = encode_request(request.method, base_url, request.path, request.body, request.headers)
    client = Client(base_url, timeout)
    try:

        async def call() -> None:
            answer = await client.send(wire)
            if answer.status != 200:
                text = answer.body[:200].decode(errors="replace")
                raise BadStatus(f"HTTP {answer.status}: {text}")
            if verify is not None:
                verify(answer.headers, answer.body)

        yield call
    finally:
        client.close()


def retry_after_seconds(value: str | None) -> float:
    """Seconds a Retry-After header asks for; infinity when it is absent or not a number of
    seconds (an HTTP date, say), so that the caller's cap decides."""
    if value is None:
        return math.inf
    try:
        seconds = float(value.strip())
    except ValueError:
        return math.inf
    return seconds if seconds >= 0 and math.isfinite(seconds) else math.inf


@asynccontextmanager
async def http_retry_worker(
    base_url: str, request: HttpRequest, timeout: float, verify: Verify | None = None
) -> AsyncIterator[RetryCall]:
    """Like `http_worker`, for the overload level: a 429 is an answer, not a failure; the
    call returns its Retry-After in seconds (None for a 200)."""
    wire = encode_request(request.method, base_url, request.path, request.body, request.headers)
    client = Client(base_url, timeout)
    try:

        async def call() -> float | None:
            answer = await client.send(wire)
            if answer.status == TOO_MANY_REQUESTS:
                return retry_after_seconds(answer.headers.get("Retry-After"))
            if answer.status != 200:
                text = answer.body[:200].decode(errors="replace")
                raise BadStatus(f"HTTP {answer.status}: {text}")
            if verify is not None:
                verify(answer.headers, answer.body)
            return None

        yield call
    finally:
        client.close()


async def fetch(
    base_url: str, request: HttpRequest, timeout: float
) -> tuple[int, Mapping[str, str], bytes]:
    """Send `request` once on a fresh connection; for checks before the load starts."""
    url = URL(base_url.rstrip("/") + request.path, encoded=True)
    async with _session(timeout, connections=1) as session:
        return await _send(session, url, request)
