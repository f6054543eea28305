"""The errors a request can end with, typed once.

Each protocol maps `ErrorCode` to its own status in one table (see `rest/errors.py`);
nothing else in the request path decides a status code.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.Enum):
    INVALID_INPUT = "invalid_input"
    NOT_FOUND = "not_found"
    NOT_READY = "not_ready"
    OVERLOADED = "overloaded"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    MODEL_FAILED = "model_failed"
    UNIMPLEMENTED = "unimplemented"
    TOO_LARGE = "too_large"


class EmberError(Exception):
    """Base of every error that reaches a client. The message is shown to the client as is."""

    code: ErrorCode = ErrorCode.MODEL_FAILED

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(EmberError):
    code = ErrorCode.INVALID_INPUT


class ModelNotFound(EmberError):
    code = ErrorCode.NOT_FOUND

    def __init__(self, name: str, version: str | None = None) -> None:
        what = f"model '{name}'" if version is None else f"model '{name}' version '{version}'"
        super().__init__(f"{what} not found")


class ModelNotReady(EmberError):
    code = ErrorCode.NOT_READY

    def __init__(self, name: str) -> None:
        super().__init__(f"model '{name}' is not ready")


class PredictorUnavailable(EmberError):
    """`ember transformer`: the predictor it sends to cannot be reached or is not ready."""

    code = ErrorCode.NOT_READY


class Overloaded(EmberError):
    code = ErrorCode.OVERLOADED


class DeadlineExceeded(EmberError):
    code = ErrorCode.DEADLINE_EXCEEDED


class ModelFailed(EmberError):
    code = ErrorCode.MODEL_FAILED


class Unimplemented(EmberError):
    code = ErrorCode.UNIMPLEMENTED


class PayloadTooLarge(EmberError):
    code = ErrorCode.TOO_LARGE


class ConfigError(Exception):
    """A model repository or model.toml that cannot be used; raised at startup, never per request.

    The message is one line that names the file and the field.
    """
