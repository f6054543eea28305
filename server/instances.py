"""Model instances: each one a loaded copy of the model with its own thread (and, on CUDA,
its own stream, held by its runner), and the pool that hands out idle ones."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ember.server.runners import Runner

T = TypeVar("T")

# What the instance's thread reports back on the event loop: (result, None) or (None, error).
Done = Callable[[Any, BaseException | None], None]


class Instance:
    """A dedicated thread fed through a queue. The thread hands each result back with one
    `call_soon_threadsafe`; no executor futures or extra tasks on the request path.

    The thread is a daemon: a forward still running when the drain budget is spent must not
    keep the process alive.
    """

    def __init__(
        self, runner: Runner, device: torch.device, index: int, model: str, nice: int = 0
    ) -> None:
        self.runner = runner
        self._nice = nice
        self.device = device
        self.index = index
        # Calls executing on the thread right now (read at shutdown).
        self.running = 0
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[Runner], Any], Done, asyncio.AbstractEventLoop] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._serve, name=f"ember-{model}-{index}", daemon=True
        )
        self._thread.start()

    def submit(
        self,
        work: Callable[[Runner], Any],
        done: Done,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Run `work(runner)` on the instance's thread; `done` is called on `loop`, by default
        the running one (a caller that has it saves get_running_loop's getpid())."""
        self._jobs.put((work, done, loop or asyncio.get_running_loop()))

    async def run(self, work: Callable[[Runner], T]) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def done(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self.submit(work, done)
        return await future

    def _serve(self) -> None:
        if self._nice:
            _lower_priority(self._nice)
        while (job := self._jobs.get()) is not None:
            work, done, loop = job
            self.running += 1
            result: Any = None
            error: BaseException | None = None
            try:
                with torch.inference_mode():
                    result = work(self.runner)
            except BaseException as exc:
                error = exc
            finally:
                self.running -= 1
            try:
                loop.call_soon_threadsafe(done, result, error)
            except RuntimeError:
                return  # the loop is closed: the server is gone

    def close(self) -> None:
        self._jobs.put(None)

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` for the thread to end after `close` (it ends once the
        forward it may be running returns)."""
        self._thread.join(timeout)


def _lower_priority(increment: int) -> None:
    """Add `increment` to this thread's nice value. Linux keeps one per thread; raising it
    needs no privilege. Elsewhere (or refused) the thread keeps its priority."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError):
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))


class InstancePool:
    """Idle instances, handed out one batch at a time: an instance runs one batch, so "least
    loaded" means idle, preferring the device with the fewest busy instances."""

    def __init__(self, instances: list[Instance]) -> None:
        self.instances = instances
        self._idle = list(instances)
        self._waiters: deque[asyncio.Future[Instance]] = deque()

    def _busy_on(self, device: torch.device) -> int:
        idle = sum(1 for i in self._idle if i.device == device)
        return sum(1 for i in self.instances if i.device == device) - idle

    async def acquire(self) -> Instance:
        if self._idle:
            best = (
                self._idle[0]
                if len(self._idle) == 1
                else min(self._idle, key=lambda i: self._busy_on(i.device))
            )
            self._idle.remove(best)
            return best
        waiter: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return await waiter

    def release(self, instance: Instance) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(instance)
                return
        self._idle.append(instance)

    def running(self) -> int:
        return sum(i.running for i in self.instances)

    def close(self) -> None:
        for instance in self.instances:
            instance.close()

    def join(self, timeout: float) -> None:
        """Wait, up to `timeout` in all, for every instance's thread to end after `close`."""
        deadline = time.monotonic() + timeout
        for instance in self.instances:
            instance.join(max(0.0, deadline - time.monotonic()))
