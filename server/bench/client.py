"""The HTTP side of the load: one aiohttp session, and so one keep-alive connection, per worker.

Everything a request needs (URL, headers, body) is built once; a request in the loop only
sends bytes and reads the answer, so the client adds as little as it can to what is measured.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from ember.server.bench.load import Call


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
    `verify`, checks each 200 answer."""
    # A pre-built, already-encoded URL: aiohttp does not parse it again on every request.
    url = URL(base_url.rstrip("/") + request.path, encoded=True)
    async with _session(timeout, connections=1) as session:

        async def call() -> None:
            status, headers, payload = await _send(session, url, request)
            if status != 200:
                raise BadStatus(f"HTTP {status}: {payload[:200].decode(errors='replace')}")
            if verify is not None:
                verify(headers, payload)

        yield call


async def fetch(
    base_url: str, request: HttpRequest, timeout: float
) -> tuple[int, Mapping[str, str], bytes]:
    """Send `request` once on a fresh connection; for checks before the load starts."""
    url = URL(base_url.rstrip("/") + request.path, encoded=True)
    async with _session(timeout, connections=1) as session:
        return await _send(session, url, request)
