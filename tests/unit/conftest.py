from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ember.server.config import discover
from ember.server.dataplane import DataPlane
from ember.server.metrics import PredictorMetrics
from ember.server.repository import ModelRepository
from ember.server.rest.app import build_app

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
async def dataplane() -> AsyncIterator[DataPlane]:
    models = discover(ROOT / "models", ["identity", "mlp"]) + discover(FIXTURES)
    metrics = PredictorMetrics()
    repository = ModelRepository(models, metrics)
    for name in repository.names():
        await repository.load(name)
    yield DataPlane(repository, metrics)
    await repository.close()


@pytest.fixture
async def client(dataplane: DataPlane) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(dataplane, max_body_bytes=64 * 1024)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ember") as client:
        yield client
