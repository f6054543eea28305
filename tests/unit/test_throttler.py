"""The throttler alone: replica slots, the FIFO wait queue, deadlines and cancellation."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from ember.activator.errors import ActivationTimeout, QueueFull, ShuttingDown
from ember.activator.throttler import Replica, Throttler


def _deadline(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def _settle(rounds: int = 5) -> None:
    """Let every task that is ready run (a few turns of the loop)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def _waiting(
    throttler: Throttler, count: int, exclude: str | None = None
) -> list[asyncio.Task[Replica]]:
    return [asyncio.create_task(throttler.acquire(_deadline(), exclude)) for _ in range(count)]


async def test_fast_path_takes_a_free_slot_without_queueing() -> None:
    throttler = Throttler("m", capacity=2, queue_depth=10)
    a, b = Replica("10.0.0.1:8080"), Replica("10.0.0.2:8080")
    throttler.add(a)
    throttler.add(b)
    first = await throttler.acquire(_deadline())
    second = await throttler.acquire(_deadline())
    # Least loaded first: one on each.
    assert {first.address, second.address} == {a.address, b.address}
    assert (a.in_flight, b.in_flight, throttler.in_flight, throttler.queued) == (1, 1, 2, 0)
    assert throttler.free_slots() == 2
    throttler.release(first)
    throttler.release(second)
    assert (a.in_flight, b.in_flight, throttler.free_slots()) == (0, 0, 4)


async def test_never_more_than_capacity_in_flight_per_replica() -> None:
    throttler = Throttler("m", capacity=4, queue_depth=1000)
    replicas = [Replica("10.0.0.1:8080"), Replica("10.0.0.2:8080")]
    for replica in replicas:
        throttler.add(replica)
    peak: Counter[str] = Counter()
    served: Counter[str] = Counter()

    async def one(i: int) -> None:
        replica = await throttler.acquire(_deadline())
        assert replica.in_flight <= 4
        peak[replica.address] = max(peak[replica.address], replica.in_flight)
        served[replica.address] += 1
        for _ in range(i % 3 + 1):
            await asyncio.sleep(0)
        throttler.release(replica)

    await asyncio.gather(*(one(i) for i in range(100)))
    assert dict(peak) == {"10.0.0.1:8080": 4, "10.0.0.2:8080": 4}
    assert sum(served.values()) == 100
    assert (throttler.in_flight, throttler.queued) == (0, 0)


async def test_waiters_are_served_in_arrival_order() -> None:
    throttler = Throttler("m", capacity=1, queue_depth=10)
    replica = Replica("10.0.0.1:8080")
    throttler.add(replica)
    held = await throttler.acquire(_deadline())
    order: list[int] = []

    async def one(i: int) -> None:
        got = await throttler.acquire(_deadline())
        order.append(i)
        await asyncio.sleep(0)
        throttler.release(got)

    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0)  # each is queued before the next arrives
    assert throttler.queued == 6
    throttler.release(held)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4, 5]


async def test_a_new_replica_takes_only_as_many_waiters_as_it_has_slots() -> None:
    throttler = Throttler("m", capacity=4, queue_depth=100)
    tasks = _waiting(throttler, 50)
    await _settle()
    assert (throttler.queued, throttler.ready) == (50, 0)
    replica = Replica("10.0.0.1:8080")
    throttler.add(replica)
    await _settle()
    done = [t for t in tasks if t.done()]
    assert len(done) == 4
    assert done == tasks[:4]  # the oldest four
    assert (replica.in_flight, throttler.queued) == (4, 46)
    # One slot freed: exactly one more goes.
    throttler.release(done[0].result())
    await _settle()
    assert sum(t.done() for t in tasks) == 5
    assert (replica.in_flight, throttler.queued) == (4, 45)
    throttler.fail_waiters(ShuttingDown("stop"))
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_unlimited_capacity_releases_every_waiter_on_the_first_replica() -> None:
    throttler = Throttler("m", capacity=0, queue_depth=100)
    assert throttler.free_slots() == 0
    tasks = _waiting(throttler, 30)
    await _settle()
    assert throttler.queued == 30
    replica = Replica("10.0.0.1:8080")
    throttler.add(replica)
    assert throttler.free_slots() is None
    got = await asyncio.gather(*tasks)
    assert all(r is replica for r in got)
    assert (replica.in_flight, throttler.queued) == (30, 0)


async def test_unlimited_capacity_uses_two_choices_and_spreads_the_load() -> None:
    throttler = Throttler("m", capacity=0, queue_depth=100)
    a, b = Replica("10.0.0.1:8080"), Replica("10.0.0.2:8080")
    throttler.add(a)
    throttler.add(b)
    held = [await throttler.acquire(_deadline()) for _ in range(100)]
    # With two replicas both are always the two choices: the less loaded one wins.
    assert (a.in_flight, b.in_flight) == (50, 50)
    for replica in held:
        throttler.release(replica)
    assert throttler.in_flight == 0


async def test_a_full_queue_is_refused_with_the_model_and_depth() -> None:
    throttler = Throttler("resnet", capacity=1, queue_depth=2)
    tasks = _waiting(throttler, 2)
    await _settle()
    with pytest.raises(QueueFull) as caught:
        await throttler.acquire(_deadline())
    assert caught.value.message == "model 'resnet': 2 requests already queued (queue_depth 2)"
    assert throttler.queued == 2
    throttler.fail_waiters(ShuttingDown("stop"))
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_deadline_ends_the_wait_and_leaves_the_queue() -> None:
    throttler = Throttler("m", capacity=1, queue_depth=10)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(ActivationTimeout) as caught:
        await throttler.acquire(started + 0.05)
    assert 0.04 <= loop.time() - started < 1.0
    assert caught.value.message.startswith("model 'm': no replica had a free slot within 0.")
    assert throttler.queued == 0
    # The waiter that left gets nothing when a replica comes.
    replica = Replica("10.0.0.1:8080")
    throttler.add(replica)
    assert replica.in_flight == 0
    assert (await throttler.acquire(_deadline())) is replica


