"""The two inference endpoints (V2 infer, V1 predict) as plain functions from a request's
path, headers and body to a reply: no framework objects, so the lean ASGI front in
`rest/front.py` can call them directly."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import orjson

from ember.server.codecs import v1, v2
from ember.server.dataplane import DataPlane
from ember.server.errors import EmberError
from ember.server.request import InferRequest, InferResponse
from ember.server.rest.body import BINARY_HEADER, parse_json, split_binary_body

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


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


class InferEndpoints:
    def __init__(self, dataplane: DataPlane) -> None:
        self._dataplane = dataplane

    async def _decode_and_infer(
        self, model_name: str, protocol: str, decode: Callable[[], Awaitable[InferRequest]]
    ) -> tuple[InferRequest, InferResponse]:
        try:
            request = await decode()
        except EmberError as exc:
            self._dataplane.reject(model_name, protocol, exc)
            raise
        return request, await self._dataplane.infer(request, protocol)

    async def v2(
        self,
        model_name: str,
        version: str | None,
        headers: Mapping[str, str],
        read_body: Callable[[], Awaitable[bytes]],
    ) -> Reply:
        async def decode() -> InferRequest:
            # Unknown, not ready or full: answered before the body is read or decoded.
            self._dataplane.admit(model_name, version)
            body = await read_body()
            # tritonclient sends no Content-Type: binary requests are known by this header only.
            header_length = headers.get(BINARY_HEADER)
            if header_length is None:
                return v2.decode_request(parse_json(body), model_name, version)
            json_part, binary = split_binary_body(body, header_length)
            return v2.decode_request(parse_json(json_part), model_name, version, binary)

        request, response = await self._decode_and_infer(model_name, "v2", decode)
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

    async def v1(self, model_name: str, read_body: Callable[[], Awaitable[bytes]]) -> Reply:
        async def decode() -> InferRequest:
            config = self._dataplane.admit(model_name)
            return v1.decode_request(parse_json(await read_body()), config)

        _, response = await self._decode_and_infer(model_name, "v1", decode)
        return Reply(orjson.dumps(v1.encode_response(response), option=JSON_OPTIONS))
