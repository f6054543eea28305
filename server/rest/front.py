"""The ASGI app uvicorn runs: inference requests are answered here directly, everything else
goes on to the FastAPI app.

The inference routes are the only hot ones. Through FastAPI/Starlette (middleware stack,
route matching, Request/Response objects) they cost about 65 µs more per request than the
work itself (measured in process on uvloop); this front reads the body and writes the reply
with bare ASGI messages, and keeps FastAPI for the other thirty-odd routes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from ember.server.errors import EmberError, PayloadTooLarge
from ember.server.rest.errors import HTTP_STATUS, RETRY_AFTER
from ember.server.rest.infer import InferEndpoints, Reply

log = logging.getLogger("ember.server.rest")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_V2_PREFIX = "/v2/models/"
_V2_SUFFIX = "/infer"
_V1_PREFIX = "/v1/models/"
_V1_SUFFIX = ":predict"
_JOIN_BELOW = 64 * 1024


class _Disconnected(Exception):
    pass


def _error(exc: EmberError) -> Reply:
    retry = RETRY_AFTER.get(exc.code)
    return Reply(
        orjson.dumps({"error": exc.message}),
        HTTP_STATUS[exc.code],
        headers=(("retry-after", retry),) if retry else (),
    )


class InferFront:
    def __init__(self, app: ASGIApp, endpoints: InferEndpoints, max_body_bytes: int) -> None:
        self.app = app
        self._endpoints = endpoints
        self._limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path: str = scope["path"]
            if path.startswith(_V2_PREFIX) and path.endswith(_V2_SUFFIX):
                parts = path[len(_V2_PREFIX) : -len(_V2_SUFFIX)].split("/")
                if len(parts) == 1 and parts[0]:
                    await self._serve(scope, receive, send, "v2", parts[0], None)
                    return
                if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
                    await self._serve(scope, receive, send, "v2", parts[0], parts[2])
                    return
            elif path.startswith(_V1_PREFIX) and path.endswith(_V1_SUFFIX):
                name = path[len(_V1_PREFIX) : -len(_V1_SUFFIX)]
                if name and "/" not in name:
                    await self._serve(scope, receive, send, "v1", name, None)
                    return
        await self.app(scope, receive, send)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, protocol: str, model: str,
        version: str | None,
    ) -> None:  # fmt: skip
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

        async def read_body() -> bytes:
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self._limit:
                raise PayloadTooLarge(
                    f"request body of {declared} bytes exceeds the limit of {self._limit} bytes"
                )
            chunks = []
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Disconnected
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self._limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {self._limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)

        try:
            if protocol == "v2":
                reply = await self._endpoints.v2(model, version, headers, read_body)
            else:
                reply = await self._endpoints.v1(model, read_body)
        except EmberError as exc:
            reply = _error(exc)
        except _Disconnected:
            return
        except Exception as exc:
            log.error("request failed", exc_info=exc, extra={"path": scope["path"]})
            reply = Reply(orjson.dumps({"error": f"internal error: {type(exc).__name__}"}), 500)
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
        if tail and len(reply) <= _JOIN_BELOW:
            # Small answers go out in one write: a transport write per tensor costs more than
            # copying a few kilobytes (py-spy, ember bench at c=32).
            await send({"type": "http.response.body", "body": b"".join([reply.body, *tail])})
            return
        await send({"type": "http.response.body", "body": reply.body, "more_body": bool(tail)})
        for i, chunk in enumerate(tail, start=1):
            more = i < len(tail)
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
