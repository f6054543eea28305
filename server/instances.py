"""Model instances: each one a loaded copy of the model with its own thread (and, on CUDA,
its own stream, held by its runner), and the pool that hands out idle ones."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from ember.server.runners import Runner

T = TypeVar("T")


class Instance:
    def __init__(self, runner: Runner, device: torch.device, index: int, model: str) -> None:
        self.runner = runner
        self.device = device
        self.index = index
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"ember-{model}-{index}")
        # Calls executing on the thread right now (read at shutdown).
        self.running = 0

    async def run(self, work: Callable[[Runner], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._call, work)

    def _call(self, work: Callable[[Runner], T]) -> T:
        self.running += 1
        try:
            with torch.inference_mode():
                return work(self.runner)
        finally:
            self.running -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


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
            best = min(self._idle, key=lambda i: self._busy_on(i.device))
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
