"""One model's replicas, their request slots, and the queue of requests waiting for a slot.

Requests wait on capacity through one call, `acquire` (Knative's `Throttler.Try`): it returns a
replica with a free slot, or waits in FIFO order until one frees up, the queue is full, or the
request's deadline passes. A freed slot goes to exactly one waiter, so a backlog built while
the model was cold is never released all at once onto the first warm replica.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from dataclasses import dataclass, field

from ember.activator.errors import ActivationTimeout, QueueFull


class Replica:
    """A predictor process (or pod) that answers `/v2/health/ready`, addressed as host:port."""

    __slots__ = ("_idle", "address", "draining", "grpc_address", "in_flight")

    def __init__(self, address: str, grpc_address: str | None = None) -> None:
        self.address = address
        self.grpc_address = grpc_address
        self.in_flight = 0
        self.draining = False
        self._idle: asyncio.Event | None = None

    async def wait_idle(self) -> None:
        if self.in_flight == 0:
            return
        if self._idle is None:
            self._idle = asyncio.Event()
        await self._idle.wait()

    def _done(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    def __repr__(self) -> str:
        return f"Replica({self.address}, in_flight={self.in_flight})"


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[Replica]
    exclude: str | None = None
    since: float = field(default=0.0)


class Throttler:
    def __init__(self, model: str, capacity: int, queue_depth: int) -> None:
        self.model = model
        self.capacity = capacity  # slots per replica; 0 = no limit
        self.queue_depth = queue_depth
        self._replicas: dict[str, Replica] = {}
        self._waiters: deque[_Waiter] = deque()
        self._queued = 0  # live waiters; cancelled ones stay in the deque until reached

    # -- state -------------------------------------------------------------------------------

    @property
    def ready(self) -> int:
        return len(self._replicas)

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self._replicas.values())

    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    def free_slots(self) -> int | None:
        """Free slots across replicas in rotation; None when they are unlimited."""
        if not self.capacity:
            return None if self._replicas else 0
        return sum(max(0, self.capacity - r.in_flight) for r in self._replicas.values())

    # -- replicas in and out of rotation -----------------------------------------------------

    def add(self, replica: Replica) -> None:
        self._replicas[replica.address] = replica
        self._dispatch()

    def take_out(self, address: str) -> Replica | None:
        """Stop sending new requests to a replica; the ones it holds finish (`wait_idle`)."""
        replica = self._replicas.pop(address, None)
        if replica is not None:
            replica.draining = True
        return replica

    # -- the request path ----------------------------------------------------------------------

    async def acquire(self, deadline: float, exclude: str | None = None) -> Replica:
        """A replica with a slot taken for this request; `release` it when done.

        `deadline` is on the event loop's clock. `exclude` skips one replica (the one a retried
        request just failed on) while others exist.
        """
        if not self._queued:
            replica = self._pick(exclude)
            if replica is not None:
                replica.in_flight += 1
                return replica
        if self._queued >= self.queue_depth:
            raise QueueFull(
                f"model '{self.model}': {self._queued} requests already queued "
                f"(queue_depth {self.queue_depth})"
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), exclude, loop.time())
        self._waiters.append(waiter)
        self._queued += 1
        try:
            async with asyncio.timeout_at(deadline):
                return await waiter.future
        except BaseException as exc:
            future = waiter.future
            if not future.done() or future.cancelled():
                future.cancel()
                self._queued -= 1  # left the queue without a slot
                self._prune()
            elif future.exception() is None:
                # A slot handed over just as the deadline (or a cancel) fired: give it back.
                self.release(future.result())
            if isinstance(exc, TimeoutError):
                waited = loop.time() - waiter.since
                raise ActivationTimeout(
                    f"model '{self.model}': no replica had a free slot within {waited:.1f} s"
                ) from None
            raise

    def release(self, replica: Replica) -> None:
        replica._done()
        if self._waiters and not replica.draining:
            self._dispatch()

    def fail_waiters(self, error: Exception) -> None:
        """Answer every queued request with `error` (the activator is stopping, or the model
        cannot start)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                self._queued -= 1
                waiter.future.set_exception(error)

    # -- inside --------------------------------------------------------------------------------

    def _pick(self, exclude: str | None) -> Replica | None:
        replicas = self._replicas
        if not replicas:
            return None
        candidates = [r for a, r in replicas.items() if a != exclude] if exclude else None
        pool = candidates if candidates else list(replicas.values())
        if not self.capacity:
            # Unlimited slots: power of two choices by requests in flight.
            if len(pool) == 1:
                return pool[0]
            a, b = random.sample(pool, 2)
            return a if a.in_flight <= b.in_flight else b
        best: Replica | None = None
        for replica in pool:
            if replica.in_flight < self.capacity and (
                best is None or replica.in_flight < best.in_flight
            ):
                best = replica
        return best

    def _prune(self) -> None:
        # Waiters that left stay in the deque until `_dispatch` reaches them; with no replica
        # coming (a model that cannot start, clients that time out and retry) nothing does.
        # Drop them once they outnumber the live ones, so the deque stays O(queued).
        if len(self._waiters) > 2 * self._queued + 32:
            self._waiters = deque(w for w in self._waiters if not w.future.done())

    def _dispatch(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters[0]
            if waiter.future.done():
                waiters.popleft()
                continue
            replica = self._pick(waiter.exclude)
            if replica is None:
                return
            waiters.popleft()
            replica.in_flight += 1
            self._queued -= 1
            waiter.future.set_result(replica)
