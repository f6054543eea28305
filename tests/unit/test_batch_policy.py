"""The batch-cutting policy in simulated time: no sleeps, the clock is an argument."""

from __future__ import annotations

import pytest

from ember.server.batching.policy import BatchPolicy, Cut, Pending, decide

DELAY = 0.001  # 1 ms


def queue(*rows: int, at: float = 0.0, key: str = "k") -> list[Pending]:
    return [Pending(r, at, key) for r in rows]


def test_empty_queue_waits_for_nothing() -> None:
    assert decide([], 0.0, BatchPolicy(8, DELAY)) == Cut(0)


def test_unbatched_models_take_one_request_at_a_time() -> None:
    assert decide(queue(3, 3, 3), 0.0, BatchPolicy(None)) == Cut(1)


def test_holds_until_the_oldest_request_has_waited_the_delay() -> None:
    policy = BatchPolicy(8, DELAY)
    head = queue(1, 1, at=10.0)
    assert decide(head, 10.0, policy) == Cut(0, 10.0 + DELAY)
    assert decide(head, 10.0 + DELAY / 2, policy) == Cut(0, 10.0 + DELAY)
    assert decide(head, 10.0 + DELAY, policy) == Cut(2)


def test_wait_is_measured_from_the_oldest_not_the_newest() -> None:
    head = [Pending(1, 1.0, "k"), Pending(1, 1.0009, "k")]
    assert decide(head, 1.001, BatchPolicy(8, DELAY)) == Cut(2)


def test_a_full_batch_goes_at_once() -> None:
    policy = BatchPolicy(4, 10.0)
    assert decide(queue(1, 1, 1, 1, 1), 0.0, policy) == Cut(4)
    assert decide(queue(2, 2), 0.0, policy) == Cut(2)


def test_a_batch_that_cannot_grow_goes_at_once() -> None:
    policy = BatchPolicy(4, 10.0)
    # 3 rows, and the next request (2 rows) would overflow: waiting cannot help.
    assert decide(queue(1, 2, 2), 0.0, policy) == Cut(2)


def test_different_shapes_are_not_merged() -> None:
    policy = BatchPolicy(8, 10.0)
    head = [Pending(1, 0.0, "a"), Pending(1, 0.0, "a"), Pending(1, 0.0, "b")]
    assert decide(head, 0.0, policy) == Cut(2)
    assert decide(head[2:], 0.0, policy) == Cut(0, 10.0)


def test_zero_delay_sends_whatever_is_there() -> None:
    assert decide(queue(1, 1, 1), 0.0, BatchPolicy(8, 0.0)) == Cut(3)


def test_reaching_the_largest_preferred_size_goes_at_once() -> None:
    policy = BatchPolicy(8, 10.0, (2, 4))
    assert decide(queue(1, 1, 1, 1), 0.0, policy) == Cut(4)
    assert decide(queue(1, 1, 1), 0.0, policy) == Cut(0, 10.0)


def test_at_the_delay_the_longest_preferred_prefix_goes() -> None:
    policy = BatchPolicy(8, DELAY, (2, 4))
    assert decide(queue(1, 1, 1), DELAY, policy) == Cut(2)
    # No prefix of a preferred size: everything that fits goes.
    assert decide(queue(3), DELAY, policy) == Cut(1)


def test_over_the_largest_preferred_size_cuts_to_it() -> None:
    policy = BatchPolicy(8, 10.0, (4,))
    assert decide(queue(2, 2, 1), 0.0, policy) == Cut(2)


def test_an_oversized_head_never_stalls_the_queue() -> None:
    assert decide(queue(9, 1), 0.0, BatchPolicy(8, 10.0)) == Cut(1)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
def test_never_exceeds_the_limit(rows: int) -> None:
    policy = BatchPolicy(8, 0.0)
    head = queue(*([rows] * 10))
    cut = decide(head, 0.0, policy)
    assert 0 < sum(p.rows for p in head[: cut.count]) <= 8
