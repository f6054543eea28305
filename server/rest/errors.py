"""The one table from error codes to HTTP statuses, and the `{"error": ...}` responses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import orjson
from starlette.responses import Response

from ember.server.errors import EmberError, ErrorCode

HTTP_STATUS: Final[dict[ErrorCode, int]] = {
    ErrorCode.INVALID_INPUT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.MODEL_FAILED: 500,
    ErrorCode.UNIMPLEMENTED: 501,
    ErrorCode.NOT_READY: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
}

# Seconds a client should wait before retrying; KServe and Knative clients honour Retry-After.
RETRY_AFTER: Final[dict[ErrorCode, str]] = {ErrorCode.OVERLOADED: "1", ErrorCode.NOT_READY: "1"}


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps({"error": message}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def ember_error_response(exc: EmberError) -> Response:
    retry = RETRY_AFTER.get(exc.code)
    return error_response(
        HTTP_STATUS[exc.code], exc.message, {"Retry-After": retry} if retry else None
    )
