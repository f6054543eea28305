"""`mlp` against an in-process reference: single requests, 200 concurrent ones, streams."""

from __future__ import annotations

import asyncio
import queue
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
import tritonclient.grpc.aio as grpcaio
import tritonclient.http.aio as httpaio

if TYPE_CHECKING:
    from conftest import Api, Server


pytestmark = pytest.mark.e2e

RTOL, ATOL = 1e-5, 1e-6
WEIGHTS = Path(__file__).resolve().parents[2] / "models" / "mlp" / "model.pt"


@pytest.fixture(scope="module")
def reference() -> Iterator[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, not gone
        module = torch.jit.load(str(WEIGHTS), map_location="cpu")
    module.eval()

    def run(rows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out: np.ndarray = module(torch.from_numpy(rows)).numpy()
        return out

    yield run


def batch(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 784), dtype=np.float32)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_matches_reference(api: Api, reference: Any, rows: int) -> None:
    data = batch(rows, seed=rows)
    got = api.infer("mlp", {"input": data}, ["output"]).as_numpy("output")
    assert got is not None
    assert got.shape == (rows, 10)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference(data), rtol=RTOL, atol=ATOL)


def test_matches_reference_json(http_api: Api, reference: Any) -> None:
    data = batch(3, seed=11)
    result = http_api.infer("mlp", {"input": data}, ["output"], binary=False, binary_out=False)
    np.testing.assert_allclose(result.as_numpy("output"), reference(data), rtol=RTOL, atol=ATOL)


def test_batch_over_max_batch_size(api: Api) -> None:
    with api.raises(400, "INVALID_ARGUMENT", "65", "max_batch_size"):
        api.infer("mlp", {"input": batch(65, seed=0)})


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_200_concurrent_async(server: Server, reference: Any, protocol: str) -> None:
    count = 200
    data = [batch(1, seed=1000 + i) for i in range(count)]
    module: Any = httpaio if protocol == "http" else grpcaio
    client: Any = (
        httpaio.InferenceServerClient(server.http, conn_limit=count)
        if protocol == "http"
        else grpcaio.InferenceServerClient(server.grpc)
    )

    async def one(i: int) -> Any:
        item = module.InferInput("input", [1, 784], "FP32").set_data_from_numpy(data[i])
        return await client.infer("mlp", [item], request_id=str(i))

    try:
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), 30)
    finally:
        await client.close()
    for i, result in enumerate(results):
        response = result.get_response()
        assert (response["id"] if protocol == "http" else response.id) == str(i)
        got = result.as_numpy("output")
        np.testing.assert_allclose(got, reference(data[i]), rtol=RTOL, atol=ATOL)


def _stream(grpc_api: Api, requests: list[tuple[str, str, np.ndarray]]) -> list[tuple[Any, Any]]:
    """Send (request id, input name, rows) over one stream; return every (result, error)."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpc_api.client
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for request_id, name, rows in requests:
            item = grpc_api.module.InferInput(name, list(rows.shape), "FP32")
            item.set_data_from_numpy(rows)
            client.async_stream_infer("mlp", [item], request_id=request_id)
        collected = [answers.get(timeout=30) for _ in requests]
    finally:
        client.stop_stream()
    return collected


def test_stream_100_requests(grpc_api: Api, reference: Any) -> None:
    data = {str(i): batch(i % 4 + 1, seed=2000 + i) for i in range(100)}
    answers = _stream(grpc_api, [(i, "input", rows) for i, rows in data.items()])
    seen = set()
    for result, error in answers:
        assert error is None, error
        request_id = result.get_response().id
        seen.add(request_id)
        got = result.as_numpy("output")
        np.testing.assert_allclose(got, reference(data[request_id]), rtol=RTOL, atol=ATOL)
    assert seen == set(data)


def test_stream_with_bad_requests(grpc_api: Api, reference: Any) -> None:
    """Bad requests get an error in the callback; the others succeed; the stream stays open."""
    requests = []
    for i in range(30):
        rows = batch(2, seed=3000 + i)
        if i % 5 == 0:
            requests.append((str(i), f"wrong_{i}", rows))  # unknown input name
        elif i % 5 == 1:
            requests.append((str(i), "input", rows[:, :100].copy()))  # wrong shape
        else:
            requests.append((str(i), "input", rows))
    answers = _stream(grpc_api, requests)
    errors = [str(error) for result, error in answers if error is not None]
    assert len(errors) == 12, errors
    named = {e.split("'")[1] for e in errors if "unknown input" in e}
    assert named == {f"wrong_{i}" for i in range(0, 30, 5)}
    assert sum("shape" in e and "784" in e for e in errors) == 6
    good = {r.get_response().id: r for r, error in answers if error is None}
    assert set(good) == {str(i) for i in range(30) if i % 5 > 1}
    for request_id, result in good.items():
        want = reference(requests[int(request_id)][2])
        np.testing.assert_allclose(result.as_numpy("output"), want, rtol=RTOL, atol=ATOL)


def test_stream_stays_open_after_an_error(grpc_api: Api) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpc_api.client
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for name in ("nope", "input", "nope", "input"):
            item = grpc_api.module.InferInput(name, [1, 784], "FP32")
            item.set_data_from_numpy(batch(1, seed=5))
            client.async_stream_infer("mlp", [item], request_id=name)
            result, error = answers.get(timeout=10)  # one answer before the next request
            if name == "nope":
                assert result is None and "nope" in str(error)
            else:
                assert error is None, error
                assert result.get_response().id == "input"
    finally:
        client.stop_stream()


async def test_aio_stream_with_a_bad_request(server: Server, reference: Any) -> None:
    data = [batch(1, seed=4000 + i) for i in range(6)]

    async def requests() -> Any:
        for i, rows in enumerate(data):
            name = "nope" if i == 2 else "input"
            item = grpcaio.InferInput(name, [1, 784], "FP32").set_data_from_numpy(rows)
            yield {"model_name": "mlp", "inputs": [item], "request_id": str(i)}

    client = grpcaio.InferenceServerClient(server.grpc)
    try:
        answers = [answer async for answer in client.stream_infer(requests())]
    finally:
        await client.close()
    errors = [error for _, error in answers if error is not None]
    assert len(errors) == 1 and "nope" in str(errors[0])
    good = {r.get_response().id: r for r, error in answers if error is None}
    assert set(good) == {"0", "1", "3", "4", "5"}
    for request_id, result in good.items():
        np.testing.assert_allclose(
            result.as_numpy("output"), reference(data[int(request_id)]), rtol=RTOL, atol=ATOL
        )
