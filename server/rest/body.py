"""Turning a request body into a JSON document and, for Triton's binary extension, tensors."""

from __future__ import annotations

from typing import Any

import orjson

from ember.server.codecs.shown import shown
from ember.server.errors import InvalidInput


def parse_json(body: bytes | memoryview) -> Any:
    if not body:
        raise InvalidInput("request body is empty; expected a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None


BINARY_HEADER = "inference-header-content-length"

# More digits than this (leading zeros aside) is more bytes than any body: 10**18 B is an
# exabyte, and int() refuses strings of over 4300 digits outright.
_MAX_DIGITS = 18


def byte_count(value: str) -> int | None:
    """A header's decimal byte count; None when it is not one. str.isdigit alone is not the
    test: it accepts '²' and other Unicode digits that int() refuses."""
    if not (value.isascii() and value.isdigit()):
        return None
    digits = value.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def split_binary_body(body: bytes, header_length: str) -> tuple[memoryview, memoryview]:
    """Triton's binary extension: the first `header_length` bytes are JSON, the rest tensors."""
    size = byte_count(header_length)
    if size is None:
        raise InvalidInput(
            f"Inference-Header-Content-Length must be a byte count, got {shown(header_length)}"
        )
    if size > len(body):
        raise InvalidInput(
            f"Inference-Header-Content-Length {size} is larger than the body ({len(body)} bytes)"
        )
    view = memoryview(body)
    return view[:size], view[size:]
