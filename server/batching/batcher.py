"""The per-model queue: it owns its pending requests and their futures, cuts batches by the
policy, runs them on an idle instance and hands each request its own slice of the outputs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ember.server.batching import merge
from ember.server.batching.policy import BatchPolicy, Pending, decide
from ember.server.config import ModelConfig
from ember.server.errors import (
    DeadlineExceeded,
    EmberError,
    InvalidInput,
    ModelFailed,
    Overloaded,
)
from ember.server.instances import Instance, InstancePool
from ember.server.runners import Runner

log = logging.getLogger("ember.server.batching")

# Event-loop iterations a batch may wait for requests already arriving (see Batcher._settle).
_SETTLE_ROUNDS = 4


@dataclass(slots=True)
class Result:
    """One request's share of an execution."""

    outputs: dict[str, np.ndarray]
    queued: float  # seconds between enqueue and dispatch
    started: float  # time.monotonic() on the instance's thread
    ended: float
    batch_rows: int


@dataclass(slots=True)
class Execution:
    """One batch, as the statistics see it."""

    rows: int
    merge_seconds: float
    infer_seconds: float
    split_seconds: float


class _Item:
    __slots__ = ("deadline", "future", "inputs", "length", "pending", "priority", "timer")

    def __init__(
        self, inputs: dict[str, np.ndarray], pending: Pending, deadline: float | None,
        priority: int, length: int | None, future: asyncio.Future[Result],
    ) -> None:  # fmt: skip
        self.inputs = inputs
        self.pending = pending
        self.deadline = deadline
        self.priority = priority
        self.length = length
        self.future = future
        self.timer: asyncio.TimerHandle | None = None


def policy_of(config: ModelConfig) -> BatchPolicy:
    batching = config.batching
    if batching is None:
        return BatchPolicy(max_batch_size=None)
    return BatchPolicy(
        max_batch_size=config.batch_limit,
        max_queue_delay=batching.max_queue_delay_us / 1e6,
        preferred_batch_sizes=tuple(sorted(set(batching.preferred_batch_sizes))),
    )


