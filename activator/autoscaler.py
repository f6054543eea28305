"""The loop that evaluates every model's KPA on a tick (and at once when a model at zero gets a
request) and hands the replica counts to the backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from ember.activator.service import Service

log = logging.getLogger("ember.activator")


class Backend(Protocol):
    """Where replicas come from: local processes, or pods that KEDA scales."""

    def starting(self, model: str) -> int:
        """Replicas asked for that are not ready yet."""
        ...

    def scale(self, service: Service, desired: int) -> None:
        """Move towards `desired` replicas without blocking the caller."""
        ...


class Autoscaler:
    def __init__(
        self,
        services: Mapping[str, Service],
        backend: Backend,
        *,
        tick_s: float = 2.0,
        clock: Callable[[], float],
    ) -> None:
        self.services = services
        self.backend = backend
        self.tick_s = tick_s
        self.clock = clock
        self._wake = asyncio.Event()
        # Replaced after each evaluation, so every waiter sees each one.
        self._changed: asyncio.Future[None] | None = None
        for service in services.values():
            service.poke = self._wake.set

    def step(self) -> None:
        """Evaluate every model once."""
        now = self.clock()
        for service in self.services.values():
            before = service.desired
            was_panic = service.decision is not None and service.decision.panic
            decision = service.evaluate(now, self.backend.starting(service.name))
            if decision.desired != before or decision.panic != was_panic:
                log.info(
                    "scale",
                    extra={
                        "model": service.name,
                        "from": before,
                        "to": decision.desired,
                        "reason": decision.reason,
                        "panic": decision.panic,
                        "stable_avg": round(decision.stable_avg, 3),
                        "panic_avg": round(decision.panic_avg, 3),
                    },
                )
            self.backend.scale(service, decision.desired)
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)

    async def wait_change(self, timeout: float) -> None:
        """Return after the next evaluation, or after `timeout` seconds."""
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._changed), timeout)

    async def run(self) -> None:
        while True:
            self.step()
            try:
                async with asyncio.timeout(self.tick_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
