"""The batcher with a fake runner: merging and splitting, queue limits, deadlines,
priorities and failures, on a real event loop and a real instance thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import torch

from ember.server.batching.batcher import Batcher, Execution
from ember.server.config import ModelConfig
from ember.server.errors import DeadlineExceeded, InvalidInput, ModelFailed, Overloaded
from ember.server.instances import Instance, InstancePool


class FakeRunner:
    """Doubles its input; can be held busy; remembers every batch it ran."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_when: Callable[[np.ndarray], bool] = lambda x: False
        self.rows_off = 0

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.entered.set()
        self.gate.wait(5)
        self.batches.append(x.copy())
        if self.fail_when(x):
            raise RuntimeError("boom")
        y = x * 2
        return {"y": y[: len(y) - self.rows_off]}


def config(**batching: Any) -> ModelConfig:
    doc: dict[str, Any] = {
        "name": "fake",
        "format": "python",
        "class": "x:Y",
        "max_batch_size": 8,
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, -1], "pad_value": -1.0}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1], "unpad": True}],
    }
    if batching is not None:
        doc["batching"] = batching
    return ModelConfig.model_validate(doc)


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@pytest.fixture
async def make(runner: FakeRunner) -> AsyncIterator[Callable[..., Batcher]]:
    made: list[tuple[Batcher, InstancePool]] = []

    def build(executions: list[Execution] | None = None, **batching: Any) -> Batcher:
        pool = InstancePool([Instance(runner, torch.device("cpu"), 0, "fake")])
        sink = executions.append if executions is not None else (lambda _: None)
        batcher = Batcher(config(**batching), pool, sink)
        batcher.start()
        made.append((batcher, pool))
        return batcher

    yield build
    runner.gate.set()
    for batcher, pool in made:
        await batcher.close()
        pool.close()


def rows(n: int, width: int = 3, start: float = 0.0) -> dict[str, np.ndarray]:
    values = np.arange(n * width, dtype=np.float32).reshape(n, width) + start
    return {"x": values}


async def hold(runner: FakeRunner, batcher: Batcher) -> asyncio.Task[Any]:
    """Occupy the only instance, so later requests queue up behind it."""
    runner.gate.clear()
    runner.entered.clear()
    task = asyncio.create_task(batcher.submit(rows(1, start=1000)))
    await asyncio.to_thread(runner.entered.wait, 5)
    return task


async def test_requests_merge_and_each_gets_its_own_rows(
    make: Callable[..., Batcher], runner: FakeRunner
) -> None:
    executions: list[Execution] = []
    batcher = make(executions, max_batch_size=8)
    first = await hold(runner, batcher)
    requests = [rows(n, start=100 * i) for i, n in enumerate([1, 3, 2])]
    tasks = [asyncio.create_task(batcher.submit(r)) for r in requests]
    await asyncio.sleep(0.01)
    runner.gate.set()
    await first
    results = await asyncio.gather(*tasks)
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result.outputs["y"], request["x"] * 2)
        assert result.batch_rows == 6
    assert [b.shape[0] for b in runner.batches] == [1, 6]
    assert [e.rows for e in executions] == [1, 6]


async def test_padding_merges_lengths_and_unpads_outputs(
    make: Callable[..., Batcher], runner: FakeRunner
) -> None:
    batcher = make(max_batch_size=8)
    first = await hold(runner, batcher)
    short, long = rows(1, width=2), rows(2, width=5, start=10)
    tasks = [asyncio.create_task(batcher.submit(r)) for r in (short, long)]
    await asyncio.sleep(0.01)
    runner.gate.set()
    await first
    a, b = await asyncio.gather(*tasks)
    merged = runner.batches[-1]
    assert merged.shape == (3, 5)
    assert merged[0].tolist() == [0.0, 1.0, -1.0, -1.0, -1.0]
    np.testing.assert_array_equal(a.outputs["y"], short["x"] * 2)
    np.testing.assert_array_equal(b.outputs["y"], long["x"] * 2)


async def test_batches_never_exceed_the_limit(
    make: Callable[..., Batcher], runner: FakeRunner
) -> None:
    batcher = make(max_batch_size=4)
    first = await hold(runner, batcher)
    tasks = [asyncio.create_task(batcher.submit(rows(1, start=i))) for i in range(10)]
    await asyncio.sleep(0.01)
    runner.gate.set()
    await first
    await asyncio.gather(*tasks)
    assert [b.shape[0] for b in runner.batches[1:]] == [4, 4, 2]


async def test_full_queue_rejects_at_once(make: Callable[..., Batcher], runner: FakeRunner) -> None:
    batcher = make(max_batch_size=1, max_queue_size=2)
    first = await hold(runner, batcher)
    queued = [asyncio.create_task(batcher.submit(rows(1))) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded, match="max_queue_size 2"):
        await asyncio.wait_for(batcher.submit(rows(1)), 0.5)
    runner.gate.set()
    await first
    assert len(await asyncio.gather(*queued)) == 2


