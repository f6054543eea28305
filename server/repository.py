"""The models this predictor serves, their state, and the thread each one runs on."""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ember.server import collector, loading
from ember.server.batching.batcher import Batcher, Execution, Result
from ember.server.coldstart import LoadPhases
from ember.server.config import ModelConfig
from ember.server.errors import ModelNotFound, ModelNotReady
from ember.server.instances import Instance, InstancePool
from ember.server.metrics import PredictorMetrics
from ember.server.stats import ModelStats
from ember.transformers.chain import Chain

if TYPE_CHECKING:
    from ember.server.prefetch import Prefetch

log = logging.getLogger("ember.server.repository")

# How long an unload waits for the instance threads to end before it collects.
_UNLOAD_JOIN_S = 5.0


class Executor(Protocol):
    """What runs a model's validated requests: its batcher in front of local instances, or
    (in `ember transformer`) a client of the predictor that runs it."""

    def __len__(self) -> int: ...

    def check_room(self) -> None: ...

    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        deadline: float | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> Result: ...

    async def close(self) -> None: ...


class RemoteModels(Protocol):
    """Where `ember transformer` sends a model's requests instead of loading it."""

    async def attach(self, config: ModelConfig) -> Executor: ...


class ModelState(enum.Enum):
    UNAVAILABLE = "UNAVAILABLE"
    LOADING = "LOADING"
    READY = "READY"
    FAILED = "FAILED"


@dataclass(eq=False)
class ModelHandle:
    """One model: its declaration, and once loaded its instances and the batcher in front."""

    config: ModelConfig
    model_dir: Path
    state: ModelState = ModelState.UNAVAILABLE
    pool: InstancePool | None = None
    batcher: Executor | None = None
    # The model's [pipeline], loaded with it.
    chain: Chain | None = None
    error: str | None = None
    stats: ModelStats = field(default_factory=ModelStats)
    # How the last load's time split into download, load and warm-up.
    phases: LoadPhases = field(default_factory=LoadPhases)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def device(self) -> torch.device | None:
        return self.pool.instances[0].device if self.pool else None

    def is_ready(self) -> bool:
        return self.state is ModelState.READY

    def running(self) -> int:
        return self.pool.running() if self.pool else 0

    async def predict(
        self,
        inputs: dict[str, np.ndarray],
        deadline: float | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> Result:
        batcher = self.batcher
        if batcher is None or self.state is not ModelState.READY:
            raise ModelNotReady(self.name)
        return await batcher.submit(inputs, deadline, parameters)

    def queued(self) -> int:
        return len(self.batcher) if self.batcher is not None else 0

    def record(self, execution: Execution) -> None:
        self.stats.record_execution(
            execution.rows, execution.merge_seconds, execution.infer_seconds,
            execution.split_seconds,
        )  # fmt: skip


class ModelRepository:
    def __init__(
        self,
        models: list[tuple[ModelConfig, Path]],
        metrics: PredictorMetrics,
        instance_nice: int = 0,
        remote: RemoteModels | None = None,
        prefetch: Prefetch | None = None,
    ) -> None:
        self._handles = {
            config.name: ModelHandle(config, model_dir) for config, model_dir in models
        }
        self._metrics = metrics
        self._instance_nice = instance_nice
        self._remote = remote
        self._prefetch = prefetch
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
            config = handle.config
            phases = LoadPhases()
            instances: list[Instance] = []
            try:
                if config.pipeline is not None:
                    handle.chain = await asyncio.to_thread(Chain.load, config, handle.model_dir)
                if self._remote is not None:
                    handle.batcher = await self._remote.attach(config)
                else:
                    for device_spec in config.devices:
                        for _ in range(config.instances):
                            runner, device = await asyncio.to_thread(
                                loading.load, config, handle.model_dir, device_spec, phases,
                                self._prefetch,
                            )  # fmt: skip
                            instances.append(
                                Instance(
                                    runner, device, len(instances), name,
                                    nice=self._instance_nice,
                                )
                            )  # fmt: skip
            except Exception as exc:
                handle.state, handle.error = ModelState.FAILED, str(exc)
                if handle.chain is not None:
                    handle.chain.close()
                    handle.chain = None
                raise
            seconds = time.monotonic() - started
            handle.phases = phases
            if self._remote is None:
                handle.pool = InstancePool(instances)
                batch_sizes = self._metrics.model(name).batch_size

                def on_execution(execution: Execution) -> None:
                    handle.record(execution)
                    batch_sizes.observe(execution.rows)

                batcher = Batcher(config, handle.pool, on_execution)
                batcher.start()
                handle.batcher = batcher
            assert handle.batcher is not None
            # Through the handle: a gauge holding the batcher would keep it (and its instances
            # and weights) alive after an unload.
            self._metrics.watch_queue(name, handle.queued)
            handle.state, handle.error = ModelState.READY, None
            self._metrics.model_load_seconds.labels(name).set(seconds)
            self._metrics.model_ready.labels(name).set(1)
            log.info(
                "model loaded",
                extra={
                    "model": name,
                    "devices": sorted({str(i.device) for i in instances}),
                    "instances": len(instances),
                    "batching": config.batching is not None,
                    "seconds": round(seconds, 3),
                },
            )
            return handle

    async def unload(self, name: str) -> None:
        handle = self.get(name)
        async with self._locks[name]:
            device = handle.device
            handle.state = ModelState.UNAVAILABLE
            if handle.batcher is not None:
                await handle.batcher.close()
            pool = handle.pool
            if pool is not None:
                pool.close()
            if handle.chain is not None:
                handle.chain.close()
            handle.batcher, handle.pool, handle.chain = None, None, None
            if pool is not None:
                # Each instance's thread holds its runner until it ends: let it end first
                # (bounded: a forward still running keeps its thread).
                await asyncio.to_thread(pool.join, _UNLOAD_JOIN_S)
                del pool
            # Drop the last references now, so weights (and device memory) go back at once
            # rather than at some later collection.
            collector.collect_all()
            if device is not None and device.type == "cuda":
                torch.cuda.empty_cache()
            self._metrics.model_ready.labels(name).set(0)
            log.info("model unloaded", extra={"model": name})

    def running(self) -> int:
        return sum(h.running() for h in self._handles.values())

    async def close(self) -> None:
        for handle in self._handles.values():
            if handle.batcher is not None:
                await handle.batcher.close()
            if handle.pool is not None:
                handle.pool.close()
            if handle.chain is not None:
                handle.chain.close()
