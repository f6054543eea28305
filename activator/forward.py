"""The request path every forwarded call takes, whatever its transport: count it, wait for a
replica slot under one deadline, call the replica, once more on another replica if the first
could not be reached, give the slot back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from ember.activator.errors import UpstreamFailed
from ember.activator.proxy import ConnectFailed
from ember.activator.service import Service
from ember.activator.throttler import Replica

T = TypeVar("T")

# (replica, deadline on the clock, ms the request waited for a cold replica or None) -> answer
Call = Callable[[Replica, float, int | None], Awaitable[T]]


async def through(
    service: Service,
    call: Call[T],
    *,
    clock: Callable[[], float],
    started: float,
    deadline: float | None = None,
) -> T:
    """Run `call` against a replica of `service` with a free slot. Raises the activator's
    typed errors: QueueFull, ActivationTimeout, UpstreamFailed."""
    if deadline is None:
        deadline = started + service.settings.activation_timeout_s
    cold = service.arrive(clock())
    exclude: str | None = None
    try:
        for attempt in (1, 2):
            replica = await service.throttler.acquire(deadline, exclude)
            waited = round((clock() - started) * 1000) if cold else None
            try:
                return await call(replica, deadline, waited)
            except ConnectFailed as exc:
                if attempt == 2 or not exc.replayable:
                    raise UpstreamFailed(f"model '{service.name}': {exc}") from None
                exclude = replica.address
            finally:
                service.throttler.release(replica)
        raise AssertionError("unreachable")
    finally:
        service.leave(clock())
