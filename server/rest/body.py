"""Turning a request body into a JSON document and, for Triton's binary extension, tensors."""

from __future__ import annotations

from typing import Any

import orjson

from ember.server.errors import InvalidInput


def parse_json(body: bytes) -> Any:
    if not body:
        raise InvalidInput("request body is empty; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None


BINARY_HEADER = "inference-header-content-length"


def split_binary_body(body: bytes, header_length: str) -> tuple[bytes, memoryview]:
    """Triton's binary extension: the first `header_length` bytes are JSON, the rest tensors."""
    if not header_length.isdigit():
        raise InvalidInput(
            f"Inference-Header-Content-Length must be a byte count, got {header_length!r}"
        )
    size = int(header_length)
    if size > len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {size} is larger than the body ({len(body)} bytes)"
        )
    view = memoryview(body)
    return bytes(view[:size]), view[size:]
