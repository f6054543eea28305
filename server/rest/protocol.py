"""uvicorn's HTTP/1.1 protocol, with inference requests answered at the socket.

Under load the ASGI layer costs more than the inference work around it: per request uvicorn
builds a scope, an `asyncio.Event`, receive/send coroutines and a header list, and the reply
goes through two ASGI messages and its header checks (py-spy, `ember bench` at c=32: 36% of
the event loop's time). For the inference routes this protocol skips all of that: a request
that cannot be queued (unknown model, not ready, queue full, body too large) is refused from
its headers, in the parser callback itself; otherwise the body is collected by the parser's
callbacks, one task asks `InferEndpoints.answer_admitted` (where the ASGI front ends too) and the
reply is written as one buffer. Every other request, and any request pipelined behind another
on the same connection, takes uvicorn's own path unchanged, so FastAPI routes, pipelining
order, flow control and graceful shutdown behave exactly as uvicorn's.

It relies on the attributes `HttpToolsProtocol` keeps per request (`url`, `headers`,
`cycle`, `expect_100_continue`); pyproject pins uvicorn to the minor release this was
written against.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from ember.server.rest.front import InferFront
from ember.server.rest.header_limits import DEFAULT_LIMITS, HeadLimited, HeadLimits
from ember.server.rest.infer import Reply, Route, over_limit, route, too_large

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_ROUTES_KEPT = 1024
_UNSEEN = object()


class _Signal:
    """Stands in for the `asyncio.Event` uvicorn sets on a cycle: nothing waits on it here."""

    __slots__ = ()

    def set(self) -> None:
        pass


_SIGNAL = _Signal()


class _Exchange:
    """One inference request on this connection, shaped like uvicorn's RequestResponseCycle
    where uvicorn itself looks (`connection_lost`, `shutdown`, pipelining)."""

    __slots__ = ("chunks", "disconnected", "headers", "keep_alive", "response_complete", "route",
                 "size")  # fmt: skip
    message_event = _SIGNAL

    def __init__(self, where: Route, headers: dict[str, str], keep_alive: bool) -> None:
        self.route = where
        self.headers = headers
        self.keep_alive = keep_alive
        self.chunks: list[bytes] = []
        self.size = 0
        self.disconnected = False
        self.response_complete = False

    def body(self) -> bytes:
        chunks = self.chunks
        if len(chunks) == 1:
            return chunks[0]
        return b"".join(chunks)


class InferProtocol(HeadLimited, HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HeadLimits = DEFAULT_LIMITS,
        front: InferFront,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limit_heads(limits)
        self._endpoints = front.endpoints
        self._limit = front.max_body_bytes
        self._routes = front.routes

    # --- parser callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._head_begins()
        # uvicorn builds the ASGI scope here (a dict, a copy of the app state); an inference
        # request never needs one, so it is built only for the requests that go to ASGI.
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def on_headers_complete(self) -> None:
        self._head_ends()
        where = self._inference_route()
        if where is None:
            url, received, expect = self.url, self.headers, self.expect_100_continue
            super().on_message_begin()
            self.url, self.expect_100_continue = url, expect
            self.headers.extend(received)  # the list the new scope holds
            super().on_headers_complete()
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers}
        http_version = self.parser.get_http_version()
        keep_alive = http_version != "1.0" and self.parser.should_keep_alive()
        exchange = _Exchange(where, headers, keep_alive)
        self.cycle = exchange  # type: ignore[assignment]
        error = too_large(headers.get("content-length"), self._limit)
        if error is not None:
            self._refuse(exchange, self._endpoints.refuse(where, error))
            return
        refused = self._endpoints.admit(where)
        if refused is not None:
            # Answered from the headers alone, without waiting for the loop's backlog: under
            # overload a 429 costs this much and no more. The body that follows is dropped;
            # a client waiting for 100-continue may never send it, so that one is closed.
            if self.expect_100_continue:
                self._refuse(exchange, refused)
            else:
                self._write(exchange, refused)
            return
        if self.expect_100_continue:
            self.transport.write(_CONTINUE)

    def _inference_route(self) -> Route | None:
        if self.parser.get_method() != b"POST" or self.parser.should_upgrade():
            return None
        current = self.cycle
        if current is not None and not current.response_complete:
            return None  # pipelined behind an unanswered request: uvicorn queues it in order
        url = self.url
        found = self._routes.get(url, _UNSEEN)
        if found is _UNSEEN:
            path = httptools.parse_url(url).path
            # Percent-encoded names take uvicorn's path, which decodes them.
            found = None if b"%" in path else route("POST", path.decode("latin-1"))
            if len(self._routes) >= _ROUTES_KEPT:
                self._routes.clear()  # a scan of made-up URLs cannot grow it without bound
            self._routes[url] = found
        return found  # type: ignore[return-value]

    def on_body(self, body: bytes) -> None:
        exchange = self.cycle
        if not isinstance(exchange, _Exchange):
            super().on_body(body)
            return
        if exchange.response_complete:
            return  # refused already; the connection is closing
        exchange.size += len(body)
        if exchange.size > self._limit:
            error = over_limit(self._limit)
            self._refuse(exchange, self._endpoints.refuse(exchange.route, error))
            return
        exchange.chunks.append(body)

    def on_message_complete(self) -> None:
        exchange = self.cycle
        if not isinstance(exchange, _Exchange):
            super().on_message_complete()
            return
        if exchange.response_complete:
            return
        task = self.loop.create_task(self._answer(exchange))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- answering ----------------------------------------------------------------------
    async def _answer(self, exchange: _Exchange) -> None:
        body = exchange.body()
        exchange.chunks = []
        # Admitted already, from the headers (on_headers_complete).
        reply = await self._endpoints.answer_admitted(exchange.route, exchange.headers, body)
        self._write(exchange, reply)

    def _refuse(self, exchange: _Exchange, reply: Reply) -> None:
        # The rest of the body is not read: answer now and close, as uvicorn does for a
        # request it cannot parse.
        exchange.keep_alive = False
        self._write(exchange, reply)

    def _write(self, exchange: _Exchange, reply: Reply) -> None:
        if exchange.response_complete:
            return
        exchange.response_complete = True
        if exchange.disconnected or self.transport.is_closing():
            return
        size = len(reply)
        head: list[bytes | memoryview] = [STATUS_LINE[reply.status]]
        for name, value in self.server_state.default_headers:
            head += (name, b": ", value, b"\r\n")
        head.append(
            b"content-type: %s\r\ncontent-length: %d\r\n" % (reply.content_type.encode(), size)
        )
        for name_str, value_str in reply.headers:
            head += (name_str.encode(), b": ", value_str.encode(), b"\r\n")
        if not exchange.keep_alive:
            head.append(b"connection: close\r\n")
        head += (b"\r\n", reply.body)
        if reply.one_write:
            head += reply.tail
            self.transport.write(b"".join(head))
        else:
            self.transport.write(b"".join(head))
            for chunk in reply.tail:
                self.transport.write(chunk)
        if not exchange.keep_alive:
            self.transport.close()
        self.on_response_complete()
