"""The KPA rules, one evaluation at a time and as traces in simulated time."""

from __future__ import annotations

import pytest

from ember.activator.concurrency import ConcurrencyWindow
from ember.activator.kpa import Decision, Kpa
from ember.activator.scaling import ScalingSettings

DEFAULTS = ScalingSettings()  # target 100 x 0.7 = 70


def test_default_target_is_70() -> None:
    assert DEFAULTS.target == 70.0


@pytest.mark.parametrize(
    ("settings", "stable_avg", "panic_avg", "ready", "starting", "desired", "panic"),
    [
        pytest.param(DEFAULTS, 0.0, 0.0, 0, 0, 0, False, id="nothing-no-replicas"),
        pytest.param(DEFAULTS, 1 / 60, 1 / 6, 0, 0, 1, False, id="first-request-from-zero"),
        pytest.param(DEFAULTS, 70.0, 70.0, 1, 0, 1, False, id="one-target-one-replica"),
        pytest.param(DEFAULTS, 70.5, 70.5, 2, 0, 2, False, id="just-above-one-target"),
        pytest.param(DEFAULTS, 0.0, 0.0, 10, 0, 5, False, id="down-at-most-half"),
        pytest.param(DEFAULTS, 420.0, 420.0, 10, 0, 6, False, id="down-within-the-rate"),
        pytest.param(
            ScalingSettings(max_scale_down_rate=4), 0.0, 0.0, 10, 0, 2, False, id="down-rate-4"
        ),
        pytest.param(
            ScalingSettings(max_scale_up_rate=2), 7000.0, 100.0, 3, 0, 6, False, id="up-rate-2"
        ),
        pytest.param(
            ScalingSettings(max_scale_up_rate=1.5), 7000.0, 100.0, 3, 0, 5, False, id="up-rate-1.5"
        ),
        pytest.param(DEFAULTS, 7000.0, 100.0, 3, 0, 100, False, id="up-rate-1000"),
        pytest.param(ScalingSettings(min_replicas=3), 70.0, 70.0, 1, 0, 3, False, id="min"),
        pytest.param(ScalingSettings(max_replicas=4), 700.0, 350.0, 5, 0, 4, False, id="max"),
        # knative/serving#4344: 100 requests queued, nothing ready, 2 replicas loading.
        pytest.param(DEFAULTS, 100.0, 100.0, 0, 2, 2, False, id="4344-starting-count"),
        pytest.param(DEFAULTS, 100.0, 100.0, 0, 0, 2, True, id="4344-nothing-starting"),
        pytest.param(DEFAULTS, 7000.0, 7000.0, 1, 0, 100, True, id="panic-burst"),
        pytest.param(
            ScalingSettings(panic_threshold_pct=110), 700.0, 770.0, 10, 0, 11, True, id="pct-110"
        ),
        # target 10 x 0.7 = 7
        pytest.param(
            ScalingSettings(container_concurrency=10), 15.0, 15.0, 3, 0, 3, False, id="cc"
        ),
        # target min(50, 10) x 0.7 = 7, not 35
        pytest.param(
            ScalingSettings(container_concurrency=10, target_concurrency=50),
            36.0,
            36.0,
            4,
            0,
            6,
            False,
            id="cc-caps-target",
        ),
        pytest.param(
            ScalingSettings(target_concurrency=10, target_utilization=1.0),
            25.0,
            25.0,
            3,
            0,
            3,
            False,
            id="target-concurrency",
        ),
        # 2.1 / 0.7 is 3.0000000000000004 in floating point
        pytest.param(
            ScalingSettings(container_concurrency=1), 2.1, 2.1, 3, 0, 3, False, id="noise"
        ),
        pytest.param(DEFAULTS, 140.00000000001, 140.00000000001, 2, 0, 2, False, id="noise-70"),
    ],
)
def test_one_evaluation(
    settings: ScalingSettings,
    stable_avg: float,
    panic_avg: float,
    ready: int,
    starting: int,
    desired: int,
    panic: bool,
) -> None:
    kpa = Kpa(settings)
    decision = kpa.evaluate(
        0.0, stable_avg=stable_avg, panic_avg=panic_avg, ready=ready, starting=starting
    )
    assert (decision.desired, decision.panic) == (desired, panic)
    assert decision.reason == ("panic" if panic else "stable" if desired else "idle")
    assert kpa.in_panic is panic


def test_the_decision_carries_the_averages() -> None:
    decision = Kpa(DEFAULTS).evaluate(0.0, stable_avg=100.0, panic_avg=50.0, ready=2, starting=0)
    assert decision == Decision(2, False, 100.0, 50.0, "stable")


