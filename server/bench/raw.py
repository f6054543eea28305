"""The ceiling: the model's forward pass in this process, without HTTP, JSON or an event loop.

The model is loaded through the server's own loader and called the way the server calls it
(`ember.server.repository`): from one dedicated thread, under `torch.inference_mode()`, with
the same named numpy inputs the load sends. What the served latency adds on top is overhead.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ember.server import loading
from ember.server.bench.load import Clock, RawRate, raw_rate

__all__ = ["RawRate", "batched", "configure_threads", "load_model", "raw_rate", "time_forward"]
from ember.server.config import ModelConfig, discover
from ember.server.runners import Runner

WARMUP_CALLS = 50


def load_model(repository: Path, model: str) -> tuple[ModelConfig, Runner]:
    """The model's declaration and a warmed-up runner, exactly as `ember serve` loads it."""
    ((config, model_dir),) = discover(repository, [model])
    runner, _device = loading.load(config, model_dir)
    return config, runner


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None keeps torch's default, as `ember serve` does)."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def _forward(runner: Runner, inputs: dict[str, np.ndarray]) -> None:
    # Entered per call, like `repository._run_inference`: its cost is part of the forward.
    with torch.inference_mode():
        runner.predict(inputs)


def _timed_loop(
    runner: Runner, inputs: dict[str, np.ndarray], seconds: float, clock: Clock
) -> list[float]:
    # OpenMP's thread count is per thread: a new thread starts from the process default
    # (every CPU the process could use when it started), not from what `configure_threads`
    # set on the main thread. Pinned to one core, a batch > 1 then ran on 2 OpenMP threads
    # that spin against each other: 24 ms a forward instead of 0.4 ms.
    torch.set_num_threads(torch.get_num_threads())
    for _ in range(WARMUP_CALLS):
        _forward(runner, inputs)
    latencies = []
    end = clock() + seconds
    while True:
        sent = clock()
        _forward(runner, inputs)
        done = clock()
        latencies.append(done - sent)
        if done >= end:
            return latencies


def time_forward(
    runner: Runner,
    inputs: dict[str, np.ndarray],
    seconds: float,
    clock: Clock = time.perf_counter,
) -> list[float]:
    """Latencies (seconds) of back-to-back forwards for `seconds`, after a short warm-up.

    Runs on its own thread, as the server's model executor does, so thread-local torch state
    (inference mode, per-thread allocator caches) behaves as it does when served.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="ember-bench-raw") as pool:
        return pool.submit(_timed_loop, runner, inputs, seconds, clock).result()


def batched(inputs: dict[str, np.ndarray], requests: int) -> dict[str, np.ndarray]:
    """`requests` copies of one request's inputs, stacked along the batch dimension: what the
    server's batcher hands the model when it merges that many of them."""
    if requests < 1:
        raise ValueError(f"a batch holds at least one request, got {requests}")
    return {name: np.concatenate([array] * requests, axis=0) for name, array in inputs.items()}
