"""Per-model inference statistics with Triton's names and units (counts, nanoseconds).

The same document answers HTTP `GET /v2/models/{m}/stats` and, parsed into protobuf,
gRPC `ModelStatistics`, so the two can never disagree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)

    def doc(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    """Cumulative counters. Phases: `queue` waiting for the model's thread, `compute_input`
    validating and converting inputs, `compute_infer` the forward pass, `compute_output`
    shaping outputs; `success`/`fail` whole requests."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchStats] = field(default_factory=dict)
    # Failed requests by Triton's reason label (REJECTED, BACKEND, OTHER).
    failures: dict[str, int] = field(default_factory=dict)

    def record_success(
        self, rows: int, total: float, queue: float, inputs: float, infer: float, outputs: float
    ) -> None:
        """One request answered; `infer` is the forward of the batch it ran in."""
        self.success.add(total)
        self.queue.add(queue)
        self.compute_input.add(inputs)
        self.compute_infer.add(infer)
        self.compute_output.add(outputs)
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)

    def record_execution(
        self, batch_size: int, inputs: float, infer: float, outputs: float
    ) -> None:
        """One forward pass, whatever number of requests it carried."""
        self.execution_count += 1
        batch = self.batches.setdefault(batch_size, BatchStats())
        batch.compute_input.add(inputs)
        batch.compute_infer.add(infer)
        batch.compute_output.add(outputs)

    def record_failure(self, total: float, reason: str) -> None:
        self.fail.add(total)
        self.failures[reason] = self.failures.get(reason, 0) + 1

    def doc(self, name: str, version: str) -> dict[str, Any]:
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.doc(),
                "fail": self.fail.doc(),
                "queue": self.queue.doc(),
                "compute_input": self.compute_input.doc(),
                "compute_infer": self.compute_infer.doc(),
                "compute_output": self.compute_output.doc(),
                "cache_hit": {"count": 0, "ns": 0},
                "cache_miss": {"count": 0, "ns": 0},
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": b.compute_input.doc(),
                    "compute_infer": b.compute_infer.doc(),
                    "compute_output": b.compute_output.doc(),
                }
                for size, b in sorted(self.batches.items())
            ],
        }
