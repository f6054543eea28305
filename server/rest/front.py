"""The ASGI app uvicorn runs: inference requests are answered here directly, everything else
goes on to the FastAPI app.

The inference routes are the only hot ones. Through FastAPI/Starlette (middleware stack,
route matching, Request/Response objects) they cost about 65 µs more per request than the
work itself (measured in process on uvloop); this front reads the body and writes the reply
with bare ASGI messages, and keeps FastAPI for the other thirty-odd routes. A served process
answers most inference requests one layer further down (`rest/protocol.py`); this front takes
the rest (pipelined requests) and every in-process ASGI client.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ember.server.rest.infer import (
    Disconnected,
    InferEndpoints,
    Route,
    over_limit,
    route,
    too_large,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class InferFront:
    def __init__(self, app: ASGIApp, endpoints: InferEndpoints, max_body_bytes: int) -> None:
        self.app = app
        self.endpoints = endpoints
        self.max_body_bytes = max_body_bytes
        # Request URL -> its inference route (or None), shared by the connections of the
        # socket-level protocol: most traffic names a handful of URLs.
        self.routes: dict[bytes, Route | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        where = route(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if where is None:
            await self.app(scope, receive, send)
            return
        await self._serve(scope, receive, send, where)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, where: Route) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        limit = self.max_body_bytes

        async def read_body() -> bytes:
            error = too_large(headers.get("content-length"), limit)
            if error is not None:
                raise error
            chunks = []
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise Disconnected
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise over_limit(limit)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)

        reply = await self.endpoints.answer(where, headers, read_body)
        if reply is None:
            return
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [
                    (b"content-type", reply.content_type.encode()),
                    (b"content-length", str(len(reply)).encode()),
                    *((k.encode(), v.encode()) for k, v in reply.headers),
                ],
            }
        )
        tail = reply.tail
        if tail and reply.one_write:
            await send({"type": "http.response.body", "body": b"".join([reply.body, *tail])})
            return
        await send({"type": "http.response.body", "body": reply.body, "more_body": bool(tail)})
        for i, chunk in enumerate(tail, start=1):
            more = i < len(tail)
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
