"""The collector's settings in a serving process, and what an unload gives back under them."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.server import collector
from ember.server.config import discover
from ember.server.metrics import PredictorMetrics
from ember.server.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_quiet_freezes_the_heap_and_raises_the_young_threshold(restored: None) -> None:
    collector.quiet()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[0] == collector.YOUNG_THRESHOLD


def test_collect_all_frees_a_cycle_frozen_with_the_heap(restored: None) -> None:
    class Node:
        pass

    node = Node()
    node.me = node  # type: ignore[attr-defined]
    gone = weakref.ref(node)
    collector.quiet()
    del node
    gc.collect()
    assert gone() is not None  # frozen: a plain collection does not see it
    collector.collect_all()
    assert gone() is None
    assert gc.get_freeze_count() > 0  # frozen again


async def test_an_unloaded_model_leaves_nothing_holding_its_runner(restored: None) -> None:
    repository = ModelRepository(discover(ROOT / "models", ["mlp"]), PredictorMetrics())
    await repository.load("mlp")
    collector.quiet()  # as `ember serve` does at ready
    handle = repository.get("mlp")
    assert handle.pool is not None
    runner = weakref.ref(handle.pool.instances[0].runner)
    await repository.unload("mlp")
    assert runner() is None
    await repository.close()
