"""uvicorn's HTTP/1.1 protocol, with requests for a model forwarded at the socket.

The activator's own work per request is small next to what the ASGI layer around it costs
(scope, receive/send coroutines, header checks: a quarter of its loop at c=32). A request for
a model with its whole body announced (Content-Length up to `proxy.REPLAYABLE_BYTES`, or no
body) is collected by the parser callbacks and answered by one task through
`ActivatorApp.answer` (the call the ASGI path makes too), written as one buffer. Everything
else (server-level paths, chunked or large bodies, requests pipelined behind an unanswered
one, upgrades) takes uvicorn's own path unchanged. Like `ember.server.rest.protocol`, it relies
on the per-request attributes of `HttpToolsProtocol` (uvicorn is pinned in pyproject).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from ember.activator.proxy import REPLAYABLE_BYTES
from ember.activator.routes import is_model_ready_path, model_of_path
from ember.server.rest.header_limits import DEFAULT_LIMITS, HeadLimited, HeadLimits

if TYPE_CHECKING:
    from ember.activator.app import ActivatorApp, Reply

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _NoWaiter:
    """Stands in for the `asyncio.Event` uvicorn sets on a cycle: nothing waits on it here.
    (Not shared with `ember.server.rest.protocol`: importing that module loads torch.)"""

    __slots__ = ()

    def set(self) -> None:
        pass


NO_WAITER = _NoWaiter()


class _Exchange:
    """One forwarded request on this connection, shaped like uvicorn's RequestResponseCycle
    where uvicorn itself looks (`connection_lost`, `shutdown`, pipelining)."""

    __slots__ = ("chunks", "disconnected", "headers", "keep_alive", "method", "model",
                 "response_complete", "target", "task")  # fmt: skip
    message_event = NO_WAITER

    def __init__(
        self,
        model: str,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
    ) -> None:
        self.model = model
        self.method = method
        self.target = target
        self.headers = headers
        self.keep_alive = keep_alive
        self.chunks: list[bytes] = []
        self.disconnected = False
        self.response_complete = False
        self.task: asyncio.Task[None] | None = None


class ProxyProtocol(HeadLimited, HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HeadLimits = DEFAULT_LIMITS,
        front: ActivatorApp,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limit_heads(limits)
        self._front = front

    # --- parser callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._head_begins()
        # The ASGI scope is built only for the requests that go to ASGI (on_headers_complete).
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def on_headers_complete(self) -> None:
        self._head_ends()
        model = self._forwardable()
        if model is None:
            url, received, expect = self.url, self.headers, self.expect_100_continue
            super().on_message_begin()
            self.url, self.expect_100_continue = url, expect
            self.headers.extend(received)  # the list the new scope holds
            super().on_headers_complete()
            return
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        self.cycle = _Exchange(  # type: ignore[assignment]
            model, self.parser.get_method(), self.url, self.headers, keep_alive
        )
        if self.expect_100_continue:
            self.transport.write(_CONTINUE)

    def _forwardable(self) -> str | None:
        if self.parser.should_upgrade():
            return None
        current = self.cycle
        if current is not None and not current.response_complete:
            return None  # pipelined behind an unanswered request: uvicorn keeps the order
        url = self.url
        path = url.split(b"?", 1)[0]
        if b"%" in path:
            return None  # uvicorn's path decodes it
        text = path.decode("latin-1")
        method = self.parser.get_method().decode("latin-1")
        model = model_of_path(text)
        if model is None or is_model_ready_path(method, text) or model not in self._front.services:
            return None
        length: bytes | None = None
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = value
            elif lowered == b"transfer-encoding":
                return None
        if length is not None and (not length.isdigit() or int(length) > REPLAYABLE_BYTES):
            return None
        return model

    def on_body(self, body: bytes) -> None:
        exchange = self.cycle
        if not isinstance(exchange, _Exchange):
            super().on_body(body)
            return
        exchange.chunks.append(body)

    def on_message_complete(self) -> None:
        exchange = self.cycle
        if not isinstance(exchange, _Exchange):
            super().on_message_complete()
            return
        task = exchange.task = self.loop.create_task(self._answer(exchange))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        exchange = self.cycle
        # The client is gone: a queued request leaves the queue, a forwarded one frees its
        # replica's slot (the replica still finishes it).
        if isinstance(exchange, _Exchange) and not exchange.response_complete and exchange.task:
            exchange.task.cancel()
        super().connection_lost(exc)

    # --- answering ----------------------------------------------------------------------
    async def _answer(self, exchange: _Exchange) -> None:
        chunks = exchange.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        exchange.chunks = []
        peer = self.client
        reply = await self._front.answer(
            exchange.model,
            exchange.method,
            exchange.target,
            exchange.headers,
            body,
            peer[0] if peer else None,
        )
        self._write(exchange, reply)

    def _write(self, exchange: _Exchange, reply: Reply) -> None:
        if exchange.response_complete:
            return
        exchange.response_complete = True
        if exchange.disconnected or self.transport.is_closing():
            return
        head: list[bytes] = [STATUS_LINE[reply.status]]
        own = {name.lower() for name, _ in reply.headers}
        for name, value in self.server_state.default_headers:
            if name not in own:  # a replica's own date and server pass through
                head += (name, b": ", value, b"\r\n")
        for name, value in reply.headers:
            head += (name, b": ", value, b"\r\n")
        head.append(b"content-length: %d\r\n" % len(reply.body))
        if not exchange.keep_alive:
            head.append(b"connection: close\r\n")
        head += (b"\r\n", reply.body)
        self.transport.write(b"".join(head))
        if not exchange.keep_alive:
            self.transport.close()
        self.on_response_complete()
