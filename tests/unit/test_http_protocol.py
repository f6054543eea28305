"""The socket-level protocol in process: bytes in through `data_received`, bytes out of a
recording transport, with an ASGI app behind it that counts the requests it is given."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import orjson
import pytest
import uvicorn
from uvicorn.server import ServerState

from ember.server.dataplane import DataPlane
from ember.server.rest.app import build_app
from ember.server.rest.front import InferFront
from ember.server.rest.protocol import InferProtocol

IDENTITY = orjson.dumps(
    {"inputs": [{"name": "INPUT_INT32", "datatype": "INT32", "shape": [1, 2], "data": [4, 5]}]}
)


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data: Any) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class Counting:
    """The ASGI app uvicorn would run, counting what reaches it."""

    def __init__(self, front: InferFront) -> None:
        self.front = front
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])
        await self.front(scope, receive, send)


@pytest.fixture
def wired(dataplane: DataPlane) -> Any:
    front = build_app(dataplane, max_body_bytes=4096)
    app = Counting(front)

    def connect() -> tuple[InferProtocol, Transport]:
        config = uvicorn.Config(app, lifespan="off", log_config=None, proxy_headers=False)
        config.load()
        state = ServerState()
        protocol = InferProtocol(config, state, {}, asyncio.get_running_loop(), front=front)
        transport = Transport()
        protocol.connection_made(transport)
        return protocol, transport

    return app, connect


async def _until(transport: Transport, count: int) -> list[bytes]:
    for _ in range(500):
        answers = bytes(transport.written).split(b"HTTP/1.1 ")[1:]
        if len(answers) >= count:
            return answers
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} answers, got {bytes(transport.written)!r}")


def _post(path: str, body: bytes, *headers: bytes) -> bytes:
    head = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: t", b"Content-Length: %d" % len(body)]
    return b"\r\n".join([*head, *headers]) + b"\r\n\r\n" + body


async def test_inference_is_answered_without_the_asgi_app(wired: Any) -> None:
    app, connect = wired
    protocol, transport = connect()
    protocol.data_received(_post("/v2/models/identity/infer", IDENTITY))
    [answer] = await _until(transport, 1)
    assert answer.startswith(b"200 OK\r\n")
    assert b'"data":[4,5]' in answer
    assert app.paths == []
    protocol.data_received(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
    await _until(transport, 2)
    assert app.paths == ["/v2/health/live"]


async def test_a_request_split_across_reads_is_reassembled(wired: Any) -> None:
    _, connect = wired
    protocol, transport = connect()
    data = _post("/v2/models/identity/infer", IDENTITY)
    for i in range(0, len(data), 7):
        protocol.data_received(data[i : i + 7])
    [answer] = await _until(transport, 1)
    assert answer.startswith(b"200 OK\r\n") and b'"data":[4,5]' in answer


async def test_pipelined_inference_waits_for_the_answer_before_it(wired: Any) -> None:
    app, connect = wired
    protocol, transport = connect()
    first = _post("/v2/models/identity/infer", IDENTITY.replace(b"[4,5]", b"[1,1]"))
    second = _post("/v2/models/identity/infer", IDENTITY.replace(b"[4,5]", b"[2,2]"))
    protocol.data_received(first + second)
    answers = await _until(transport, 2)
    assert b'"data":[1,1]' in answers[0] and b'"data":[2,2]' in answers[1]
    # The second arrived while the first was unanswered: uvicorn queued it, in order.
    assert app.paths == ["/v2/models/identity/infer"]


async def test_over_the_limit_closes_after_the_error(wired: Any) -> None:
    app, connect = wired
    protocol, transport = connect()
    protocol.data_received(
        b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n"
    )
    [answer] = await _until(transport, 1)
    assert answer.startswith(b"413 ")
    assert b"connection: close\r\n" in answer and transport.closed
    protocol.data_received(b"x" * 5000)  # the rest, arriving late, is ignored
    assert len(await _until(transport, 1)) == 1
    assert app.paths == []


async def test_a_lost_connection_gets_no_write(wired: Any) -> None:
    _, connect = wired
    protocol, transport = connect()
    protocol.data_received(_post("/v2/models/mlp/infer", b"{}"))
    protocol.connection_lost(None)
    await asyncio.sleep(0.1)
    assert transport.written == b""


async def test_shutdown_lets_the_answer_out_then_closes(wired: Any) -> None:
    _, connect = wired
    protocol, transport = connect()
    protocol.data_received(_post("/v2/models/identity/infer", IDENTITY))
    protocol.shutdown()
    assert not transport.closed
    [answer] = await _until(transport, 1)
    assert answer.startswith(b"200 OK\r\n") and b"connection: close\r\n" in answer
    assert transport.closed


async def test_the_route_cache_stays_bounded_under_a_scan_of_names(wired: Any) -> None:
    app, connect = wired
    protocol, transport = connect()
    for i in range(1500):
        protocol.data_received(_post(f"/v2/models/m{i}/infer", b"{}"))
    answers = await _until(transport, 1500)
    assert all(a.startswith(b"404 ") for a in answers)
    assert len(app.front.routes) <= 1024
    assert app.paths == []  # every one refused from its headers


async def test_answered_requests_leave_no_reference_cycles(wired: Any) -> None:
    # The server raises the collector's threshold on this promise (collector.quiet): what
    # the request path allocates is freed by reference counting alone.
    _, connect = wired
    x = [0.25] * 784
    json_body = orjson.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": x}]}
    )
    header = orjson.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784],
                     "parameters": {"binary_data_size": 784 * 4}}],
         "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}
    )  # fmt: skip
    binary_body = header + bytes(784 * 4)
    binary_head = b"Inference-Header-Content-Length: %d" % len(header)
    # Refusals too: an error's traceback is where a cycle (frame -> exception -> traceback
    # -> frame) would keep a request's body alive until the next collection.
    wrong_shape = json_body.replace(b"[1,784]", b"[2,784]")
    requests = [
        (_post("/v2/models/mlp/infer", binary_body, binary_head), b"200 "),
        (_post("/v2/models/mlp/infer", json_body), b"200 "),
        (_post("/v2/models/mlp/infer", wrong_shape), b"400 "),
        (_post("/v2/models/mlp/infer", b"{not json"), b"400 "),
        (_post("/v2/models/nope/infer", json_body), b"404 "),
        (_post("/v1/models/mlp:predict", orjson.dumps({"instances": [x]})), b"200 "),
    ]

    async def round_trip(connections: int) -> None:
        pairs = [connect() for _ in range(connections)]
        for i, (protocol, _) in enumerate(pairs):
            protocol.data_received(requests[i % len(requests)][0])
        for i, (_, transport) in enumerate(pairs):
            [answer] = await _until(transport, 1)
            assert answer.startswith(requests[i % len(requests)][1]), answer[:200]
        for protocol, _ in pairs:
            protocol.connection_lost(None)

    await round_trip(len(requests))  # first-use caches fill here
    gc.collect()
    gc.disable()
    try:
        await round_trip(36)
        found = gc.collect()
    finally:
        gc.enable()
    assert found == 0
