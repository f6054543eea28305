"""HTTP/1.1 framing of inference answers, byte for byte, on raw sockets.

Inference requests are answered by `rest/protocol.py` below ASGI; every other request and
anything pipelined behind an unanswered one goes through uvicorn. These tests hold both to
the same wire behaviour: keep-alive, `connection: close`, HTTP/1.0, Expect: 100-continue,
pipelining order, size limits before and during the body, and a client that leaves early.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import orjson
import pytest

MLP_ROW = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784],
                       "data": [0.25] * 784}]}  # fmt: skip
IDENTITY = {"inputs": [{"name": "INPUT_INT32", "datatype": "INT32", "shape": [1, 3],
                        "data": [7, 8, 9]}]}  # fmt: skip


def _request(path: str, body: bytes, *headers: str, version: str = "1.1") -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: test", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Wire:
    """A raw connection that reads whole HTTP/1.1 responses framed by Content-Length."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed before a full head: {self.buffer!r}")
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"duplicate header {name}"
            headers[name.lower()] = value.strip()
        if status == 100:
            return status, headers, b""
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            if not self._fill():
                raise ConnectionError("closed inside a body")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, body

    def closed_by_server(self) -> bool:
        self.sock.settimeout(5)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def wire(main_server: Any) -> Any:
    opened: list[Wire] = []

    def connect() -> Wire:
        w = Wire(main_server.port)
        opened.append(w)
        return w

    yield connect
    for w in opened:
        w.close()


def test_keep_alive_serves_many_answers_on_one_connection(wire: Any) -> None:
    w = wire()
    body = orjson.dumps(IDENTITY)
    for i in range(20):
        w.send(_request("/v2/models/identity/infer", body))
        status, headers, answer = w.response()
        assert status == 200, answer
        assert headers["content-type"] == "application/json"
        assert "connection" not in headers
        assert "date" in headers
        assert orjson.loads(answer)["outputs"][0]["data"] == [7, 8, 9], i


def test_connection_close_is_honoured(wire: Any) -> None:
    w = wire()
    w.send(_request("/v2/models/identity/infer", orjson.dumps(IDENTITY), "Connection: close"))
    status, headers, _ = w.response()
    assert status == 200
    assert headers["connection"] == "close"
    assert w.closed_by_server()


def test_http_1_0_gets_an_answer_and_a_close(wire: Any) -> None:
    w = wire()
    w.send(_request("/v2/models/identity/infer", orjson.dumps(IDENTITY), version="1.0"))
    status, headers, answer = w.response()
    assert status == 200, answer
    assert headers["connection"] == "close"
    assert w.closed_by_server()


def test_expect_100_continue_is_answered_before_the_body(wire: Any) -> None:
    w = wire()
    body = orjson.dumps(MLP_ROW)
    head, _, rest = _request("/v2/models/mlp/infer", body, "Expect: 100-continue").partition(
        b"\r\n\r\n"
    )
    w.send(head + b"\r\n\r\n")
    status, _, _ = w.response()
    assert status == 100
    w.send(rest)
    status, _, answer = w.response()
    assert status == 200, answer
    assert len(orjson.loads(answer)["outputs"][0]["data"]) == 10


def test_pipelined_requests_are_answered_in_order(wire: Any) -> None:
    w = wire()
    requests = []
    for value in range(6):
        doc = {"id": f"r{value}", "inputs": [{"name": "INPUT_INT32", "datatype": "INT32",
                                              "shape": [1, 1], "data": [value]}]}  # fmt: skip
        requests.append(_request("/v2/models/identity/infer", orjson.dumps(doc)))
    # A non-inference route in the middle takes uvicorn's path; order must still hold.
    requests.insert(3, b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n\r\n")
    w.send(b"".join(requests))
    seen = []
    for _ in range(len(requests)):
        status, _, answer = w.response()
        assert status == 200, answer
        doc = orjson.loads(answer)
        seen.append(doc.get("id", "live" if doc.get("live") else doc))
    assert seen == ["r0", "r1", "r2", "live", "r3", "r4", "r5"]


def test_declared_body_over_the_limit_is_refused_before_it_is_sent(ember: Any) -> None:
    server = ember("--model-repository", "models", "--max-body-bytes", "4096")
    w = Wire(server.port)
    try:
        w.send(
            b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n"
        )
        status, headers, answer = w.response()
        assert status == 413
        assert headers["connection"] == "close"
        assert "exceeds the limit of 4096 bytes" in orjson.loads(answer)["error"]
        assert w.closed_by_server()
    finally:
        w.close()
    server.assert_serves("identity")
    labels = frozenset({"model_name": "identity", "protocol": "v2", "outcome": "too_large"}.items())
    assert server.metrics()[("ember_requests_total", labels)] == 1


def test_chunked_body_over_the_limit_is_cut_off(ember: Any) -> None:
    server = ember("--model-repository", "models", "--max-body-bytes", "4096")
    w = Wire(server.port)
    try:
        w.send(
            b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: t\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 3000
        for _ in range(3):
            w.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, headers, answer = w.response()
        assert status == 413
        assert headers["connection"] == "close"
        assert "exceeds the limit of 4096 bytes" in orjson.loads(answer)["error"]
    finally:
        w.close()
    server.assert_serves("identity")


def test_chunked_body_within_the_limit_is_served(wire: Any) -> None:
    w = wire()
    body = orjson.dumps(IDENTITY)
    half = len(body) // 2
    w.send(
        b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (half, body[:half])
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body) - half, body[half:])
    )
    status, _, answer = w.response()
    assert status == 200, answer
    assert orjson.loads(answer)["outputs"][0]["data"] == [7, 8, 9]


