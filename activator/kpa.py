"""Knative's KPA rules as pure code: concurrency averages and replica counts in, a desired
replica count out. The clock is an argument; measuring and acting are the caller's job."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ember.activator.scaling import ScalingSettings

# Why a decision came out as it did, for logs and status:
#   stable  the stable-window rule (rate limits and min/max applied)
#   panic   in panic: the highest count asked for since panic began, or more
#   grace   the rule says 0, but the last replica stays until the grace period has passed
#   idle    0 replicas
#   wake    the rule says 0 while requests wait at the activator: 1, at once
Reason = Literal["stable", "panic", "grace", "idle", "wake"]

# Averages are sums of float products, so a ratio that is 2 on paper can come out as
# 2.0000000000000004, and ceil would then ask for a replica nobody needs.
_DIGITS = 9


def _ceil(x: float) -> int:
    return math.ceil(round(x, _DIGITS))


def _floor(x: float) -> int:
    return math.floor(round(x, _DIGITS))


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int  # replicas wanted now, after clamps, panic and scale-to-zero grace
    panic: bool
    stable_avg: float
    panic_avg: float
    reason: Reason


class Kpa:
    """One model's autoscaler: the rules, plus the state they need between evaluations (the
    panic episode and how long the rule has said 0)."""

    def __init__(self, settings: ScalingSettings) -> None:
        self._settings = settings
        # Set while in panic: the last evaluation that met the panic condition.
        self._panic_seen: float | None = None
        self._panic_peak = 0
        # When the rule started saying 0 without a break, if it says 0 now.
        self._zero_since: float | None = None

    @property
    def settings(self) -> ScalingSettings:
        return self._settings

    @property
    def in_panic(self) -> bool:
        return self._panic_seen is not None

    def evaluate(
        self,
        now: float,
        *,
        stable_avg: float,
        panic_avg: float,
        ready: int,
        starting: int,
        current: int = 0,
    ) -> Decision:
        """Desired replicas at `now`, from the average concurrency over the stable and the panic
        window, the replicas ready and those still starting, and `current`, the requests at
        the activator right now (queued included)."""
        if min(stable_avg, panic_avg) < 0 or min(ready, starting, current) < 0:
            raise ValueError("averages and counts cannot be negative")
        s = self._settings
        r = max(1, ready)
        max_up = _ceil(s.max_scale_up_rate * r)
        max_down = _floor(r / s.max_scale_down_rate)  # the floor for one step down
        dspc = _ceil(stable_avg / s.target)
        dppc = _ceil(panic_avg / s.target)
        stable = min(max(dspc, max_down), max_up)
        panic = min(max(dppc, max_down), max_up)

        # NOTE: deliberate deviation from Knative, which divides by ready replicas only.
        # Replicas already starting count here: demand queued while a replica loads all waits
        # on that cold start, and judged against ready replicas alone it looks like a burst,
        # so the scaler panics and over-provisions (knative/serving#4344).
        provisioned = max(1, ready + starting)
        if round(dppc / provisioned - s.panic_threshold, _DIGITS) >= 0:
            if self._panic_seen is None:
                self._panic_peak = 0
            self._panic_seen = now
        elif self._panic_seen is not None and now - self._panic_seen >= s.stable_window_s:
            self._panic_seen = None

        reason: Reason
        if self._panic_seen is not None:
            # Never scale down in panic: the burst may come back before the averages show it.
            self._panic_peak = max(stable, panic, self._panic_peak)
            desired, reason = self._panic_peak, "panic"
        else:
            desired, reason = stable, "stable"
        desired = s.clamp(desired)

        if desired > 0:
            self._zero_since = None
        elif current > 0:
            # A request that has only just arrived has not moved the averages yet; it must not
            # wait for them to reach a replica.
            self._zero_since = None
            desired, reason = 1, "wake"
        else:
            if self._zero_since is None:
                self._zero_since = now
            # Grace keeps a replica that exists; with none left, it would start one for nothing.
            if ready + starting > 0 and now - self._zero_since < s.scale_to_zero_grace_s:
                desired, reason = 1, "grace"
            else:
                reason = "idle"
        return Decision(desired, self.in_panic, stable_avg, panic_avg, reason)
