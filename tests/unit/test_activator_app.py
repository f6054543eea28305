"""The activator's ASGI app in process, in front of real replicas: small aiohttp servers on
free ports of 127.0.0.1 in the test's own event loop."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from ember.activator.app import ActivatorApp
from ember.activator.metrics import ActivatorMetrics
from ember.activator.proxy import REPLAYABLE_BYTES, HttpPool
from ember.activator.scaling import ScalingSettings
from ember.activator.service import Service
from ember.activator.throttler import Replica

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """One replica: records every request and answers with `handler` (an echo by default)."""

    runner: web.AppRunner | None = None
    address: str = ""
    seen: list[Seen] = field(default_factory=list)
    handler: Handler | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            Seen(
                request.method,
                request.raw_path,
                {k.lower(): v for k, v in request.headers.items()},
                body,
            )
        )
        if self.handler is not None:
            return await self.handler(request)
        return web.Response(
            body=body,
            status=200,
            headers={"content-type": request.content_type, "x-replica": self.address},
        )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class World:
    """Replicas, services and the app under test, torn down together."""

    def __init__(self) -> None:
        self.upstreams: list[Upstream] = []
        self.servers: list[asyncio.Server] = []
        self.pool = HttpPool()
        self.services: dict[str, Service] = {}
        self.app: ActivatorApp | None = None
        self.metrics: ActivatorMetrics | None = None
        self.client: httpx.AsyncClient | None = None

    async def replica(self, handler: Handler | None = None) -> Upstream:
        upstream = Upstream(handler=handler)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", upstream._handle)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        site = web.SockSite(runner, sock)
        await site.start()
        upstream.runner = runner
        upstream.address = f"127.0.0.1:{sock.getsockname()[1]}"
        self.upstreams.append(upstream)
        return upstream

    async def raw_replica(
        self, serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    ) -> str:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.servers.append(server)
        return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

    def service(self, name: str, *addresses: str, **settings: Any) -> Service:
        service = Service(name, ScalingSettings(**settings), time.monotonic())
        for address in addresses:
            service.throttler.add(Replica(address))
        self.services[name] = service
        return service

    def start(self) -> httpx.AsyncClient:
        self.metrics = ActivatorMetrics(self.services, lambda model: 0)
        self.app = ActivatorApp(
            self.services,
            self.pool,
            self.metrics,
            status=lambda: {"models": sorted(self.services)},
            clock=time.monotonic,
        )
        # httpx types an ASGI app with MutableMapping messages; the app takes dicts.
        transport = httpx.ASGITransport(app=self.app)  # type: ignore[arg-type]
        self.client = httpx.AsyncClient(
            transport=transport, base_url="http://activator", timeout=10
        )
        return self.client

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        await self.pool.close()
        for upstream in self.upstreams:
            assert upstream.runner is not None
            await upstream.runner.cleanup()
        for server in self.servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def world() -> AsyncIterator[World]:
    world = World()
    yield world
    await world.close()


def _error(response: httpx.Response) -> str:
    doc = response.json()
    assert list(doc) == ["error"], doc
    message: str = doc["error"]
    return message


# -- passing requests and answers through ---------------------------------------------------


async def test_json_body_and_status_pass_through_byte_for_byte(world: World) -> None:
    answer = b'{"model_name":"m",  "outputs": [ {"data":[1.5e-7, 2]} ]}\n'

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=answer, status=207, headers={"content-type": "application/json", "x-answer": "yes"}
        )

    replica = await world.replica(handler)
    world.service("m", replica.address)
    client = world.start()
    sent = b'{"inputs": [{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}  '
    response = await client.post(
        "/v2/models/m/infer", content=sent, headers={"content-type": "application/json"}
    )
    assert response.status_code == 207
    assert response.content == answer
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(answer))
    assert response.headers["x-answer"] == "yes"
    assert "x-ember-cold-start-ms" not in response.headers
    [seen] = replica.seen
    assert (seen.method, seen.path_qs, seen.body) == ("POST", "/v2/models/m/infer", sent)
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["content-length"] == str(len(sent))
    assert seen.headers["host"] == "activator"  # the client's Host passes through


async def test_binary_body_with_inference_header_passes_through(world: World) -> None:
    header = orjson.dumps({"inputs": [{"name": "x", "shape": [256], "datatype": "UINT8",
                                       "parameters": {"binary_data_size": 256}}]})  # fmt: skip
    sent = header + bytes(range(256))

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.Response(
            body=body[::-1],
            headers={
                "content-type": "application/octet-stream",
                "inference-header-content-length": request.headers[
                    "inference-header-content-length"
                ],
            },
        )

    replica = await world.replica(handler)
    world.service("m", replica.address)
    client = world.start()
    response = await client.post(
        "/v2/models/m/versions/1/infer",
        content=sent,
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(len(header)),
        },
    )
    assert response.status_code == 200
    assert response.content == sent[::-1]
    assert response.headers["inference-header-content-length"] == str(len(header))
    assert response.headers["content-type"] == "application/octet-stream"
    [seen] = replica.seen
    assert seen.body == sent
    assert seen.headers["inference-header-content-length"] == str(len(header))
    assert seen.path_qs == "/v2/models/m/versions/1/infer"


async def test_a_gzip_answer_is_not_decompressed(world: World) -> None:
    plain = b'{"outputs": []}' * 100
    packed = gzip.compress(plain)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=packed, headers={"content-type": "application/json", "content-encoding": "gzip"}
        )

    replica = await world.replica(handler)
    world.service("m", replica.address)
    client = world.start()
    async with client.stream(
        "POST", "/v2/models/m/infer", content=b"{}", headers={"accept-encoding": "gzip"}
    ) as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.status_code == 200
    assert raw == packed
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-length"] == str(len(packed))
    assert replica.seen[0].headers["accept-encoding"] == "gzip"


async def test_a_compressed_request_body_passes_through(world: World) -> None:
    # aiohttp's server would inflate the body before a handler sees it: read the socket.
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        seen.extend([head, await reader.readexactly(length)])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    address = await world.raw_replica(serve)
    world.service("m", address)
    client = world.start()
    packed = gzip.compress(b'{"inputs": []}')
    response = await client.post(
        "/v2/models/m/infer", content=packed, headers={"content-encoding": "gzip"}
    )
    assert (response.status_code, response.content) == (200, b"ok")
    head, body = seen
    assert body == packed
    assert b"\r\ncontent-encoding: gzip\r\n" in head.lower()


async def test_query_strings_reach_the_replica_as_sent(world: World) -> None:
    replica = await world.replica()
    world.service("m", replica.address)
    client = world.start()
    response = await client.get("/v2/models/m/infer?a=1&b=x%20y&c=%2F&c=2")
    assert response.status_code == 200
    assert replica.seen[0].path_qs == "/v2/models/m/infer?a=1&b=x%20y&c=%2F&c=2"
    assert (replica.seen[0].method, replica.seen[0].body) == ("GET", b"")


async def test_hop_by_hop_headers_stay_and_forwarded_for_goes_on(world: World) -> None:
    replica = await world.replica()
    world.service("m", replica.address)
    client = world.start()
    response = await client.post(
        "/v2/models/m/infer",
        content=b"{}",
        headers={
            "connection": "keep-alive, x-secret",
            "keep-alive": "timeout=30",
            "x-secret": "only for the activator",
            "te": "trailers",
            "trailer": "x-sum",
            "upgrade": "h2c",
            "proxy-authorization": "Basic eA==",
            "x-forwarded-for": "203.0.113.7",
            "authorization": "Bearer abc",
            "x-request-id": "r-1",
        },
    )
    assert response.status_code == 200
    headers = replica.seen[0].headers
    for name in ("x-secret", "te", "trailer", "upgrade", "proxy-authorization", "keep-alive"):
        assert name not in headers, name
    assert headers.get("connection", "keep-alive").lower() == "keep-alive"
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["authorization"] == "Bearer abc"
    assert headers["x-request-id"] == "r-1"


async def test_expect_continue_does_not_stall_the_request(world: World) -> None:
    replica = await world.replica()
    world.service("m", replica.address)
    client = world.start()
    response = await asyncio.wait_for(
        client.post("/v2/models/m/infer", content=b"x" * 2048, headers={"expect": "100-continue"}),
        2.0,
    )
    assert response.status_code == 200
    assert response.content == b"x" * 2048


async def test_hop_by_hop_answer_headers_stay_with_the_replica(world: World) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=b"ok",
            headers={"connection": "keep-alive, x-internal", "x-internal": "1", "x-public": "2"},
        )

    replica = await world.replica(handler)
    world.service("m", replica.address)
    client = world.start()
    response = await client.get("/v2/models/m")
    assert response.status_code == 200
    assert "x-internal" not in response.headers
    assert "connection" not in response.headers
    assert response.headers["x-public"] == "2"


# -- large bodies, streamed -------------------------------------------------------------------


async def test_a_large_body_is_streamed_to_the_replica_intact(world: World) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(text=hashlib.sha256(await request.read()).hexdigest())

    replica = await world.replica(handler)
    world.service("m", replica.address)
    client = world.start()
    body = bytes(range(256)) * (REPLAYABLE_BYTES // 256 + 4099)
    assert len(body) > REPLAYABLE_BYTES
    response = await client.post("/v2/models/m/infer", content=body)
    assert response.status_code == 200
    assert response.text == hashlib.sha256(body).hexdigest()
    assert len(replica.seen[0].body) == len(body)
    # Streamed: chunked to the replica, not the client's length.
    assert replica.seen[0].headers.get("transfer-encoding") == "chunked"


async def test_a_chunked_request_body_is_streamed(world: World) -> None:
    replica = await world.replica()
    world.service("m", replica.address)
    client = world.start()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(5):
            yield bytes([65 + i]) * 1000

    response = await client.post("/v2/models/m/infer", content=chunks())
    assert response.status_code == 200
    expected = b"".join(bytes([65 + i]) * 1000 for i in range(5))
    assert replica.seen[0].body == expected
    assert response.content == expected


async def test_a_large_answer_is_streamed_back_intact(world: World) -> None:
    big = bytes(range(256)) * 12_000  # ~3 MiB: above the one-piece limit

    async def sized(request: web.Request) -> web.StreamResponse:
        return web.Response(body=big, content_type="application/octet-stream")

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(0, len(big), 100_000):
            await response.write(big[i : i + 100_000])
        await response.write_eof()
        return response

    first, second = await world.replica(sized), await world.replica(chunked)
    world.service("a", first.address)
    world.service("b", second.address)
    client = world.start()
    response = await client.get("/v2/models/a/x")
    assert response.status_code == 200
    assert response.headers["content-length"] == str(len(big))
    assert response.content == big
    response = await client.get("/v2/models/b/x")
    assert response.status_code == 200
    # A chunked answer to a request forwarded whole is read whole and framed by length.
    assert response.headers["content-length"] == str(len(big))
    assert "transfer-encoding" not in response.headers
    assert response.content == big


# -- failures and retries ---------------------------------------------------------------------


async def test_a_closed_port_is_retried_on_the_other_replica(world: World) -> None:
    live = await world.replica()
    dead = f"127.0.0.1:{_closed_port()}"
    # Equal load: the first replica added is tried first, so every request hits the dead one.
    service = world.service("m", dead, live.address, container_concurrency=4)
    client = world.start()
    for i in range(5):
        response = await client.post("/v2/models/m/infer", content=b"%d" % i)
        assert response.status_code == 200
        assert response.content == b"%d" % i
    assert [s.body for s in live.seen] == [b"0", b"1", b"2", b"3", b"4"]
    assert service.throttler.in_flight == 0
    assert world.metrics is not None and world.metrics.responses == {("m", "200"): 5}


async def test_a_large_body_not_yet_sent_is_retried_too(world: World) -> None:
    live = await world.replica()
    dead = f"127.0.0.1:{_closed_port()}"
    world.service("m", dead, live.address, container_concurrency=4)
    client = world.start()
    body = b"z" * (REPLAYABLE_BYTES + 1)
    response = await client.post("/v2/models/m/infer", content=body)
    assert response.status_code == 200
    assert live.seen[0].body == body


async def test_a_connect_timeout_is_retried_on_the_other_replica(world: World) -> None:
    # A listener whose accept queue is full drops new SYNs: connecting hangs, as to a gone pod.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(blackhole.getsockname())
        fillers.append(filler)
    try:
        live = await world.replica()
        world.pool = HttpPool(connect_timeout=0.2)
        hole = f"127.0.0.1:{blackhole.getsockname()[1]}"
        world.service("m", hole, live.address, container_concurrency=4)
        client = world.start()
        started = time.monotonic()
        response = await client.post("/v2/models/m/infer", content=b"again")
        assert (response.status_code, response.content) == (200, b"again")
        assert 0.15 <= time.monotonic() - started < 1.0
        assert [s.body for s in live.seen] == [b"again"]
    finally:
        for filler in fillers:
            filler.close()
        blackhole.close()


async def test_both_replicas_dead_is_a_502_naming_the_model(world: World) -> None:
    first, second = _closed_port(), _closed_port()
    service = world.service(
        "m", f"127.0.0.1:{first}", f"127.0.0.1:{second}", container_concurrency=4
    )
    client = world.start()
    response = await client.post("/v2/models/m/infer", content=b"{}")
    assert response.status_code == 502
    message = _error(response)
    # The retry went to the other replica; its failure is what the client reads.
    assert message.startswith(f"model 'm': cannot connect to 127.0.0.1:{second}: "), message
    assert service.throttler.in_flight == 0
    assert world.metrics is not None and world.metrics.responses == {("m", "502"): 1}


async def test_no_replica_before_the_deadline_is_a_504(world: World) -> None:
    service = world.service("m", activation_timeout_s=0.2)
    client = world.start()
    started = time.monotonic()
    response = await client.post("/v2/models/m/infer", content=b"{}")
    assert 0.15 <= time.monotonic() - started < 2.0
    assert response.status_code == 504
    assert _error(response).startswith("model 'm': no replica had a free slot within 0.")
    assert "retry-after" not in response.headers
    assert (service.throttler.queued, service.window.current) == (0, 0)


async def test_a_full_queue_is_a_503_with_retry_after(world: World) -> None:
    replica = await world.replica()
    service = world.service("m", replica.address, container_concurrency=1, queue_depth=1)
    client = world.start()
    held = await service.throttler.acquire(time.monotonic() + 5)
    queued = asyncio.create_task(client.post("/v2/models/m/infer", content=b"queued"))
    for _ in range(50):
        if service.throttler.queued:
            break
        await asyncio.sleep(0.005)
    assert service.throttler.queued == 1
    response = await client.post("/v2/models/m/infer", content=b"refused")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert _error(response) == "model 'm': 1 requests already queued (queue_depth 1)"
    service.throttler.release(held)
    answer = await asyncio.wait_for(queued, 2.0)
    assert (answer.status_code, answer.content) == (200, b"queued")
    assert [s.body for s in replica.seen] == [b"queued"]


async def test_an_unknown_model_is_a_404(world: World) -> None:
    world.service("m")
    client = world.start()
    response = await client.post("/v2/models/nope/infer", content=b"{}")
    assert response.status_code == 404
    assert _error(response) == "model 'nope' is not served by this activator"
    response = await client.post("/v1/models/nope:predict", content=b"{}")
    assert response.status_code == 404
    assert _error(response) == "model 'nope' is not served by this activator"


async def test_an_unknown_server_path_is_a_404(world: World) -> None:
    client = world.start()
    response = await client.get("/v3/anything")
    assert response.status_code == 404
    assert _error(response) == "no route for GET /v3/anything"


async def test_a_broken_answer_is_a_502_and_the_next_request_is_served(world: World) -> None:
    broken = True

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if broken:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
                    await writer.drain()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    address = await world.raw_replica(serve)
    service = world.service("m", address)
    client = world.start()
    response = await client.post("/v2/models/m/infer", content=b"{}")
    assert response.status_code == 502
    expected = f"model 'm': replica {address} broke off its answer"
    assert _error(response).startswith(expected), response.text
    assert service.throttler.in_flight == 0
    broken = False
    response = await client.post("/v2/models/m/infer", content=b"{}")
    assert (response.status_code, response.content) == (200, b"ok")
    assert world.metrics is not None
    assert world.metrics.responses == {("m", "502"): 1, ("m", "200"): 1}


async def test_an_answer_broken_after_its_headers_is_still_a_clean_502(world: World) -> None:
    big = 2 * 1024 * 1024

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big + b"x" * 1000)
        await writer.drain()
        writer.close()

    address = await world.raw_replica(serve)
    replica = await world.replica()
    service = world.service("m", address)
    world.service("n", replica.address)
    client = world.start()
    # The replica's status and headers came, then it broke off: a request forwarded whole is
    # answered whole, so nothing had reached the client and it gets a 502.
    response = await client.get("/v2/models/m/infer")
    assert response.status_code == 502
    assert _error(response).startswith(f"model 'm': replica {address} broke off its answer")
    assert service.throttler.in_flight == 0
    response = await client.get("/v2/models/n/infer")
    assert response.status_code == 200


# -- answered by the activator itself ---------------------------------------------------------


async def test_model_readiness_is_answered_locally(world: World) -> None:
    replica = await world.replica()
    world.service("m")  # no replica at all: a probe must not wake it
    world.service("r", replica.address)
    client = world.start()
    for path, body in [
        ("/v2/models/m/ready", {"ready": True}),
        ("/v2/models/m/versions/1/ready", {"ready": True}),
        ("/v1/models/m", {"name": "m", "ready": True}),
        ("/v2/models/r/ready", {"ready": True}),
        ("/v1/models/r", {"name": "r", "ready": True}),
    ]:
        response = await client.get(path)
        assert (response.status_code, response.json()) == (200, body), path
    for path in ("/v2/models/x/ready", "/v1/models/x"):
        response = await client.get(path)
        assert response.status_code == 404, path
        assert _error(response) == "model 'x' is not served by this activator"
    assert replica.seen == []
    for service in world.services.values():
        assert (service.window.current, service.throttler.queued) == (0, 0)
    assert world.metrics is not None and world.metrics.responses == {}


async def test_draining_answers_not_ready_and_refuses_requests(world: World) -> None:
    replica = await world.replica()
    world.service("m", replica.address)
    client = world.start()
    assert world.app is not None
    response = await client.get("/v2/health/ready")
    assert (response.status_code, response.json()) == (200, {"ready": True})
    world.app.draining = True
    response = await client.get("/v2/health/ready")
    assert (response.status_code, response.json()) == (503, {"ready": False})
    response = await client.get("/v2/health/live")
    assert (response.status_code, response.json()) == (200, {"live": True})
    response = await client.get("/v2/models/m/ready")
    assert (response.status_code, response.json()) == (503, {"ready": False})
    response = await client.get("/v1/models/m")
    assert (response.status_code, response.json()) == (503, {"name": "m", "ready": False})
    response = await client.post("/v2/models/m/infer", content=b"{}")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert _error(response) == "the activator is shutting down"
    assert replica.seen == []


async def test_server_level_endpoints(world: World) -> None:
    world.service("b")
    world.service("a")
    client = world.start()
    response = await client.get("/v2")
    assert response.json() == {"name": "ember-activator", "version": "0.1.0", "extensions": []}
    assert (await client.get("/v1/models")).json() == {"models": ["a", "b"]}
    response = await client.post("/v2/repository/index")
    assert response.json() == [{"name": "a", "state": "READY"}, {"name": "b", "state": "READY"}]
    assert (await client.get("/status")).json() == {"models": ["a", "b"]}


async def test_metrics_count_answers_by_model_and_code(world: World) -> None:
    replica = await world.replica()
    world.service("m", replica.address)
    world.service("dead", f"127.0.0.1:{_closed_port()}")
    world.service("cold", activation_timeout_s=0.05)
    client = world.start()
    for _ in range(2):
        assert (await client.post("/v2/models/m/infer", content=b"{}")).status_code == 200
    assert (await client.post("/v2/models/dead/infer", content=b"{}")).status_code == 502
    assert (await client.post("/v2/models/cold/infer", content=b"{}")).status_code == 504
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = set(response.text.splitlines())
    assert 'ember_activator_responses_total{code="200",model_name="m"} 2.0' in lines
    assert 'ember_activator_responses_total{code="502",model_name="dead"} 1.0' in lines
    assert 'ember_activator_responses_total{code="504",model_name="cold"} 1.0' in lines
    assert 'ember_activator_ready_replicas{model_name="m"} 1.0' in lines
    assert 'ember_activator_ready_replicas{model_name="cold"} 0.0' in lines
    assert 'ember_activator_request_duration_seconds_count{model_name="m"} 2.0' in lines


# -- cold starts --------------------------------------------------------------------------------


async def test_a_request_that_waited_for_a_replica_says_how_long(world: World) -> None:
    replica = await world.replica()
    service = world.service("m")
    client = world.start()
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, service.throttler.add, Replica(replica.address))
    response = await client.post("/v2/models/m/infer", content=b"cold")
    assert (response.status_code, response.content) == (200, b"cold")
    waited = int(response.headers["x-ember-cold-start-ms"])
    assert 150 <= waited < 2000
    response = await client.post("/v2/models/m/infer", content=b"warm")
    assert (response.status_code, response.content) == (200, b"warm")
    assert "x-ember-cold-start-ms" not in response.headers
    assert "x-ember-cold-start-ms" not in replica.seen[0].headers


class Exchange:
    """One request driven straight through the ASGI interface, with a client that can leave."""

    def __init__(
        self, path: str, body: list[bytes], headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.gone = asyncio.Event()
        self.sent: list[dict[str, Any]] = []
        self._messages = [
            {"type": "http.request", "body": chunk, "more_body": i < len(body) - 1}
            for i, chunk in enumerate(body)
        ]
        self._streamed = headers is not None and (b"transfer-encoding", b"chunked") in headers
        self.scope: dict[str, Any] = {
            "type": "http",
            "method": "POST",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": headers
            if headers is not None
            else [(b"content-length", str(sum(map(len, body))).encode())],
            "client": ("127.0.0.1", 5000),
        }

    async def receive(self) -> dict[str, Any]:
        if self._messages:
            message = self._messages.pop(0)
            if self._streamed and not self._messages:
                message["more_body"] = True  # the rest of the body never comes
            return message
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def run(self, app: ActivatorApp) -> asyncio.Task[None]:
        return asyncio.create_task(app(self.scope, self.receive, self.send))


async def test_a_client_that_leaves_while_queued_leaves_the_queue(world: World) -> None:
    replica = await world.replica()
    service = world.service("m")
    world.start()
    assert world.app is not None and world.metrics is not None
    exchange = Exchange("/v2/models/m/infer", [b"{}"])
    call = exchange.run(world.app)
    await asyncio.sleep(0.05)
    assert (service.throttler.queued, service.window.current) == (1, 1)
    exchange.gone.set()
    await asyncio.wait_for(call, 1.0)
    assert exchange.sent == []
    assert (service.throttler.queued, service.window.current) == (0, 0)
    service.throttler.add(Replica(replica.address))
    await asyncio.sleep(0.05)
    assert replica.seen == []  # nobody is waiting for that answer: it is never asked for
    assert world.metrics.responses == {("m", "499"): 1}


async def test_a_client_that_leaves_while_its_replica_works_frees_the_slot(world: World) -> None:
    working = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        working.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()  # aiohttp cancels a handler whose client went away
            raise
        return web.Response(body=b"late")  # pragma: no cover

    replica = await world.replica(slow)
    service = world.service("m", replica.address, container_concurrency=1)
    world.start()
    assert world.app is not None and world.metrics is not None
    exchange = Exchange("/v2/models/m/infer", [b"{}"])
    call = exchange.run(world.app)
    await asyncio.wait_for(working.wait(), 1.0)
    assert service.throttler.in_flight == 1
    exchange.gone.set()
    await asyncio.wait_for(call, 1.0)
    assert (exchange.sent, service.throttler.in_flight) == ([], 0)
    await asyncio.wait_for(cancelled.wait(), 1.0)
    assert world.metrics.responses == {("m", "499"): 1}


async def test_a_client_that_leaves_mid_upload_sends_no_short_request(world: World) -> None:
    replica = await world.replica()
    service = world.service("m", replica.address)
    world.start()
    assert world.app is not None and world.metrics is not None
    exchange = Exchange(
        "/v2/models/m/infer", [b"first part"], headers=[(b"transfer-encoding", b"chunked")]
    )
    call = exchange.run(world.app)
    await asyncio.sleep(0.05)
    exchange.gone.set()
    await asyncio.wait_for(call, 1.0)
    await asyncio.sleep(0.05)
    # The replica's read of the body failed: it never handled a request cut short.
    assert replica.seen == []
    assert (exchange.sent, service.throttler.in_flight) == ([], 0)
    assert world.metrics.responses == {("m", "499"): 1}


async def test_a_model_name_is_read_from_the_path_as_sent(world: World) -> None:
    replica = await world.replica()
    world.service("team/resnet", replica.address)
    world.service("x%41", replica.address)
    client = world.start()
    response = await client.post("/v2/models/team%2Fresnet/infer", content=b"1")
    assert (response.status_code, response.content) == (200, b"1")
    response = await client.post("/v2/models/x%2541/infer", content=b"2")
    assert (response.status_code, response.content) == (200, b"2")
    response = await client.get("/v2/models/team%2Fresnet/ready")
    assert (response.status_code, response.json()) == (200, {"ready": True})
    assert [s.path_qs for s in replica.seen] == [
        "/v2/models/team%2Fresnet/infer",
        "/v2/models/x%2541/infer",
    ]


async def test_a_server_without_raw_path_routes_on_the_path_encoded_again(world: World) -> None:
    replica = await world.replica()
    world.service("café", replica.address)
    world.service("m", replica.address)
    world.start()
    assert world.app is not None
    for path, sent in [
        ("/v2/models/café/infer", "/v2/models/caf%C3%A9/infer"),
        ("/v1/models/m:predict", "/v1/models/m:predict"),
    ]:
        exchange = Exchange(path, [b"{}"])
        del exchange.scope["raw_path"]
        await asyncio.wait_for(exchange.run(world.app), 2.0)
        assert exchange.sent[0]["status"] == 200, (path, exchange.sent)
        assert replica.seen[-1].path_qs == sent