async def test_a_slot_handed_over_as_the_waiter_is_cancelled_goes_back() -> None:
    throttler = Throttler("m", capacity=1, queue_depth=10)
    task = asyncio.create_task(throttler.acquire(_deadline()))
    await _settle()
    replica = Replica("10.0.0.1:8080")
    throttler.add(replica)  # the slot is handed to the waiter here...
    assert replica.in_flight == 1
    task.cancel()  # ...and the client goes away before the waiter ever ran
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (replica.in_flight, throttler.queued) == (0, 0)


async def test_a_slot_handed_over_as_the_deadline_fires_goes_back() -> None:
    throttler = Throttler("m", capacity=1, queue_depth=10)
    loop = asyncio.get_running_loop()
    # A deadline already past: the timeout is scheduled for the next turn of the loop, after
    # this test hands the waiter a slot below.
    task = asyncio.create_task(throttler.acquire(loop.time() - 1.0))
    await asyncio.sleep(0)
    assert throttler.queued == 1
    replica = Replica("10.0.0.1:8080")
    throttler.add(replica)
    assert replica.in_flight == 1
    with pytest.raises(ActivationTimeout):
        await task
    assert (replica.in_flight, throttler.queued) == (0, 0)
    # And the slot is usable again.
    assert (await throttler.acquire(_deadline())) is replica


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    throttler = Throttler("m", capacity=1, queue_depth=10)
    tasks = _waiting(throttler, 3)
    await _settle()
    tasks[1].cancel()
    with pytest.raises(asyncio.CancelledError):
        await tasks[1]
    assert throttler.queued == 2
    replica = Replica("10.0.0.1:8080")
    throttler.add(replica)
    assert await tasks[0] is replica
    throttler.release(replica)
    # The cancelled one is skipped: the third gets the slot.
    assert await tasks[2] is replica
    assert (replica.in_flight, throttler.queued) == (1, 0)


async def test_waiters_that_left_do_not_pile_up() -> None:
    throttler = Throttler("m", capacity=1, queue_depth=10)
    for _ in range(20):
        tasks = _waiting(throttler, 10)
        await _settle()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert throttler.queued == 0
    # 200 requests came and went with no replica: their entries do not stay behind.
    assert len(throttler._waiters) <= 64


async def test_exclude_avoids_a_replica_while_another_exists() -> None:
    throttler = Throttler("m", capacity=0, queue_depth=10)
    a, b = Replica("10.0.0.1:8080"), Replica("10.0.0.2:8080")
    throttler.add(a)
    throttler.add(b)
    got = [await throttler.acquire(_deadline(), exclude=a.address) for _ in range(10)]
    assert all(r is b for r in got)
    assert (a.in_flight, b.in_flight) == (0, 10)


async def test_exclude_falls_back_to_the_only_replica() -> None:
    throttler = Throttler("m", capacity=2, queue_depth=10)
    a = Replica("10.0.0.1:8080")
    throttler.add(a)
    assert await throttler.acquire(_deadline(), exclude=a.address) is a


async def test_a_queued_retry_waits_for_a_slot_on_another_replica() -> None:
    throttler = Throttler("m", capacity=1, queue_depth=10)
    a, b = Replica("10.0.0.1:8080"), Replica("10.0.0.2:8080")
    throttler.add(a)
    throttler.add(b)
    on_a = await throttler.acquire(_deadline())
    on_b = await throttler.acquire(_deadline())
    assert {on_a.address, on_b.address} == {a.address, b.address}
    retry = asyncio.create_task(throttler.acquire(_deadline(), exclude=on_a.address))
    await _settle()
    throttler.release(on_a)
    await _settle()
    assert not retry.done()
    throttler.release(on_b)
    assert await retry is on_b


async def test_take_out_stops_new_requests_and_wait_idle_waits_for_the_rest() -> None:
    throttler = Throttler("m", capacity=4, queue_depth=10)
    a, b = Replica("10.0.0.1:8080"), Replica("10.0.0.2:8080")
    throttler.add(a)
    first = await throttler.acquire(_deadline())
    second = await throttler.acquire(_deadline())
    assert first is a and second is a
    assert throttler.take_out(a.address) is a
    assert throttler.take_out(a.address) is None
    assert a.draining and throttler.ready == 0
    idle = asyncio.create_task(a.wait_idle())
    waiting = asyncio.create_task(throttler.acquire(_deadline()))
    await _settle()
    throttler.release(first)  # a freed slot on a draining replica goes to nobody
    await _settle()
    assert not waiting.done() and not idle.done()
    assert a.in_flight == 1
    throttler.add(b)
    assert await waiting is b
    throttler.release(second)
    await asyncio.wait_for(idle, 1.0)
    assert a.in_flight == 0
    await asyncio.wait_for(a.wait_idle(), 0.1)  # idle already: returns at once


async def test_fail_waiters_answers_every_waiter_with_the_error() -> None:
    throttler = Throttler("m", capacity=1, queue_depth=10)
    tasks = _waiting(throttler, 5)
    await _settle()
    error = ShuttingDown("the activator is shutting down")
    throttler.fail_waiters(error)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(r is error for r in results)
    assert throttler.queued == 0
    # A replica added afterwards has nothing handed to it.
    replica = Replica("10.0.0.1:8080")
    throttler.add(replica)
    assert replica.in_flight == 0
