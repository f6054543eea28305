"""The two inference endpoints (V2 infer, V1 predict) as plain functions from a request's
path, headers and body to a reply: no framework objects, so the lean ASGI front in
`rest/front.py` can call them directly."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import orjson

from ember.server.codecs import v1, v2
from ember.server.dataplane import DataPlane
from ember.server.errors import EmberError, PayloadTooLarge
from ember.server.rest.body import BINARY_HEADER, byte_count, parse_json, split_binary_body
from ember.server.rest.errors import HTTP_STATUS, RETRY_AFTER

log = logging.getLogger("ember.server.rest")

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY

_V2_PREFIX = "/v2/models/"
_V2_SUFFIX = "/infer"
_V1_PREFIX = "/v1/models/"
_V1_SUFFIX = ":predict"
# Answers up to this size go out in one write: a transport write per tensor costs more than
# copying a few kilobytes (py-spy, ember bench at c=32).
_ONE_WRITE_BELOW = 64 * 1024


@dataclass(frozen=True, slots=True)
class Route:
    protocol: str  # "v2" | "v1"
    model: str
    version: str | None = None


def route(method: str, path: str) -> Route | None:
    """The inference route `path` names, or None for every other request."""
    if method != "POST":
        return None
    if path.startswith(_V2_PREFIX) and path.endswith(_V2_SUFFIX):
        parts = path[len(_V2_PREFIX) : -len(_V2_SUFFIX)].split("/")
        if len(parts) == 1 and parts[0]:
            return Route("v2", parts[0])
        if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
            return Route("v2", parts[0], parts[2])
    elif path.startswith(_V1_PREFIX) and path.endswith(_V1_SUFFIX):
        name = path[len(_V1_PREFIX) : -len(_V1_SUFFIX)]
        if name and "/" not in name:
            return Route("v1", name)
    return None


class Disconnected(Exception):
    """The client went away before its body arrived: nobody to answer."""


@dataclass(frozen=True, slots=True)
class Reply:
    body: bytes
    status: int = 200
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    # Written after `body` as they are (binary tensors): no joining into one big copy.
    tail: tuple[bytes | memoryview, ...] = ()

    def __len__(self) -> int:
        return len(self.body) + sum(len(chunk) for chunk in self.tail)

    @property
    def one_write(self) -> bool:
        """Whether to join body and tail into a single write."""
        return len(self) <= _ONE_WRITE_BELOW


def error_reply(exc: EmberError) -> Reply:
    retry = RETRY_AFTER.get(exc.code)
    return Reply(
        orjson.dumps({"error": exc.message}),
        HTTP_STATUS[exc.code],
        headers=(("retry-after", retry),) if retry else (),
    )


def too_large(declared: str | None, limit: int) -> PayloadTooLarge | None:
    """The error for a declared Content-Length over `limit`, before any of the body is read."""
    size = None if declared is None else byte_count(declared)
    if size is not None and size > limit:
        return PayloadTooLarge(
            f"request body of {declared} bytes exceeds the limit of {limit} bytes"
        )
    return None


def over_limit(limit: int) -> PayloadTooLarge:
    """The error for a body found to be over `limit` while it was being read."""
    return PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")


class InferEndpoints:
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    def admit(self, where: Route) -> Reply | None:
        """The refusal for a request that could not be queued now (unknown model, not ready,
        queue full), counted as such; None when it may come in. Lets a transport answer from
        the request line and headers alone, before any of the body is read."""
        try:
            self._dataplane.admit(where.model, where.version)
        except EmberError as exc:
            return self.refuse(where, exc)
        return None

    def refuse(self, where: Route, error: EmberError) -> Reply:
        """`error` as the reply to a request its transport will not read on, counted."""
        self._dataplane.reject(where.model, where.protocol, error)
        return error_reply(error)

    async def answer(
        self, where: Route, headers: Mapping[str, str], read_body: Callable[[], Awaitable[bytes]]
    ) -> Reply | None:
        """The reply to one inference request, errors included; None if the client left.
        What cannot be queued is refused before `read_body` is called."""
        refused = self.admit(where)
        if refused is not None:
            return refused
        try:
            body = await read_body()
        except EmberError as exc:  # over the size limit
            return self.refuse(where, exc)
        except Disconnected:
            return None
        return await self.answer_admitted(where, headers, body)

    async def answer_admitted(self, where: Route, headers: Mapping[str, str], body: bytes) -> Reply:
        """`answer` for a request its transport has already passed through `admit` and whose
        body it has read.

        Both HTTP transports (the ASGI front and the socket-level protocol) end here, so an
        error maps to one status and one body whichever way the request came in.
        """
        try:
            if where.protocol == "v2":
                return await self.v2(where.model, where.version, headers, body)
            return await self.v1(where.model, body)
        except EmberError as exc:
            return error_reply(exc)
        except Exception as exc:
            log.error("request failed", exc_info=exc, extra={"model": where.model})
            return Reply(orjson.dumps({"error": f"internal error: {type(exc).__name__}"}), 500)

    def _rejected(self, model_name: str, protocol: str, exc: EmberError) -> EmberError:
        """Count a request that could not be decoded; the error, to raise."""
        self._dataplane.reject(model_name, protocol, exc)
        return exc

    async def v2(
        self, model_name: str, version: str | None, headers: Mapping[str, str], body: bytes
    ) -> Reply:
        # Decoding is synchronous: the body is all here, and every coroutine on this path
        # costs its share of the event loop's time per request.
        try:
            # tritonclient sends no Content-Type: binary requests are known by this header only.
            header_length = headers.get(BINARY_HEADER)
            if header_length is None:
                request = v2.decode_request(parse_json(body), model_name, version)
            else:
                json_part, binary = split_binary_body(body, header_length)
                request = v2.decode_request(parse_json(json_part), model_name, version, binary)
        except EmberError as exc:
            raise self._rejected(model_name, "v2", exc) from None
        response = await self._dataplane.infer(request, "v2")
        doc, blobs = v2.encode_response(response, v2.binary_outputs(request))
        header = orjson.dumps(doc, option=JSON_OPTIONS)
        if not blobs:
            return Reply(header)
        return Reply(
            header,
            content_type="application/octet-stream",
            headers=((BINARY_HEADER, str(len(header))),),
            tail=tuple(blobs),
        )

    async def v1(self, model_name: str, body: bytes) -> Reply:
        try:
            config = self._dataplane.model(model_name)
            request = v1.decode_request(parse_json(body), config)
        except EmberError as exc:
            raise self._rejected(model_name, "v1", exc) from None
        response = await self._dataplane.infer(request, "v1")
        return Reply(orjson.dumps(v1.encode_response(response), option=JSON_OPTIONS))
