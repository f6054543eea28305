"""The proxy's header rules: what a replica sees of the client's headers, and what the client
sees of the replica's."""

from __future__ import annotations

from ember.activator.proxy import answer_headers, forward_headers


def test_forward_headers_drop_hop_by_hop_and_framing() -> None:
    raw = [
        (b"Host", b"activator:8080"),
        (b"Connection", b"keep-alive"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Authorization", b"Basic eA=="),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Trailer", b"x-checksum"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"Content-Length", b"12"),
        (b"Content-Type", b"application/json"),
        (b"Authorization", b"Bearer t"),
        (b"Inference-Header-Content-Length", b"40"),
        (b"Content-Encoding", b"gzip"),
    ]
    assert forward_headers(raw, None) == [
        ("content-type", "application/json"),
        ("authorization", "Bearer t"),
        ("inference-header-content-length", "40"),
        ("content-encoding", "gzip"),
    ]


def test_forward_headers_drop_the_headers_connection_names() -> None:
    raw = [
        (b"x-before", b"1"),  # named by a Connection header that comes later
        (b"Connection", b"close, X-Before"),
        (b"connection", b" x-after ,Keep-Alive"),
        (b"X-After", b"2"),
        (b"x-kept", b"3"),
    ]
    assert forward_headers(raw, None) == [("x-kept", "3")]


def test_forward_headers_start_a_forwarded_for_chain() -> None:
    assert forward_headers([(b"accept", b"*/*")], "10.1.2.3") == [
        ("accept", "*/*"),
        ("x-forwarded-for", "10.1.2.3"),
    ]


def test_forward_headers_append_to_an_existing_chain() -> None:
    raw = [
        (b"X-Forwarded-For", b"203.0.113.7, 198.51.100.2"),
        (b"accept", b"*/*"),
        (b"x-forwarded-for", b"192.0.2.9"),
    ]
    assert forward_headers(raw, "10.1.2.3") == [
        ("accept", "*/*"),
        ("x-forwarded-for", "203.0.113.7, 198.51.100.2, 192.0.2.9, 10.1.2.3"),
    ]
    # Without a client address the chain passes on as it came.
    assert forward_headers(raw, None) == [
        ("accept", "*/*"),
        ("x-forwarded-for", "203.0.113.7, 198.51.100.2, 192.0.2.9"),
    ]
    assert forward_headers([], None) == []


def test_forward_headers_keep_latin1_values_and_repeated_headers() -> None:
    raw = [(b"X-Note", "caf\xe9".encode("latin-1")), (b"x-tag", b"a"), (b"X-Tag", b"b")]
    assert forward_headers(raw, None) == [("x-note", "caf\xe9"), ("x-tag", "a"), ("x-tag", "b")]


def test_answer_headers_keep_content_length_and_encoding() -> None:
    raw = [
        (b"Content-Type", b"application/octet-stream"),
        (b"Content-Length", b"1234"),
        (b"Content-Encoding", b"gzip"),
        (b"Inference-Header-Content-Length", b"80"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    assert answer_headers(raw) == [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", b"1234"),
        (b"content-encoding", b"gzip"),
        (b"inference-header-content-length", b"80"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


def test_answer_headers_drop_hop_by_hop() -> None:
    raw = [
        (b"Transfer-Encoding", b"chunked"),
        (b"Connection", b"keep-alive, X-Internal"),
        (b"Keep-Alive", b"timeout=5"),
        (b"X-Internal", b"secret"),
        (b"Trailer", b"x-sum"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"content-type", b"application/json"),
    ]
    assert answer_headers(raw) == [(b"content-type", b"application/json")]
