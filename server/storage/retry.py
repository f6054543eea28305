"""Retries with exponential backoff, for one request or one range at a time.

A failure is either final (a `StorageError`: no such key, access denied, the object changed) or
`Transient` (a 5xx, throttling, a dropped connection): only transient ones are tried again, and
only the request that failed, never the whole download.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ember.server.storage.errors import StorageError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Transient:
    """Why one attempt failed, when another attempt may succeed."""

    reason: str
    # The server asked us to slow down (503 SlowDown, 429): wait longer before the next try.
    throttled: bool = False
    # No connection could be made at all (refused, DNS, connect timeout).
    unreachable: bool = False


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    # Attempts per request or range, the first one included (KServe's S3_MAX_ATTEMPTS).
    attempts: int = 3
    base_delay: float = 0.2
    max_delay: float = 10.0
    # Throttled attempts back off from a larger base: S3 asks for it with 503 SlowDown when a
    # prefix gets more requests per second than it can serve, and retrying at once adds to them.
    throttle_factor: float = 4.0

    def delay(
        self, failures: int, throttled: bool, rand: Callable[[], float] = random.random
    ) -> float:
        """Seconds to wait after the `failures`-th failure in a row (1, 2, ...).

        Exponential with "equal jitter": half the step is fixed, half random, so threads that
        failed together (one dropped connection pool) do not retry in lockstep, and none retries
        at once.
        """
        base = self.base_delay * (self.throttle_factor if throttled else 1.0)
        step = min(self.max_delay, base * 2.0 ** max(0, failures - 1))
        return step / 2.0 + rand() * step / 2.0


Classify = Callable[[Exception], "StorageError | Transient"]


def with_retries(
    attempt: Callable[[], T],
    policy: RetryPolicy,
    classify: Classify,
    exhausted: Callable[[Transient, int], StorageError],
    *,
    sleep: Callable[[float], None] | None = None,
    on_retry: Callable[[Transient, int], None] | None = None,
) -> T:
    """Call `attempt` until it returns, a failure is final, or `policy.attempts` are spent.

    `classify` turns an exception into a final `StorageError` or a `Transient`; `exhausted`
    builds the error raised when the last attempt failed transiently. `sleep` waits between
    attempts (`time.sleep` when None).
    """
    pause = time.sleep if sleep is None else sleep
    failures = 0
    while True:
        try:
            return attempt()
        except StorageError:
            raise
        except Exception as exc:
            verdict = classify(exc)
            if isinstance(verdict, StorageError):
                raise verdict from None
            failures += 1
            if failures >= policy.attempts:
                raise exhausted(verdict, failures) from None
            if on_retry is not None:
                on_retry(verdict, failures)
            pause(policy.delay(failures, verdict.throttled))