def test_errors_keep_the_connection_open(wire: Any) -> None:
    w = wire()
    w.send(_request("/v2/models/nope/infer", orjson.dumps(IDENTITY)))
    status, _, answer = w.response()
    assert status == 404
    assert "nope" in orjson.loads(answer)["error"]
    w.send(_request("/v2/models/identity/infer", b"{not json"))
    status, _, answer = w.response()
    assert status == 400
    assert "not valid JSON" in orjson.loads(answer)["error"]
    w.send(_request("/v2/models/identity/infer", orjson.dumps(IDENTITY)))
    status, _, _ = w.response()
    assert status == 200


def test_percent_encoded_model_names_reach_the_same_model(wire: Any) -> None:
    w = wire()
    w.send(_request("/v2/models/%69dentity/infer", orjson.dumps(IDENTITY)))
    status, _, answer = w.response()
    assert status == 200, answer
    assert orjson.loads(answer)["model_name"] == "identity"


def test_v1_predict_on_the_wire(wire: Any) -> None:
    w = wire()
    w.send(_request("/v1/models/mlp:predict", orjson.dumps({"instances": [[0.25] * 784] * 2})))
    status, _, answer = w.response()
    assert status == 200, answer
    predictions = orjson.loads(answer)["predictions"]
    assert len(predictions) == 2 and len(predictions[0]) == 10


def test_a_client_that_leaves_mid_request_harms_nobody(main_server: Any) -> None:
    for _ in range(20):
        sock = socket.create_connection(("127.0.0.1", main_server.port), timeout=5)
        body = orjson.dumps(MLP_ROW)
        sock.sendall(_request("/v2/models/mlp/infer", body)[: len(body) // 2])
        sock.close()
        # Whole requests whose answers nobody reads.
        sock = socket.create_connection(("127.0.0.1", main_server.port), timeout=5)
        sock.sendall(_request("/v2/models/mlp/infer", body))
        sock.close()
    time.sleep(0.2)
    main_server.assert_serves("mlp")


def test_refusals_come_from_the_headers_and_the_body_is_dropped(wire: Any) -> None:
    w = wire()
    body = orjson.dumps(IDENTITY)
    head, _, rest = _request("/v2/models/nope/infer", body).partition(b"\r\n\r\n")
    w.send(head + b"\r\n\r\n")
    status, headers, answer = w.response()  # before any of the body was sent
    assert status == 404, answer
    assert "connection" not in headers
    w.send(rest)  # the body arrives late and is dropped; the connection goes on
    w.send(_request("/v2/models/identity/infer", body))
    status, _, answer = w.response()
    assert status == 200, answer
    assert orjson.loads(answer)["outputs"][0]["data"] == [7, 8, 9]


def test_a_refusal_to_a_client_waiting_for_100_continue_closes(wire: Any) -> None:
    w = wire()
    head, _, _ = _request("/v2/models/nope/infer", b"{}", "Expect: 100-continue").partition(
        b"\r\n\r\n"
    )
    w.send(head + b"\r\n\r\n")
    status, headers, _ = w.response()
    assert status == 404
    assert headers["connection"] == "close"
    assert w.closed_by_server()


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n{}",
        b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n{}",
        b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
        b"Content-Length: 3\r\n\r\n{}x",
        b"POST /v2/models/identity/infer HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST /v2/models/identity/infer HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
        b"\r\nzz\r\n{}\r\n0\r\n\r\n",
        b"POST /v2/models/identity/infer HTTP/9.9\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}",
        b"\x00\x01\x02\xff" * 64,
    ],
)
def test_malformed_http_is_refused_and_the_server_keeps_serving(
    main_server: Any, raw: bytes
) -> None:
    w = Wire(main_server.port)
    try:
        w.send(raw)
        try:
            status, _, _ = w.response()
        except ConnectionError:
            status = None  # closed without an answer: also a refusal
        assert status in (None, 400, 413), status
    finally:
        w.close()
    main_server.assert_serves("identity")