async def test_expired_requests_are_answered_and_never_run(
    make: Callable[..., Batcher], runner: FakeRunner
) -> None:
    batcher = make(max_batch_size=8, default_timeout_us=20_000)
    first = await hold(runner, batcher)
    doomed = asyncio.create_task(batcher.submit(rows(1, start=500)))
    await asyncio.sleep(0.05)
    with pytest.raises(DeadlineExceeded):
        await doomed  # answered while the instance is still busy
    runner.gate.set()
    await first  # it started before its deadline, so it finishes
    assert all(500.0 not in b for b in runner.batches)


async def test_a_request_may_only_shorten_the_default_timeout(
    make: Callable[..., Batcher], runner: FakeRunner
) -> None:
    loop = asyncio.get_running_loop()
    batcher = make(max_batch_size=8, default_timeout_us=10_000_000)
    first = await hold(runner, batcher)
    doomed = asyncio.create_task(batcher.submit(rows(1, start=700), loop.time() + 0.02))
    await asyncio.sleep(0.05)
    assert doomed.done()
    runner.gate.set()
    await first
    with pytest.raises(DeadlineExceeded):
        await doomed
    assert all(700.0 not in b for b in runner.batches)


async def test_higher_priority_goes_first(make: Callable[..., Batcher], runner: FakeRunner) -> None:
    batcher = make(max_batch_size=1, priority_levels=2, default_priority_level=2)
    first = await hold(runner, batcher)
    low = asyncio.create_task(batcher.submit(rows(1, start=10)))
    await asyncio.sleep(0.005)
    high = asyncio.create_task(batcher.submit(rows(1, start=20), None, {"priority": 1}))
    await asyncio.sleep(0.005)
    runner.gate.set()
    await asyncio.gather(first, low, high)
    assert [b[0, 0] for b in runner.batches] == [1000.0, 20.0, 10.0]
    with pytest.raises(InvalidInput, match="above the model's 2 levels"):
        await batcher.submit(rows(1), None, {"priority": 3})


async def test_a_failing_batch_fails_only_itself(
    make: Callable[..., Batcher], runner: FakeRunner, caplog: pytest.LogCaptureFixture
) -> None:
    batcher = make(max_batch_size=8)
    runner.fail_when = lambda x: bool((x == 666).any())
    first = await hold(runner, batcher)
    bad = [asyncio.create_task(batcher.submit({"x": np.full((1, 3), 666.0, np.float32)}))]
    bad.append(asyncio.create_task(batcher.submit(rows(1))))
    await asyncio.sleep(0.01)
    runner.gate.set()
    await first
    results = await asyncio.gather(*bad, return_exceptions=True)
    assert all(isinstance(r, ModelFailed) and "RuntimeError: boom" in str(r) for r in results)
    assert len([r for r in caplog.records if r.message == "batch failed"]) == 1
    ok = await batcher.submit(rows(2))
    np.testing.assert_array_equal(ok.outputs["y"], rows(2)["x"] * 2)


async def test_wrong_row_count_from_the_model_is_a_model_failure(
    make: Callable[..., Batcher], runner: FakeRunner
) -> None:
    batcher = make(max_batch_size=8)
    runner.rows_off = 1
    with pytest.raises(ModelFailed, match="for a batch of 2 rows"):
        await batcher.submit(rows(2))


async def test_delay_holds_a_lone_request(make: Callable[..., Batcher]) -> None:
    batcher = make(max_batch_size=8, max_queue_delay_us=30_000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await batcher.submit(rows(1))
    assert loop.time() - started >= 0.025
    assert result.queued >= 0.025


async def test_callers_answered_by_a_batch_join_the_next_one(
    make: Callable[..., Batcher], runner: FakeRunner
) -> None:
    """Closed-loop callers that send again as soon as they are answered: every batch after
    the first holds all of them, not two cohorts taking turns with the instance."""
    batcher = make(max_batch_size=8)
    first = await hold(runner, batcher)

    async def caller(index: int) -> None:
        for turn in range(6):
            result = await batcher.submit(rows(1, start=100 * index + turn))
            np.testing.assert_array_equal(
                result.outputs["y"], rows(1, start=100 * index + turn)["x"] * 2
            )
            # Replies go out one after another, so the next requests arrive over a few
            # iterations of the loop.
            for _ in range(1 + index % 3):
                await asyncio.sleep(0)

    callers = [asyncio.create_task(caller(i)) for i in range(8)]
    await asyncio.sleep(0.01)
    runner.gate.set()
    await first
    await asyncio.gather(*callers)
    sizes = [b.shape[0] for b in runner.batches]
    assert sizes == [1] + [8] * 6, sizes
