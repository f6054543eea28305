"""Bounds on a request's head (request line and headers) for uvicorn's httptools protocol.

httptools has no limit of its own: it collects a header value however long it is, and
uvicorn keeps every header in a list, so 100,000 headers or one 8 MB value were read whole
before anything looked at them. Here a head over `max_header_bytes`, or with more than
`max_headers` headers, is answered 431 and the connection closed, as soon as the excess is
seen: at most one read's worth of bytes past the limit is ever held.

Mixed into the predictor's and the activator's protocol classes, which call `_head_begins()`
and `_head_ends()` from their own `on_message_begin` and `on_headers_complete`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_HEADERS = 100
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
LINGER_S = 2.0


@dataclass(frozen=True, slots=True)
class HeadLimits:
    max_headers: int = DEFAULT_MAX_HEADERS
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES


DEFAULT_LIMITS = HeadLimits()


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing; the 431 is already written."""


class HeadLimited:
    """The mixin. Expects uvicorn's HttpToolsProtocol attributes (`parser`, `transport`,
    `url`, `headers`, `server_state`)."""

    # Set by the subclass's __init__ through `_limit_heads`.
    _limits: HeadLimits = DEFAULT_LIMITS
    _in_head = True
    _head_fed = 0
    _head_bytes = 0
    _refused = False

    def _limit_heads(self, limits: HeadLimits) -> None:
        self._limits = limits

    def _head_begins(self) -> None:
        self._in_head = True
        self._head_fed = 0
        self._head_bytes = 0

    def _head_ends(self) -> None:
        self._in_head = False

    # --- protocol hooks --------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)  # type: ignore[misc]
        if self._in_head and not self._refused:
            # Headers still incomplete after this read: httptools holds what it has so far.
            self._head_fed += len(data)
            if self._head_fed > self._limits.max_header_bytes:
                self._refuse_head("request headers")

    def on_url(self, url: bytes) -> None:
        super().on_url(url)  # type: ignore[misc]
        if len(self.url) > self._limits.max_header_bytes:  # type: ignore[attr-defined]
            self._refuse_head("request line")
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        headers: list[Any] = self.headers  # type: ignore[attr-defined]
        if not headers:
            self._head_bytes = len(self.url)  # type: ignore[attr-defined]
        self._head_bytes += len(name) + len(value) + 4
        if len(headers) >= self._limits.max_headers:
            self._refuse_head(f"more than {self._limits.max_headers} headers")
            raise _HeadTooLarge
        if self._head_bytes > self._limits.max_header_bytes:
            self._refuse_head("request headers")
            raise _HeadTooLarge
        super().on_header(name, value)  # type: ignore[misc]

    def send_400_response(self, msg: str) -> None:
        # httptools reports our stop as a callback error, which uvicorn answers 400: the
        # 431 has already gone out.
        if not self._refused:
            super().send_400_response(msg)  # type: ignore[misc]

    def _refuse_head(self, what: str) -> None:
        if self._refused:
            return
        self._refused = True
        limits = self._limits
        message = (
            f'{{"error": "{what} too large: at most {limits.max_headers} headers and '
            f'{limits.max_header_bytes} bytes of request line and headers"}}'
        ).encode()
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(message)).encode() + b"\r\n"
            b"connection: close\r\n\r\n"
        )
        transport = self.transport  # type: ignore[attr-defined]
        transport.write(head + message)
        if transport.can_write_eof():
            # A lingering close: the client is likely still sending the rest of its head,
            # and closing on unread data would send a reset that can destroy the 431 before
            # it is read. Half-close, drop what still arrives, close for good shortly after.
            transport.write_eof()
            asyncio.get_running_loop().call_later(LINGER_S, transport.close)
        else:
            transport.close()