def test_the_first_request_at_zero_scales_up_at_once() -> None:
    kpa = Kpa(DEFAULTS)
    assert kpa.evaluate(0.0, stable_avg=0.0, panic_avg=0.0, ready=0, starting=0).desired == 0
    # It arrived at this instant: the averages have not moved yet.
    woken = kpa.evaluate(2.0, stable_avg=0.0, panic_avg=0.0, ready=0, starting=0, current=1)
    assert (woken.desired, woken.reason) == (1, "wake")
    later = kpa.evaluate(4.0, stable_avg=2 / 60, panic_avg=2 / 6, ready=0, starting=1, current=1)
    assert (later.desired, later.reason) == (1, "stable")


def test_ramp_follows_the_stable_average() -> None:
    kpa = Kpa(DEFAULTS)
    ready = 2
    for now, avg, desired in [
        (0.0, 140.0, 2),
        (2.0, 200.0, 3),
        (4.0, 270.0, 4),
        (6.0, 350.0, 5),
        (8.0, 560.0, 8),
        (10.0, 700.0, 10),
    ]:
        decision = kpa.evaluate(now, stable_avg=avg, panic_avg=avg, ready=ready, starting=0)
        assert (decision.desired, decision.reason) == (desired, "stable"), now
        ready = decision.desired


def test_steady_traffic_holds() -> None:
    kpa = Kpa(DEFAULTS)
    for step in range(30):
        decision = kpa.evaluate(step * 2.0, stable_avg=350.0, panic_avg=350.0, ready=5, starting=0)
        assert (decision.desired, decision.panic, decision.reason) == (5, False, "stable")


def test_idle_keeps_the_last_replica_for_the_grace_period() -> None:
    kpa = Kpa(DEFAULTS)  # grace 30 s
    for now in range(0, 30, 2):
        decision = kpa.evaluate(now, stable_avg=0.0, panic_avg=0.0, ready=1, starting=0)
        assert (decision.desired, decision.reason) == (1, "grace"), now
    decision = kpa.evaluate(30.0, stable_avg=0.0, panic_avg=0.0, ready=1, starting=0)
    assert (decision.desired, decision.reason) == (0, "idle")
    decision = kpa.evaluate(32.0, stable_avg=0.0, panic_avg=0.0, ready=0, starting=0)
    assert (decision.desired, decision.reason) == (0, "idle")


def test_any_traffic_restarts_the_grace_period() -> None:
    kpa = Kpa(DEFAULTS)
    for now in range(0, 20, 2):
        assert kpa.evaluate(now, stable_avg=0.0, panic_avg=0.0, ready=1, starting=0).desired == 1
    busy = kpa.evaluate(20.0, stable_avg=5.0, panic_avg=0.0, ready=1, starting=0)
    assert (busy.desired, busy.reason) == (1, "stable")
    reasons = {
        now: kpa.evaluate(now, stable_avg=0.0, panic_avg=0.0, ready=1, starting=0).reason
        for now in range(22, 56, 2)
    }
    assert [now for now, reason in reasons.items() if reason == "idle"] == [52, 54]


def test_idle_to_zero_from_measured_concurrency() -> None:
    """One request over [0, 10], then nothing: the stable average reaches 0 a stable window
    after the traffic ended (t=70), and the replica goes a grace period after that (t=100)."""
    settings = DEFAULTS
    window = ConcurrencyWindow(0.0)
    window.change(+1, 0.0)
    kpa = Kpa(settings)
    ready = 1
    reasons: dict[int, str] = {}
    for now in range(2, 122, 2):
        if now == 10:
            window.change(-1, 10.0)
        decision = kpa.evaluate(
            now,
            stable_avg=window.average(settings.stable_window_s, now),
            panic_avg=window.average(settings.panic_window_s, now),
            ready=ready,
            starting=0,
        )
        assert decision.desired == (0 if now >= 100 else 1), now
        assert not decision.panic
        reasons[now] = decision.reason
        ready = decision.desired
    assert {reasons[t] for t in range(2, 70, 2)} == {"stable"}
    assert {reasons[t] for t in range(70, 100, 2)} == {"grace"}
    assert {reasons[t] for t in range(100, 122, 2)} == {"idle"}


@pytest.mark.parametrize("now", [0.0, 100.0, 1000.0])
def test_min_replicas_never_goes_to_zero(now: float) -> None:
    kpa = Kpa(ScalingSettings(min_replicas=1))
    for step in range(200):
        decision = kpa.evaluate(now + step * 2, stable_avg=0.0, panic_avg=0.0, ready=1, starting=0)
        assert (decision.desired, decision.reason) == (1, "stable")


