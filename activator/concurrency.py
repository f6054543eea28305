"""Time-weighted concurrency of one model, kept in fixed-width buckets so that the autoscaler can
read its stable and its panic average from the same record. The clock is never read here: every
method takes `now` (monotonic seconds), so tests drive time by hand."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    index: int  # covers [index * bucket_s, (index + 1) * bucket_s)
    area: float  # concurrency x seconds observed inside it


class ConcurrencyWindow:
    """The concurrency level of one model and its time integral in `bucket_s` buckets.

    Only buckets with some area are stored, so idle time costs neither memory nor work, and
    buckets older than `keep_s` are dropped. A `now` earlier than one already seen counts as
    that later time: callers on the event loop read the clock before an await, and a level
    integrated over a negative span would corrupt every average.
    """

    def __init__(self, now: float, *, bucket_s: float = 1.0, keep_s: float = 3600.0) -> None:
        if bucket_s <= 0 or keep_s < bucket_s:
            raise ValueError(f"need 0 < bucket_s <= keep_s, got {bucket_s} and {keep_s}")
        self._bucket_s = bucket_s
        self._keep_s = keep_s
        self._created = now
        self._level = 0
        self._t = now  # the buckets hold everything up to here
        self._last_active: float | None = None
        self._buckets: deque[_Bucket] = deque()

    @property
    def current(self) -> int:
        """The level right now: requests at the activator, queued ones included."""
        return self._level

    def change(self, delta: int, now: float) -> None:
        """The level moves by `delta` at `now`: +1 when a request arrives, -1 when it leaves."""
        now = max(now, self._t)
        level = self._level + delta
        if level < 0:
            # A -1 without its +1 is a bookkeeping bug upstream; clamping would hide it.
            raise ValueError(f"concurrency would go negative ({self._level} {delta:+d})")
        self._advance(now)
        self._level = level
        if level > 0:
            self._last_active = now

    def average(self, window_s: float, now: float) -> float:
        """Time-weighted average level over [now - window_s, now], the current partial bucket
        included. Time before creation does not count; over an empty span, the current level.

        The bucket the window starts in is prorated by the share of it that lies inside the
        window, as if its area were spread evenly; the result is exact when the window starts
        on a bucket boundary (or before creation)."""
        if not 0 <= window_s <= self._keep_s:
            raise ValueError(f"window_s must be within [0, keep_s={self._keep_s}], got {window_s}")
        now = max(now, self._t)
        self._advance(now)
        start = max(now - window_s, self._created)
        span = now - start
        if span <= 0:
            return float(self._level)
        b = self._bucket_s
        first = math.floor(start / b)
        area = 0.0
        for bucket in reversed(self._buckets):
            if bucket.index < first:
                break
            if bucket.index > first:
                area += bucket.area
                continue
            # Only the part of the first bucket after creation (and before now) was observed.
            lo = max(first * b, self._created)
            hi = min((first + 1) * b, now)
            share = (hi - start) / (hi - lo) if hi > lo else 1.0
            area += bucket.area * min(1.0, max(0.0, share))
        return area / span

    def last_active(self, now: float | None = None) -> float | None:
        """The last time the level was seen above 0, or None if it never was.

        While the level is above 0 that is `now` when given; without `now` it is the latest
        time this window was told about (the last `change` or `average`), since nothing later
        is known here. Once the level is 0, it is the time it fell to 0."""
        if now is not None:
            self._advance(now)
        return self._last_active

    def _advance(self, now: float) -> None:
        now = max(now, self._t)
        if self._level > 0:
            self._integrate(self._t, now)
            self._last_active = now
        self._t = now
        # Keep the bucket holding now - keep_s: a window of keep_s still starts inside it.
        oldest = math.floor((now - self._keep_s) / self._bucket_s)
        while self._buckets and self._buckets[0].index < oldest:
            self._buckets.popleft()

    def _integrate(self, start: float, end: float) -> None:
        b = self._bucket_s
        # Anything older than keep_s would be dropped at once: a level held through a long gap
        # costs at most keep_s / bucket_s steps. Cut on a boundary so kept buckets stay whole.
        t = max(start, math.floor((end - self._keep_s) / b) * b)
        while t < end:
            index = math.floor(t / b)
            stop = min((index + 1) * b, end)
            if stop <= t:  # t / b rounded down although t sits on the next boundary
                index += 1
                stop = min((index + 1) * b, end)
            self._add(index, self._level * (stop - t))
            t = stop

    def _add(self, index: int, area: float) -> None:
        if self._buckets and self._buckets[-1].index == index:
            self._buckets[-1].area += area
        else:
            self._buckets.append(_Bucket(index, area))
