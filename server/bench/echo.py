"""The client floor: a canned HTTP/1.1 answer from a bare asyncio protocol in a child process.

The same client against this server measures what the client and the loopback TCP cost by
themselves; no real server can answer faster, so it bounds what the bench can show.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import socket
from collections.abc import Collection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import cast

_BODY = b'{"live":true}'
_ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
)
START_SECONDS = 30.0


class _Canned(asyncio.Protocol):
    """Answers every request (a header block; the floor sends GETs, no body) with `_ANSWER`."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP server's connections are stream transports (uvloop's as well).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            self._buffer = self._buffer[end + 4 :]
            if self._transport is not None:
                self._transport.write(_ANSWER)


async def _serve(sock: socket.socket, ready: Connection) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Canned, sock=sock)
    ready.send(sock.getsockname()[1])
    async with server:
        await server.serve_forever()


def _main(ready: Connection, cpus: tuple[int, ...] | None) -> None:
    if cpus is not None:
        # On the server's CPUs: the client then meets the floor from where it meets the
        # server, and the client's own core holds only the client.
        os.sched_setaffinity(0, cpus)
    # The child binds port 0 itself and reports the port: no race for a port picked earlier.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    try:
        import uvloop  # the loop uvicorn uses, so this floor is comparable to the server's

        uvloop.run(_serve(sock, ready))
    except ImportError:
        asyncio.run(_serve(sock, ready))


class EchoServer:
    """A canned-answer server in a child process (spawned: no torch state is inherited),
    on `cpus` when given."""

    def __init__(self, cpus: Collection[int] | None = None) -> None:
        self.url = ""
        self._cpus = None if cpus is None else tuple(sorted(cpus))
        self._process: BaseProcess | None = None

    def __enter__(self) -> EchoServer:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe(duplex=False)
        process = context.Process(
            target=_main, args=(child, self._cpus), name="ember-bench-echo", daemon=True
        )
        process.start()
        self._process = process
        child.close()
        if not parent.poll(START_SECONDS):
            self.__exit__(None, None, None)
            raise RuntimeError("the client-floor echo server did not start")
        self.url = f"http://127.0.0.1:{parent.recv()}"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.join(5)
            with contextlib.suppress(ValueError):
                self._process.close()
