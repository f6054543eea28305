"""One model behind the activator: its replicas and queue, its measured concurrency and the
KPA that turns that into a replica count."""

from __future__ import annotations

from collections.abc import Callable

from ember.activator.concurrency import ConcurrencyWindow
from ember.activator.kpa import Decision, Kpa
from ember.activator.scaling import ScalingSettings
from ember.activator.throttler import Throttler


class Service:
    def __init__(self, name: str, settings: ScalingSettings, now: float) -> None:
        self.name = name
        self.settings = settings
        self.throttler = Throttler(name, settings.container_concurrency, settings.queue_depth)
        self.window = ConcurrencyWindow(now)
        self.kpa = Kpa(settings)
        self.decision: Decision | None = None
        self.desired = settings.min_replicas
        # Set by the autoscaler: evaluate this model now rather than at the next tick.
        self.poke: Callable[[], None] = lambda: None

    def arrive(self, now: float) -> bool:
        """A request came in (queued requests count as concurrency). True when no replica is
        ready for it: it waits for a cold start."""
        self.window.change(1, now)
        if self.desired == 0:
            # The first request of a model at zero is acted on at once, not at the next tick.
            self.poke()
        return self.throttler.ready == 0

    def leave(self, now: float) -> None:
        self.window.change(-1, now)

    def evaluate(self, now: float, starting: int) -> Decision:
        settings = self.settings
        stable = self.window.average(settings.stable_window_s, now)
        panic = self.window.average(settings.panic_window_s, now)
        current = self.window.current
        if current and self.throttler.ready + starting == 0:
            # Demand that just arrived at zero has not yet weighed in any average: act on it
            # as it stands (Knative's activator sends a stat at once for the same reason).
            stable, panic = max(stable, current), max(panic, current)
        decision = self.kpa.evaluate(
            now, stable_avg=stable, panic_avg=panic, ready=self.throttler.ready, starting=starting
        )
        self.decision = decision
        self.desired = decision.desired
        return decision

    def demand(self) -> float:
        """The average concurrency the last decision acted on (the panic window's while in
        panic), for KEDA's HPA: it scales to ceil(demand / target)."""
        decision = self.decision
        if decision is None:
            return float(self.window.current)
        return decision.panic_avg if decision.panic else decision.stable_avg
