"""What both sides did during a level's measured window: the batches the server ran (from its
Triton statistics, `GET /v2/models/{m}/stats`) and the CPU the client and the server used.

The statistics are cumulative, so a window's batches are the difference of two readings, one
when the window opens and one when it closes (`Probe`). The differences are pure functions.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from ember.server.bench import cpus
from ember.server.bench.load import Observed


@dataclass(frozen=True, slots=True)
class ServerCounters:
    """One reading of a model's cumulative statistics."""

    inferences: int
    executions: int
    batches: dict[int, int]  # batch size (rows per forward) -> executions
    forward_ns: int  # the forwards' own time, summed over batch sizes


def counters(doc: Any, model: str) -> ServerCounters | None:
    """The model's counters from a `/v2/models/{m}/stats` answer; None when it holds none."""
    stats = doc.get("model_stats") if isinstance(doc, dict) else None
    if not isinstance(stats, list):
        return None
    for entry in stats:
        if not isinstance(entry, dict) or entry.get("name") != model:
            continue
        batches: dict[int, int] = {}
        forward_ns = 0
        for item in entry.get("batch_stats") or []:
            infer = item.get("compute_infer") or {}
            batches[int(item["batch_size"])] = int(infer.get("count", 0))
            forward_ns += int(infer.get("ns", 0))
        return ServerCounters(
            inferences=int(entry.get("inference_count", 0)),
            executions=int(entry.get("execution_count", 0)),
            batches=batches,
            forward_ns=forward_ns,
        )
    return None


def batch_diff(before: Mapping[int, int], after: Mapping[int, int]) -> dict[int, int]:
    """Executions per batch size between two readings; sizes that did not run are left out."""
    diff = {size: count - before.get(size, 0) for size, count in after.items()}
    return {size: count for size, count in sorted(diff.items()) if count > 0}


@dataclass(frozen=True, slots=True)
class _Reading:
    at: float
    client_cpu: float
    server_cpu: float | None
    machine_busy: float | None
    server: ServerCounters | None


class Probe:
    """Reads both sides when a level's window opens (`open`) and closes (`close`); `result`
    is the difference. Pass `open` and `close` to `run_level` as its hooks.

    The client's CPU is this process's (every thread: the loop, grpc's and aiohttp's); the
    server's is read from `/proc/PID/stat` when it is a child of this bench."""

    def __init__(
        self,
        stats_url: str,
        model: str,
        *,
        server_pid: int | None,
        client_cores: int,
        server_cores: int | None,
        timeout: float = 5.0,
    ) -> None:
        self._url = f"{stats_url.rstrip('/')}/v2/models/{model}/stats"
        self._model = model
        self._pid = server_pid
        self._client_cores = client_cores
        self._server_cores = server_cores
        self._timeout = timeout
        self._first: _Reading | None = None
        self._last: _Reading | None = None

    async def _server_counters(self) -> ServerCounters | None:
        # A fresh connection each time: two requests per level, and none of the load's
        # connections is disturbed. A server without statistics leaves the batches unknown.
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout)) as s,
                s.get(self._url) as answer,
            ):
                if answer.status != 200:
                    return None
                return counters(orjson.loads(await answer.read()), self._model)
        except (OSError, TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError):
            return None

    async def _read(self) -> _Reading:
        # CPU first and last around the statistics request, so its own cost is inside.
        server_cpu = None if self._pid is None else cpus.process_cpu_seconds(self._pid)
        client_cpu = time.process_time()
        machine = cpus.machine_busy_seconds()
        at = time.perf_counter()
        server = await self._server_counters()
        return _Reading(at, client_cpu, server_cpu, machine, server)

    async def open(self) -> None:
        self._first = await self._read()

    async def close(self) -> None:
        self._last = await self._read()

    def result(self) -> Observed | None:
        first, last = self._first, self._last
        if first is None or last is None or last.at <= first.at:
            return None
        seconds = last.at - first.at
        client_cpu = (last.client_cpu - first.client_cpu) / seconds
        server_cpu = None
        if first.server_cpu is not None and last.server_cpu is not None:
            server_cpu = (last.server_cpu - first.server_cpu) / seconds
        other_cpu = None
        if first.machine_busy is not None and last.machine_busy is not None:
            # The machine's busy time less the two sides': the kernel's ticks are 10 ms, so
            # small values are noise; never below zero.
            busy = (last.machine_busy - first.machine_busy) / seconds
            other_cpu = max(0.0, busy - client_cpu - (server_cpu or 0.0))
        batches = inferences = executions = None
        forward = None
        if first.server is not None and last.server is not None:
            batches = batch_diff(first.server.batches, last.server.batches)
            inferences = last.server.inferences - first.server.inferences
            executions = last.server.executions - first.server.executions
            forward = (last.server.forward_ns - first.server.forward_ns) / 1e9
        return Observed(
            seconds=seconds, batches=batches, inferences=inferences, executions=executions,
            forward_seconds=forward, client_cpu=client_cpu, client_cores=self._client_cores,
            server_cpu=server_cpu, server_cores=self._server_cores, other_cpu=other_cpu,
        )  # fmt: skip
