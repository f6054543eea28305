"""The concurrency window in simulated time: every call is given its `now`, nothing sleeps.
Times and levels are chosen so that every expected average is exact in binary floating point."""

from __future__ import annotations

import pytest

from ember.activator.concurrency import ConcurrencyWindow


def replay(
    events: list[tuple[float, int]], *, created: float = 0.0, **kw: float
) -> ConcurrencyWindow:
    window = ConcurrencyWindow(created, **kw)
    for at, delta in events:
        window.change(delta, at)
    return window


# Level 2 over [0.5, 3.25]: bucket 0 gets 1.0, buckets 1 and 2 get 2.0 each, bucket 3 gets 0.5.
@pytest.mark.parametrize(
    ("window_s", "expected"),
    [(1.0, 0.5), (2.0, 1.25), (3.0, 1.5), (4.0, 1.375)],
)
def test_a_level_spanning_buckets_is_split_exactly(window_s: float, expected: float) -> None:
    window = replay([(0.5, +2), (3.25, -2)])
    assert window.average(window_s, 4.0) == expected


def test_levels_are_weighted_by_time() -> None:
    window = replay([(0.0, +1), (0.5, +1), (1.5, -1), (2.0, +2), (3.0, -3)])
    # 1 x 0.5 + 2 x 1 + 1 x 0.5 + 3 x 1 = 6 over 4 s
    assert window.average(4.0, 4.0) == 1.5
    assert window.current == 0


def test_the_current_partial_bucket_counts_up_to_now() -> None:
    window = replay([(0.0, +1), (2.25, -1)])
    assert window.average(2.5, 2.5) == 0.9
    assert window.average(0.5, 2.5) == 0.5  # [2.0, 2.5] of which 0.25 s at 1


def test_a_level_still_held_counts_up_to_now() -> None:
    window = replay([(0.0, +3)])
    assert window.average(10.0, 2.5) == 3.0
    assert window.average(1.0, 7.0) == 3.0


def test_a_window_starting_inside_a_bucket_takes_its_share_of_it() -> None:
    # Only the bucket's total is kept: [0.5, 1.0] gets half of bucket 0's area although the
    # level was 0 there. This is the resolution the buckets give, pinned here on purpose.
    window = replay([(0.0, +1), (0.5, -1)])
    assert window.average(0.5, 1.0) == 0.5


def test_narrower_buckets() -> None:
    window = replay([(0.25, +1), (1.0, -1)], bucket_s=0.5)
    assert window.average(0.5, 1.0) == 1.0
    assert window.average(1.0, 1.0) == 0.75


@pytest.mark.parametrize(
    ("created", "events", "now", "expected"),
    [
        (100.0, [(100.0, +1)], 110.0, 1.0),  # 10 s observed, not 60
        (100.5, [(100.5, +1)], 110.0, 1.0),  # created inside a bucket
        (0.0, [(5.0, +3)], 10.0, 1.5),  # 15 over the 10 s since creation
    ],
)
def test_before_a_full_window_only_the_time_observed_counts(
    created: float, events: list[tuple[float, int]], now: float, expected: float
) -> None:
    window = replay(events, created=created)
    assert window.average(60.0, now) == expected


def test_an_empty_span_gives_the_current_level() -> None:
    window = replay([(10.0, +4)], created=10.0)
    assert window.average(60.0, 10.0) == 4.0
    assert window.average(0.0, 20.0) == 4.0


def test_a_long_idle_gap_stores_nothing() -> None:
    window = replay([(0.0, +1), (1.0, -1)])
    assert window.average(60.0, 1e9) == 0.0
    assert len(window._buckets) == 0
    window.change(+1, 1e9)
    assert window.average(2.0, 1e9 + 2) == 1.0
    assert window.average(60.0, 1e9 + 2) == 2.0 / 60.0
    assert len(window._buckets) == 2


def test_a_level_held_through_a_long_gap_costs_only_keep_s() -> None:
    window = replay([(0.0, +1)])
    # 1e9 one-second buckets would never finish; only the last hour is integrated.
    assert window.average(3600.0, 1e9) == 1.0
    assert len(window._buckets) <= 3602


def test_buckets_older_than_keep_s_are_dropped() -> None:
    window = replay([(0.0, +1), (5.0, -1)], keep_s=10.0)
    assert window.average(10.0, 10.0) == 0.5
    assert window.average(10.0, 16.0) == 0.0
    assert len(window._buckets) == 0


def test_memory_stays_bounded_under_steady_traffic() -> None:
    window = ConcurrencyWindow(0.0, keep_s=100.0)
    for second in range(10_000):
        window.change(+1, second + 0.25)
        window.change(-1, second + 0.75)
        assert len(window._buckets) <= 102
    assert window.average(100.0, 10_000.0) == 0.5


def test_a_window_longer_than_keep_s_is_refused() -> None:
    window = ConcurrencyWindow(0.0, keep_s=10.0)
    with pytest.raises(ValueError, match="window_s"):
        window.average(10.5, 20.0)
    with pytest.raises(ValueError, match="window_s"):
        window.average(-1.0, 20.0)


def test_the_level_never_goes_negative() -> None:
    window = replay([(1.0, +1)])
    with pytest.raises(ValueError, match="negative"):
        window.change(-2, 2.0)
    assert window.current == 1  # the refused change left no trace
    window.change(-1, 2.0)
    with pytest.raises(ValueError, match="negative"):
        window.change(-1, 3.0)
    assert window.current == 0
    assert window.average(3.0, 3.0) == 1.0 / 3.0


def test_a_stale_now_counts_as_the_latest_time_seen() -> None:
    # A caller read the clock before an await while another request moved the window on.
    window = replay([(5.0, +1)])
    window.change(+1, 6.0)
    window.change(-1, 5.5)  # taken as 6.0: one second at level 1 so far, nothing negative
    assert window.average(6.0, 6.0) == pytest.approx(1.0 / 6.0)
    window.change(-1, 7.0)
    assert window.average(7.0, 7.0) == pytest.approx(2.0 / 7.0)
    assert window.average(1.0, 4.0) == pytest.approx(1.0)  # over [6, 7]


@pytest.mark.parametrize(("bucket_s", "keep_s"), [(0.0, 10.0), (-1.0, 10.0), (2.0, 1.0)])
def test_bad_sizes_are_refused(bucket_s: float, keep_s: float) -> None:
    with pytest.raises(ValueError):
        ConcurrencyWindow(0.0, bucket_s=bucket_s, keep_s=keep_s)


def test_last_active() -> None:
    window = ConcurrencyWindow(0.0)
    assert window.last_active() is None
    assert window.last_active(3.0) is None
    window.change(+1, 4.0)
    assert window.last_active() == 4.0
    assert window.last_active(5.0) == 5.0  # still busy: active now
    assert window.last_active() == 5.0  # the latest time it was told about
    window.change(+1, 6.0)
    window.change(-2, 7.0)
    assert window.last_active() == 7.0  # the moment it fell to 0
    assert window.last_active(100.0) == 7.0
