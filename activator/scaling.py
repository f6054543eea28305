"""One model's scaling settings, resolved: the activator's defaults (Knative's values) with the
model's `[scaling]` section on top."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ember.server.config import ScalingConfig


@dataclass(frozen=True, slots=True)
class ScalingSettings:
    min_replicas: int = 0
    max_replicas: int = 0  # 0 = no limit
    container_concurrency: int = 0  # slots per replica; 0 = no limit
    # None: the container concurrency when there is one, else 100 (Knative's rule).
    target_concurrency: float | None = None
    target_utilization: float = 0.7
    stable_window_s: float = 60.0
    panic_window_pct: float = 10.0
    panic_threshold_pct: float = 200.0
    max_scale_up_rate: float = 1000.0
    max_scale_down_rate: float = 2.0
    scale_to_zero_grace_s: float = 30.0
    activation_timeout_s: float = 300.0
    queue_depth: int = 10_000

    @property
    def target(self) -> float:
        """Concurrency per replica the scaler aims for (Knative: target x utilisation)."""
        per_replica = self.target_concurrency
        if per_replica is None:
            per_replica = float(self.container_concurrency or 100)
        elif self.container_concurrency:
            # A target above the hard limit could never be reached.
            per_replica = min(per_replica, float(self.container_concurrency))
        return max(0.01, per_replica * self.target_utilization)

    @property
    def panic_window_s(self) -> float:
        return self.stable_window_s * self.panic_window_pct / 100.0

    @property
    def panic_threshold(self) -> float:
        return self.panic_threshold_pct / 100.0

    def clamp(self, replicas: int) -> int:
        if self.max_replicas:
            replicas = min(replicas, self.max_replicas)
        return max(replicas, self.min_replicas)

    def with_model(self, section: ScalingConfig | None) -> ScalingSettings:
        """These defaults with every key the model's `[scaling]` section sets."""
        if section is None:
            return self
        overrides = {k: v for k, v in section.model_dump().items() if v is not None}
        resolved = dataclasses.replace(self, **overrides)
        resolved.check()
        return resolved

    def check(self) -> None:
        """Raise ValueError for settings that cannot work together."""
        if self.max_replicas and self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}"
            )
