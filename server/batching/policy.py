"""When to cut a batch: a pure function of the queue's head and the time, Triton's rules.

- A batch holds requests from the head of the queue (priority order, then arrival) that share
  a shape signature, up to `max_batch_size` rows. It goes at once when it cannot grow: it is
  full, or the next request does not fit.
- With preferred sizes, a batch that has reached the largest preferred size goes at once, cut
  to the longest prefix whose size is preferred.
- Otherwise it waits, but only until the oldest request has waited `max_queue_delay`; then the
  longest preferred prefix (or, with none, everything that fits) goes.
- `max_batch_size = None` means the model does not batch: one request per execution.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch_size: int | None
    max_queue_delay: float = 0.0  # seconds
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Pending:
    rows: int
    enqueued: float
    # Requests merge only when their keys are equal (same inputs, same non-batch shapes).
    key: Hashable


@dataclass(frozen=True, slots=True)
class Cut:
    count: int  # requests to take from the head now; 0 = wait
    wait_until: float | None = None  # when to look again if nothing new arrives


def decide(head: Sequence[Pending], now: float, policy: BatchPolicy) -> Cut:
    """`head` is the front of the queue in dispatch order (it need not be the whole queue:
    `max_batch_size + 1` entries are enough)."""
    if not head:
        return Cut(0)
    if policy.max_batch_size is None:
        return Cut(1)
    limit = policy.max_batch_size
    key = head[0].key
    rows = 0
    count = 0
    sizes = []  # cumulative rows after each taken request
    closed = False
    for pending in head:
        if pending.key != key or rows + pending.rows > limit:
            closed = True
            break
        rows += pending.rows
        count += 1
        sizes.append(rows)
    if count == 0:
        # A single request larger than the limit is refused before it is queued; never stall.
        return Cut(1)
    preferred = policy.preferred_batch_sizes
    best = max((i + 1 for i, s in enumerate(sizes) if s in preferred), default=0)
    if closed or rows == limit:
        return Cut(count)
    if preferred and rows >= max(preferred) and best:
        return Cut(best)
    deadline = head[0].enqueued + policy.max_queue_delay
    if now >= deadline:
        return Cut(best or count)
    return Cut(0, deadline)
