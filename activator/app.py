"""The activator's HTTP front: a bare ASGI app. Per-model requests wait for a replica slot and
are forwarded; server-level calls, model readiness, /metrics and /status are answered here.

The request path, straight through: route by model name -> admission (a deadline, the
model's bounded queue) -> a replica with a free slot -> forward (once more on another replica
if the connection failed before any response byte) -> release the slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ember.activator.errors import (
    HTTP_STATUS,
    RETRY_AFTER,
    ActivatorError,
    ShuttingDown,
    UnknownModel,
)
from ember.activator.forward import through
from ember.activator.metrics import ActivatorMetrics
from ember.activator.proxy import REPLAYABLE_BYTES, HttpPool, Upstream, forward_headers
from ember.activator.routes import is_model_ready_path, model_of_path
from ember.activator.service import Service
from ember.activator.throttler import Replica
from ember.activator.upstream import ReplicaClient, encode_request

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_COLD_HEADER = b"x-ember-cold-start-ms"


async def _reply(
    send: Send, status: int, doc: object, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = orjson.dumps(doc)
    headers = [*_JSON, (b"content-length", str(len(body)).encode()), *(extra or ())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@dataclass(slots=True)
class Reply:
    """A whole answer, as both HTTP transports write it."""

    status: int
    headers: list[tuple[bytes, bytes]]  # without content-length
    body: bytes


def error_reply(model: str, exc: BaseException) -> Reply:
    """The one mapping from what can go wrong on a forwarded request to its HTTP answer."""
    if isinstance(exc, ActivatorError):
        status, message = HTTP_STATUS[exc.failure], exc.message
        retry = RETRY_AFTER.get(exc.failure)
        extra = [(b"retry-after", retry.encode())] if retry else []
    elif isinstance(exc, TimeoutError):
        status, message, extra = 504, f"model '{model}': no answer before the deadline", []
    else:  # the replica's connection broke, or it answered with bytes that are not HTTP
        status, message, extra = 502, f"model '{model}': {exc}", []
    return Reply(status, [*_JSON, *extra], orjson.dumps({"error": message}))


class ActivatorApp:
    def __init__(
        self,
        services: Mapping[str, Service],
        pool: HttpPool,
        metrics: ActivatorMetrics,
        status: Callable[[], dict[str, Any]],
        clock: Callable[[], float],
        client: ReplicaClient | None = None,
    ) -> None:
        self.services = services
        self.pool = pool  # streamed bodies
        self.client = client or ReplicaClient(connect_timeout=pool.connect_timeout)
        self.metrics = metrics
        self.status = status
        self.clock = clock
        self.draining = False

    # -- the request path for a body in memory (both HTTP transports) ------------------------

    async def answer(
        self,
        model: str,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        client: str | None,
    ) -> Reply:
        """Forward one request whose body is in memory and return the answer to write; every
        failure becomes its error reply here. Cancelled when the client goes away."""
        started = self.clock()
        status = 499  # the client left before its answer was ready (nginx's code)
        try:
            try:
                service = self._admit(model)

                async def call(replica: Replica, deadline: float, waited_ms: int | None) -> Reply:
                    request = encode_request(method, target, headers, body, client, replica.address)
                    answer = await self.client.send(replica.address, request, deadline)
                    extra = [] if waited_ms is None else [(_COLD_HEADER, b"%d" % waited_ms)]
                    return Reply(answer.status, answer.headers + extra, answer.body)

                reply = await through(service, call, clock=self.clock, started=started)
            except (ActivatorError, TimeoutError, ConnectionError) as exc:
                reply = error_reply(model, exc)
            status = reply.status
            return reply
        finally:
            if model in self.services:
                self.metrics.answered(model, status, self.clock() - started)

    def _admit(self, model: str) -> Service:
        service = self.services.get(model)
        if service is None:
            raise UnknownModel(model)
        if self.draining:
            raise ShuttingDown("the activator is shutting down")
        return service

    # -- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        # Models are named on the path as sent: `path` is already percent-decoded, and a name
        # with '/' or '%' in it would come out wrong if decoded twice.
        target = _raw_path(scope)
        name = model_of_path(target)
        if name is None:
            await self._server_level(method, path, send)
            return
        if is_model_ready_path(method, target):
            await self._model_ready(name, target, send)
            return
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        length = next((v for n, v in scope["headers"] if n.lower() == b"content-length"), None)
        chunked = any(n.lower() == b"transfer-encoding" for n, _ in scope["headers"])
        if not chunked and (
            length is None or (length.isdigit() and int(length) <= REPLAYABLE_BYTES)
        ):
            await self._buffered(name, method, target, scope, receive, send)
        else:
            await self._streamed(name, method, target, scope, receive, send)

    async def _buffered(
        self, name: str, method: str, target: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        try:
            body = await _read_body(receive) if _has_body(scope) else b""
        except ConnectionResetError:
            return
        client = scope.get("client")
        watch = _watch_client(receive)
        try:
            reply = await self.answer(
                name, method.encode(), target.encode("latin-1"), scope["headers"], body,
                client[0] if client else None,
            )  # fmt: skip
        except asyncio.CancelledError:
            if not watch.done() or not watch.result():
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # the watch's cancel: the client is gone, nothing to send
            return
        finally:
            watch.cancel()
        headers = [*reply.headers, (b"content-length", b"%d" % len(reply.body))]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    async def _streamed(
        self, name: str, method: str, target: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """A body too large to keep for a retry (or chunked): streamed both ways (aiohttp)."""
        started = self.clock()
        sent = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal sent
            sent = True
            await send(message)

        status = 499
        client = scope.get("client")
        request = streamed_request(
            method, target, scope["headers"], receive, client[0] if client else None
        )
        try:
            service = self._admit(name)

            async def call(replica: Replica, deadline: float, waited_ms: int | None) -> int:
                extra = [] if waited_ms is None else [(_COLD_HEADER, b"%d" % waited_ms)]
                return await self.pool.forward(
                    replica.address, request, tracked, deadline - self.clock(), extra
                )

            status = await through(service, call, clock=self.clock, started=started)
        except (ActivatorError, TimeoutError, ConnectionError, aiohttp.ClientError) as exc:
            if request.client_gone:
                return
            if sent:
                raise  # the answer broke off mid-way: the client sees the connection close
            reply = error_reply(name, exc)
            status = reply.status
            headers = [*reply.headers, (b"content-length", b"%d" % len(reply.body))]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": reply.body})
        finally:
            if name in self.services:
                self.metrics.answered(name, status, self.clock() - started)

    async def _model_ready(self, name: str, target: str, send: Send) -> None:
        if name not in self.services:
            await _reply(send, 404, {"error": UnknownModel(name).message})
            return
        ready = not self.draining
        doc = {"name": name, "ready": ready} if target.startswith("/v1/") else {"ready": ready}
        await _reply(send, 200 if ready else 503, doc)

    async def _server_level(self, method: str, path: str, send: Send) -> None:
        if path == "/v2/health/live":
            await _reply(send, 200, {"live": True})
        elif path == "/v2/health/ready":
            await _reply(send, 503 if self.draining else 200, {"ready": not self.draining})
        elif path in ("/v2", "/v2/"):
            await _reply(send, 200, {"name": "ember-activator", "version": "0.1.0",
                                     "extensions": []})  # fmt: skip
        elif path == "/v1/models":
            await _reply(send, 200, {"models": sorted(self.services)})
        elif path == "/v2/repository/index" and method == "POST":
            state = "UNAVAILABLE" if self.draining else "READY"
            await _reply(send, 200, [{"name": n, "state": state} for n in sorted(self.services)])
        elif path == "/metrics":
            body = generate_latest(self.metrics.registry)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
        elif path == "/status":
            await _reply(send, 200, self.status())
        else:
            await _reply(send, 404, {"error": f"no route for {method} {path}"})


def _watch_client(receive: Receive) -> asyncio.Task[bool]:
    """Cancel the request in this task if its client goes away before the answer is ready
    (Go's request context, which Knative's activator waits on): a client that left while
    queued leaves the queue, and one that left while its replica works frees the slot. The
    task's result says whether it cancelled."""
    task = asyncio.current_task()
    assert task is not None

    async def watch() -> bool:
        # After the body, an ASGI server answers `receive` only once the client disconnects
        # or the response is complete.
        while (await receive())["type"] != "http.disconnect":
            pass
        task.cancel()
        return True

    return asyncio.create_task(watch())


def _has_body(scope: Scope) -> bool:
    return any(n.lower() in (b"content-length", b"transfer-encoding") for n, _ in scope["headers"])


def _raw_path(scope: Scope) -> str:
    """The path as the client sent it (ASGI's `raw_path` is optional: else `path` encoded
    again)."""
    raw: bytes | None = scope.get("raw_path")
    if raw:
        return raw.decode("latin-1")
    return quote(scope["path"], safe="/:@!$&'()*+,;=")


def streamed_request(
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    receive: Receive,
    client: str | None,
) -> Upstream:
    request = Upstream(method, target, forward_headers(headers, client), None)

    async def stream() -> Any:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # Not the end of the body: ending the stream here would hand the replica a
                # complete, shorter request.
                request.client_gone = True
                raise ConnectionResetError("the client went away")
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    request.stream = stream
    return request


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionResetError("the client went away")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