def test_grace_does_not_start_a_replica_that_is_not_there() -> None:
    decision = Kpa(DEFAULTS).evaluate(0.0, stable_avg=0.0, panic_avg=0.0, ready=0, starting=0)
    assert (decision.desired, decision.reason) == (0, "idle")


def test_no_grace_goes_to_zero_at_once() -> None:
    kpa = Kpa(ScalingSettings(scale_to_zero_grace_s=0))
    decision = kpa.evaluate(0.0, stable_avg=0.0, panic_avg=0.0, ready=1, starting=0)
    assert (decision.desired, decision.reason) == (0, "idle")


def panic_trace(kpa: Kpa, now: float, stable_avg: float, panic_avg: float, ready: int) -> int:
    decision = kpa.evaluate(
        now, stable_avg=stable_avg, panic_avg=panic_avg, ready=ready, starting=0
    )
    assert decision.panic is kpa.in_panic
    assert decision.reason == ("panic" if decision.panic else "stable")
    return decision.desired


def test_panic_is_left_only_after_a_stable_window_without_the_condition() -> None:
    kpa = Kpa(DEFAULTS)  # stable window 60 s
    assert panic_trace(kpa, 0.0, 140.0, 140.0, 2) == 2
    assert not kpa.in_panic
    # 6 replicas' worth in the panic window against 2 ready: 3x >= 2x.
    assert panic_trace(kpa, 2.0, 150.0, 420.0, 2) == 6
    assert kpa.in_panic
    # The 4 new replicas are starting: the condition no longer holds, panic goes on.
    decision = kpa.evaluate(4.0, stable_avg=160.0, panic_avg=420.0, ready=2, starting=4)
    assert (decision.desired, decision.panic) == (6, True)
    # Load is gone; stable alone would say max(2, 6 // 2) = 3, but panic never scales down.
    for now in range(6, 62, 2):
        assert panic_trace(kpa, now, 140.0, 140.0, 6) == 6, now
        assert kpa.in_panic
    assert panic_trace(kpa, 62.0, 140.0, 140.0, 6) == 3  # 60 s after the last trigger
    assert not kpa.in_panic


def test_a_new_trigger_extends_panic() -> None:
    kpa = Kpa(DEFAULTS)
    assert panic_trace(kpa, 2.0, 150.0, 420.0, 2) == 6
    assert panic_trace(kpa, 30.0, 420.0, 840.0, 6) == 12  # 12 / 6 >= 2 again
    for now in range(32, 90, 2):
        assert panic_trace(kpa, now, 140.0, 140.0, 12) == 12, now
    assert panic_trace(kpa, 90.0, 140.0, 140.0, 12) == 6  # floor(12 / 2)
    assert not kpa.in_panic


def test_panic_keeps_the_highest_count_it_asked_for() -> None:
    kpa = Kpa(DEFAULTS)
    assert panic_trace(kpa, 0.0, 70.0, 700.0, 1) == 10
    # Still over the threshold, asking for less: the peak stands.
    assert panic_trace(kpa, 2.0, 70.0, 560.0, 1) == 10
    assert panic_trace(kpa, 4.0, 0.0, 0.0, 10) == 10
    # Panic still honours min/max on top.
    capped = Kpa(ScalingSettings(max_replicas=4))
    assert panic_trace(capped, 0.0, 70.0, 700.0, 1) == 4


def test_a_new_panic_starts_from_a_fresh_peak() -> None:
    kpa = Kpa(DEFAULTS)
    assert panic_trace(kpa, 0.0, 70.0, 700.0, 1) == 10
    assert panic_trace(kpa, 60.0, 0.0, 0.0, 10) == 5
    assert not kpa.in_panic
    assert panic_trace(kpa, 62.0, 0.0, 280.0, 2) == 4  # not 10


@pytest.mark.parametrize(
    ("stable_avg", "panic_avg", "ready", "starting", "current"),
    [
        (-1.0, 0.0, 0, 0, 0),
        (0.0, -0.5, 0, 0, 0),
        (0.0, 0.0, -1, 0, 0),
        (0.0, 0.0, 0, -1, 0),
        (0.0, 0.0, 0, 0, -1),
    ],
)
def test_negative_inputs_are_refused(
    stable_avg: float, panic_avg: float, ready: int, starting: int, current: int
) -> None:
    with pytest.raises(ValueError, match="negative"):
        Kpa(DEFAULTS).evaluate(
            0.0,
            stable_avg=stable_avg,
            panic_avg=panic_avg,
            ready=ready,
            starting=starting,
            current=current,
        )