class Batcher:
    """Every request to a model goes through its batcher; a model without `[batching]` gets
    one request per execution, with the same queue, deadlines and instance pool."""

    def __init__(
        self,
        config: ModelConfig,
        pool: InstancePool,
        on_execution: Callable[[Execution], None] = lambda _: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._pool = pool
        self._on_execution = on_execution
        self._clock = clock
        self._policy = policy_of(config)
        batching = config.batching
        self._levels = max(1, batching.priority_levels if batching else 0)
        self._default_priority = (
            batching.default_priority_level or (self._levels + 1) // 2 if batching else 1
        )
        self._max_queue = batching.max_queue_size if batching else 0
        self._default_timeout = batching.default_timeout_us / 1e6 if batching else 0.0
        self._override = batching.allow_timeout_override if batching else True
        self._padding = {
            s.name: merge.Padding(dim, s.pad_value)
            for s in config.inputs
            if s.pad_value is not None and (dim := s.variable_dim()) is not None
        }
        self._unpad = {
            s.name: dim for s in config.outputs if s.unpad and (dim := s.variable_dim()) is not None
        }
        self._queues: list[deque[_Item]] = [deque() for _ in range(self._levels)]
        self._size = 0
        self._arrived = asyncio.Event()
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        # asyncio.get_running_loop() makes a getpid() system call each time (CPython's fork
        # check): 5% of the event loop's samples when submit() called it per request.
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._last_count = 0  # requests in the last batch cut

    def __len__(self) -> int:
        """Requests waiting (answered ones still in the queue included until they leave)."""
        return self._size

    def check_room(self) -> None:
        """Raise Overloaded if a request would be refused now: lets a door refuse before it
        reads and decodes a body it would throw away."""
        if self._max_queue and self._size >= self._max_queue:
            raise Overloaded(
                f"model '{self._config.name}' has {self._size} requests queued "
                f"(max_queue_size {self._max_queue}); retry later"
            )

    def start(self) -> None:
        if self._task is None:
            self._event_loop = asyncio.get_running_loop()
            self._task = asyncio.create_task(self._loop(), name=f"batcher-{self._config.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for queue in self._queues:
            for item in queue:
                if not item.future.done():
                    item.future.set_exception(ModelFailed(f"model '{self._config.name}' unloaded"))
            queue.clear()
        self._size = 0

    # --- the request side ---------------------------------------------------------------
    def _priority(self, parameters: dict[str, Any]) -> int:
        value = parameters.get("priority", 0)
        if type(value) is not int or value < 0:
            raise InvalidInput(f"parameter 'priority' must be an integer >= 0, got {value!r}")
        if self._levels == 1 or value == 0:
            return self._default_priority
        if value > self._levels:
            raise InvalidInput(
                f"parameter 'priority' {value} is above the model's {self._levels} levels"
            )
        return value

    def _deadline(self, requested: float | None, now: float) -> float | None:
        if not self._default_timeout:
            return requested
        default = now + self._default_timeout
        if requested is None or not self._override:
            return default
        return min(requested, default)

    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        deadline: float | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> Result:
        """Queue one validated request and wait for its outputs. Raises Overloaded when the
        queue is full, DeadlineExceeded when it expires before it runs."""
        priority = self._priority(parameters or {})
        self.check_room()
        now = self._clock()
        deadline = self._deadline(deadline, now)
        if deadline is not None and now >= deadline:
            raise DeadlineExceeded(f"request to '{self._config.name}' expired before it was queued")
        first = next(iter(inputs.values()))
        rows = int(first.shape[0]) if self._policy.max_batch_size and first.ndim else 1
        pending = Pending(rows, now, merge.shape_key(inputs, self._padding))
        loop = self._event_loop or asyncio.get_running_loop()
        item = _Item(
            inputs, pending, deadline, priority, merge.own_length(inputs, self._padding),
            loop.create_future(),
        )  # fmt: skip
        if deadline is not None:
            item.timer = loop.call_at(
                loop.time() + (deadline - now), self._expire, item
            )  # fmt: skip
        self._queues[priority - 1].append(item)
        self._size += 1
        self._arrived.set()
        return await item.future

    def _expire(self, item: _Item) -> None:
        # Still queued: answer now and leave it to be skipped when it reaches the head.
        if not item.future.done():
            item.future.set_exception(
                DeadlineExceeded(
                    f"request to '{self._config.name}' waited past its deadline and was not run"
                )
            )

    # --- the dispatch side --------------------------------------------------------------
    def _head(self, count: int) -> list[_Item]:
        """Up to `count` live items in dispatch order, discarding answered ones on the way."""
        head: list[_Item] = []
        for queue in self._queues:
            while queue and queue[0].future.done():
                queue.popleft()
                self._size -= 1
            for item in queue:
                if not item.future.done():
                    head.append(item)
                    if len(head) == count:
                        return head
        return head

    def _take(self, items: list[_Item]) -> None:
        chosen = {id(i) for i in items}
        for queue in self._queues:
            while queue and (id(queue[0]) in chosen or queue[0].future.done()):
                queue.popleft()
                self._size -= 1
        # Chosen items are always a prefix of the live items, so none remains behind a
        # live one; answered items further back are discarded when they reach the front.
        for item in items:
            if item.timer is not None:
                item.timer.cancel()

    async def _next_batch(self) -> list[_Item]:
        limit = (self._policy.max_batch_size or 1) + 1
        if self._policy.max_batch_size and self._last_count > 1:
            await self._settle(self._policy.max_batch_size)
        while True:
            head = self._head(limit)
            if not head:
                return []
            now = self._clock()
            cut = decide([i.pending for i in head], now, self._policy)
            if cut.count:
                batch = head[: cut.count]
                self._last_count = len(batch)
                self._take(batch)
                return batch
            self._arrived.clear()
            wait = max(0.0, (cut.wait_until or now) - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), wait)

    async def _settle(self, limit: int) -> None:
        """Let the event loop run the work that is already ready before a batch is cut.

        When a batch of several requests ends, its callers are answered first and their next
        requests are already in the sockets' buffers: cut at once and the batch holds only
        those that arrived during the forward, and the clients split into two cohorts that
        take turns, each forward half full (ember bench, mlp at c=32: 16 rows per forward).
        A few loop iterations, no timer, gather them into one (32 rows; +20% rows/s on one
        core). After a lone request nothing is waiting to arrive, so it costs nothing at
        concurrency 1.
        """
        for _ in range(_SETTLE_ROUNDS):
            if self._size >= limit:
                return
            await asyncio.sleep(0)

    async def _loop(self) -> None:
        while True:
            if not self._size:
                self._arrived.clear()
                await self._arrived.wait()
            # Take an idle instance first, then cut: requests keep joining while all are busy.
            instance = await self._pool.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._pool.release(instance)
                raise
            if not batch:
                self._pool.release(instance)
                continue
            self._dispatch(instance, batch)

    def _dispatch(self, instance: Instance, batch: list[_Item]) -> None:
        dispatched = self._clock()
        rows = [i.pending.rows for i in batch]

        def done(result: Any, error: BaseException | None) -> None:
            # The instance goes back after the futures are set: the callers then run before
            # the dispatch loop, and their next requests can join the next batch (_settle).
            try:
                if error is not None:
                    self._fail(batch, error)
                    return
                parts, execution, started, ended = result
                self._on_execution(execution)
                total = execution.rows
                for item, outputs in zip(batch, parts, strict=True):
                    if not item.future.done():
                        item.future.set_result(
                            Result(
                                outputs, dispatched - item.pending.enqueued, started, ended, total
                            )
                        )
            finally:
                self._pool.release(instance)

        instance.submit(lambda runner: self._forward(runner, batch, rows), done, self._event_loop)

    def _fail(self, batch: list[_Item], exc: BaseException) -> None:
        error = exc
        if not isinstance(exc, EmberError):
            # Logged once per batch, not once per request in it.
            log.error(
                "batch failed",
                exc_info=exc,
                extra={"model": self._config.name, "requests": len(batch)},
            )
            error = ModelFailed(f"model '{self._config.name}' failed: {type(exc).__name__}: {exc}")
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)

    def _forward(
        self, runner: Runner, batch: list[_Item], rows: list[int]
    ) -> tuple[list[dict[str, np.ndarray]], Execution, float, float]:
        """On the instance's thread: merge, run, split."""
        started = time.monotonic()
        inputs = merge.merge([i.inputs for i in batch], self._padding)
        merged = time.monotonic()
        outputs = runner.predict(inputs)
        inferred = time.monotonic()
        total = sum(rows)
        if self._policy.max_batch_size is not None:
            for name, array in outputs.items():
                if array.ndim == 0 or array.shape[0] != total:
                    raise ModelFailed(
                        f"model '{self._config.name}' returned output '{name}' with shape "
                        f"{list(array.shape)} for a batch of {total} rows"
                    )
        parts = merge.split(outputs, rows, [i.length for i in batch], self._unpad)
        ended = time.monotonic()
        execution = Execution(total, merged - started, inferred - merged, ended - inferred)
        return parts, execution, started, ended
