"""`--compare activator`: the model served by a replica that `ember activator` starts, measured
through the activator. Its first request wakes the model from zero, so the same run also
measures the cold start through the activator beside the predictor's own start-to-ready.

The bench only talks to the activator over the wire (`/status`, `/metrics`), as a user would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from ember.server.bench.errors import BenchError
from ember.server.bench.protocols import LoadProtocol


@dataclass(frozen=True, slots=True)
class ColdStart:
    """One wake-up from zero: seconds, each on its own clock."""

    first_response_s: float  # the bench: request sent -> answer read
    replica_ready_s: float | None  # the activator: replica started -> first ready probe
    predictor_ready_s: float | None  # the replica itself: process created -> ready
    replica_pid: int | None
    replica_url: str | None

    @property
    def added_s(self) -> float | None:
        """What the activator added to the predictor's own start: the target's number."""
        if self.predictor_ready_s is None:
            return None
        return self.first_response_s - self.predictor_ready_s


def _sample(text: str, name: str, labels: dict[str, str]) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


async def _get(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as answer:
        if answer.status != 200:
            raise BenchError(f"GET {url}: {answer.status} {await answer.text()}")
        return await answer.text()


async def replica(activator_url: str, model: str) -> dict[str, Any]:
    """The first ready replica the activator lists for `model`."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        status = orjson.loads(await _get(session, f"{activator_url}/status"))
    replicas = status.get("models", {}).get(model, {}).get("replicas", [])
    ready = [r for r in replicas if r.get("state") == "ready"]
    if not ready:
        raise BenchError(f"the activator lists no ready replica of '{model}': {replicas}")
    found: dict[str, Any] = ready[0]
    return found


async def measure_cold_start(
    protocol: LoadProtocol, endpoints: dict[str, str], model: str
) -> ColdStart:
    """Send the first request of a model at zero and read what each side measured."""
    activator_url = endpoints["http"]
    started = time.monotonic()
    await protocol.check(endpoints[protocol.transport])
    first = time.monotonic() - started
    found = await replica(activator_url, model)
    replica_url = f"http://127.0.0.1:{found['http_port']}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        own = await _get(session, f"{activator_url}/metrics")
        theirs = await _get(session, f"{replica_url}/metrics")
    return ColdStart(
        first_response_s=first,
        replica_ready_s=_sample(
            own, "ember_activator_cold_start_seconds_sum", {"model_name": model}
        ),
        predictor_ready_s=_sample(
            theirs, "ember_cold_start_seconds", {"model_name": model, "phase": "total"}
        ),
        replica_pid=found.get("pid"),
        replica_url=replica_url,
    )


def format_cold_start(cold: ColdStart) -> str:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} s"

    return "\n".join(
        [
            "cold start through the activator (the model at zero, warm node cache):",
            f"  first response (client)            {seconds(cold.first_response_s)}",
            f"  replica start -> ready (activator) {seconds(cold.replica_ready_s)}",
            f"  process start -> ready (predictor) {seconds(cold.predictor_ready_s)}",
            f"  added by the activator             {seconds(cold.added_s)}",
        ]
    )
