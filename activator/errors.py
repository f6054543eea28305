"""The errors a request through the activator can end with, typed once and mapped once per
protocol (Knative's activator and KEDA's HTTP add-on answer the same statuses)."""

from __future__ import annotations

import enum
from typing import Final

import grpc


class Failure(enum.Enum):
    UNKNOWN_MODEL = "unknown_model"
    QUEUE_FULL = "queue_full"
    TIMEOUT = "timeout"
    UPSTREAM = "upstream"
    SHUTTING_DOWN = "shutting_down"


class ActivatorError(Exception):
    """Raised on the request path; the message reaches the client as `{"error": message}`."""

    failure: Failure = Failure.UPSTREAM

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownModel(ActivatorError):
    failure = Failure.UNKNOWN_MODEL

    def __init__(self, name: str) -> None:
        super().__init__(f"model '{name}' is not served by this activator")


class QueueFull(ActivatorError):
    failure = Failure.QUEUE_FULL


class ActivationTimeout(ActivatorError):
    failure = Failure.TIMEOUT


class UpstreamFailed(ActivatorError):
    failure = Failure.UPSTREAM


class ShuttingDown(ActivatorError):
    failure = Failure.SHUTTING_DOWN


HTTP_STATUS: Final[dict[Failure, int]] = {
    Failure.UNKNOWN_MODEL: 404,
    Failure.QUEUE_FULL: 503,
    Failure.TIMEOUT: 504,
    Failure.UPSTREAM: 502,
    Failure.SHUTTING_DOWN: 503,
}

GRPC_STATUS: Final[dict[Failure, grpc.StatusCode]] = {
    Failure.UNKNOWN_MODEL: grpc.StatusCode.NOT_FOUND,
    Failure.QUEUE_FULL: grpc.StatusCode.UNAVAILABLE,
    Failure.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Failure.UPSTREAM: grpc.StatusCode.UNAVAILABLE,
    Failure.SHUTTING_DOWN: grpc.StatusCode.UNAVAILABLE,
}

# A client that retries a full queue or a draining activator should wait this long (seconds).
RETRY_AFTER: Final[dict[Failure, str]] = {Failure.QUEUE_FULL: "1", Failure.SHUTTING_DOWN: "1"}
