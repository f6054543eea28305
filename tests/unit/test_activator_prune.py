"""Connections and channels to replicas that are gone are dropped, and only those (a cold
start brings a new port each time, so keeping them would grow without bound)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ember.activator.grpc_proxy import GrpcProxy
from ember.activator.throttler import Replica
from ember.activator.upstream import ReplicaClient


async def _server(port: int) -> web.AppRunner:
    async def ok(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "0")))  # ?s=seconds: a slow answer
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def test_idle_connections_of_gone_replicas_are_closed(unused_tcp_port_factory: Any) -> None:
    ports = [unused_tcp_port_factory(), unused_tcp_port_factory()]
    runners = [await _server(p) for p in ports]
    client = ReplicaClient(connect_timeout=2.0)
    request = b"GET / HTTP/1.1\r\nHost: r\r\n\r\n"
    try:
        for port in ports:
            answer = await client.send(f"127.0.0.1:{port}", request)
            assert answer is not None
        assert sorted(client._idle) == sorted(f"127.0.0.1:{p}" for p in ports)
        kept = f"127.0.0.1:{ports[0]}"
        gone = client._idle[f"127.0.0.1:{ports[1]}"]
        client.prune({kept})
        assert list(client._idle) == [kept]
        for _ in range(100):  # the transport reports its end on a later loop turn
            if all(c.closed for c in gone):
                break
            await asyncio.sleep(0.01)
        assert gone and all(c.closed for c in gone)
        assert await client.send(kept, request) is not None  # the kept one still works
    finally:
        client.close()
        for runner in runners:
            await runner.cleanup()


async def test_a_channel_is_closed_only_when_gone_and_idle() -> None:
    proxy = GrpcProxy({}, None, lambda: 0.0, lambda: False)  # type: ignore[arg-type]
    busy, idle, live = Replica("a:1", "a:2"), Replica("b:1", "b:2"), Replica("c:1", "c:2")
    with proxy._using(busy), proxy._using(idle), proxy._using(live):
        pass
    with proxy._using(busy):
        # A draining replica's call is still open: its channel stays.
        await proxy.prune({"c:2"})
        assert sorted(proxy._channels) == ["a:2", "c:2"]
    await proxy.prune({"c:2"})
    assert sorted(proxy._channels) == ["c:2"]
    await proxy.close()
    await asyncio.sleep(0)


async def test_an_answer_past_the_deadline_is_a_timeout_and_its_connection_is_dropped(
    unused_tcp_port_factory: Any,
) -> None:
    port = unused_tcp_port_factory()
    runner = await _server(port)
    client = ReplicaClient(connect_timeout=2.0)
    address = f"127.0.0.1:{port}"
    loop = asyncio.get_running_loop()
    try:
        answer = await client.send(
            address, b"GET /?s=0 HTTP/1.1\r\nHost: r\r\n\r\n", loop.time() + 5
        )
        assert answer.status == 200 and answer.body == b"ok"
        [kept] = client._idle[address]
        started = loop.time()
        try:
            await client.send(address, b"GET /?s=2 HTTP/1.1\r\nHost: r\r\n\r\n", started + 0.2)
        except TimeoutError:
            pass
        else:
            raise AssertionError("no TimeoutError")
        assert 0.15 < loop.time() - started < 1.5
        # Its answer may still come: the connection is not handed to the next request.
        assert kept.closed or not kept.keep_alive
        assert client._idle[address] == []
        answer = await client.send(
            address, b"GET /?s=0 HTTP/1.1\r\nHost: r\r\n\r\n", loop.time() + 5
        )
        assert answer.status == 200
    finally:
        client.close()
        await runner.cleanup()
