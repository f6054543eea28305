"""The models this predictor serves, their state, and the thread each one runs on."""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ember.server import loading
from ember.server.config import ModelConfig
from ember.server.errors import DeadlineExceeded, ModelNotFound, ModelNotReady
from ember.server.metrics import PredictorMetrics
from ember.server.runners import Runner
from ember.server.stats import ModelStats

log = logging.getLogger("ember.server.repository")


class ModelState(enum.Enum):
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"


@dataclass(slots=True)
class Execution:
    outputs: dict[str, np.ndarray]
    # time.monotonic() when the model's thread took the work up and when the forward ended.
    started: float
    ended: float


@dataclass(eq=False)
class ModelHandle:
    """One model: its declaration, its runner once loaded, and the one thread it runs on."""

    config: ModelConfig
    model_dir: Path
    state: ModelState = ModelState.UNAVAILABLE
    runner: Runner | None = None
    device: torch.device | None = None
    error: str | None = None
    stats: ModelStats = field(default_factory=ModelStats)
    # Forwards executing right now on this model's thread (read at shutdown).
    running: int = 0
    # One thread per instance: a forward never runs on the event loop, and torch sees one
    # caller at a time (the batching issue adds instances and a queue in front).
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="ember-model")
    )

    @property
    def name(self) -> str:
        return self.config.name

    def is_ready(self) -> bool:
        return self.state is ModelState.READY

    async def predict(
        self, inputs: dict[str, np.ndarray], deadline: float | None = None
    ) -> Execution:
        runner = self.runner
        if runner is None or self.state is not ModelState.READY:
            raise ModelNotReady(self.name)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._run, runner, inputs, deadline)

    def _run(
        self, runner: Runner, inputs: dict[str, np.ndarray], deadline: float | None
    ) -> Execution:
        """On the model's thread."""
        started = time.monotonic()
        if deadline is not None and started >= deadline:
            # Expired while waiting for the thread: drop it without running.
            raise DeadlineExceeded("request deadline passed before the model could run it")
        self.running += 1
        try:
            with torch.inference_mode():
                outputs = runner.predict(inputs)
        finally:
            self.running -= 1
        return Execution(outputs, started, time.monotonic())


class ModelRepository:
    def __init__(self, models: list[tuple[ModelConfig, Path]], metrics: PredictorMetrics) -> None:
        self._handles = {
            config.name: ModelHandle(config, model_dir) for config, model_dir in models
        }
        self._metrics = metrics
        self._locks = {name: asyncio.Lock() for name in self._handles}

    def names(self) -> list[str]:
        return list(self._handles)

    def has(self, name: str) -> bool:
        return name in self._handles

    def handles(self) -> list[ModelHandle]:
        return list(self._handles.values())

    def get(self, name: str, version: str | None = None) -> ModelHandle:
        handle = self._handles.get(name)
        if handle is None or (version not in (None, "", handle.config.version)):
            raise ModelNotFound(name, version or None)
        return handle

    def ready_handle(self, name: str, version: str | None = None) -> ModelHandle:
        handle = self.get(name, version)
        if not handle.is_ready():
            raise ModelNotReady(name)
        return handle

    def all_ready(self) -> bool:
        return all(h.is_ready() for h in self._handles.values())

    async def load(self, name: str) -> ModelHandle:
        """Load (or reload) one model on its own thread; raises loading.LoadError."""
        handle = self.get(name)
        async with self._locks[name]:
            if handle.is_ready():
                return handle
            handle.state = ModelState.LOADING
            started = time.monotonic()
            loop = asyncio.get_running_loop()
            try:
                runner, device = await loop.run_in_executor(
                    handle.executor, loading.load, handle.config, handle.model_dir
                )
            except Exception as exc:
                handle.state, handle.error = ModelState.FAILED, str(exc)
                raise
            seconds = time.monotonic() - started
            handle.runner, handle.device = runner, device
            handle.state, handle.error = ModelState.READY, None
            self._metrics.model_load_seconds.labels(name).set(seconds)
            self._metrics.model_ready.labels(name).set(1)
            log.info(
                "model loaded",
                extra={"model": name, "device": str(device), "seconds": round(seconds, 3)},
            )
            return handle

    async def unload(self, name: str) -> None:
        handle = self.get(name)
        async with self._locks[name]:
            device = handle.device
            handle.state, handle.runner = ModelState.UNAVAILABLE, None
            # Drop the last references now, so weights (and device memory) go back at once
            # rather than at some later collection.
            gc.collect()
            if device is not None and device.type == "cuda":
                torch.cuda.empty_cache()
            self._metrics.model_ready.labels(name).set(0)
            log.info("model unloaded", extra={"model": name})

    def running(self) -> int:
        return sum(h.running for h in self._handles.values())

    def close(self) -> None:
        for handle in self._handles.values():
            handle.executor.shutdown(wait=False, cancel_futures=True)
