from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from ember.server.storage.errors import InvalidUri
from ember.server.storage.uri import (
    HttpUri,
    LocalUri,
    S3Uri,
    parse_uri,
    redacted,
    safe_relative_path,
)

BASE = Path("/models/base")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("s3://bucket/model.safetensors", S3Uri("bucket", "model.safetensors")),
        ("s3://bucket/a/b/model.bin", S3Uri("bucket", "a/b/model.bin")),
        ("s3://bucket/prefix/", S3Uri("bucket", "prefix/")),
        ("s3://bucket", S3Uri("bucket", "")),
        ("s3://bucket/", S3Uri("bucket", "")),
        ("S3://bucket/k", S3Uri("bucket", "k")),
        ("  s3://bucket/k  ", S3Uri("bucket", "k")),
        ("https://host/files/w.bin", HttpUri("https://host/files/w.bin")),
        ("http://127.0.0.1:8000/w.bin?sig=1", HttpUri("http://127.0.0.1:8000/w.bin?sig=1")),
        ("file:///mnt/models", LocalUri(Path("/mnt/models"))),
        ("file://localhost/mnt/models", LocalUri(Path("/mnt/models"))),
        ("/mnt/models", LocalUri(Path("/mnt/models"))),
        ("weights/model.pt", LocalUri(BASE / "weights/model.pt")),
        ("weights/../model.pt", LocalUri(BASE / "model.pt")),
        (".", LocalUri(BASE)),
    ],
)
def test_parses(text: str, expected: object) -> None:
    assert parse_uri(text, BASE) == expected


def test_prefix_or_object() -> None:
    assert S3Uri("b", "").is_prefix
    assert S3Uri("b", "p/").is_prefix
    assert not S3Uri("b", "p/k").is_prefix


def test_relative_to_current_folder_by_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_uri("w.bin") == LocalUri(tmp_path / "w.bin")


def test_http_file_name() -> None:
    assert HttpUri("https://h/a/b%20c.bin?x=1").name == "b c.bin"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty storage URI"),
        ("gs://bucket/k", "scheme 'gs' is not supported"),
        ("s3:///key", "no bucket name"),
        ("s3://bucket/../etc/passwd", "'..' in path"),
        ("s3://bucket/a/../../b", "'..' in path"),
        ("s3://bucket/a/../", "'..' in path"),
        ("s3://bucket//k", "absolute path"),
        ("s3://bucket/a/./k", "empty or '.' segment"),
        ("https://host/a/../b.bin", "'..' in path"),
        ("https://host/a/%2e%2e/b.bin", "'..' in path"),
        ("https://host/", "names no file"),
        ("https:///x.bin", "no host"),
        ("file://server/share", "expected file:///absolute/path"),
        ("file:///mnt/../etc", "'..' in path"),
        ("../models", "'..' leaves /models/base"),
        ("a/../../models", "'..' leaves /models/base"),
        ("..", "'..' leaves"),
        ("/mnt/../etc", "'..' in path"),
    ],
)
def test_rejects(text: str, message: str) -> None:
    with pytest.raises(InvalidUri, match=message) as caught:
        parse_uri(text, BASE)
    assert "\n" not in str(caught.value)


def test_safe_relative_path() -> None:
    assert safe_relative_path("a/b.bin", "k") == PurePosixPath("a/b.bin")
    for bad in ("", "/abs", "a/../b", "..", "a//b", "./a", "a\0b"):
        with pytest.raises(InvalidUri):
            safe_relative_path(bad, "k")


def test_urls_are_shown_without_their_credentials() -> None:
    signed = (
        "https://b.s3.amazonaws.com/w/model.safetensors?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAEXAMPLE%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Security-Token=tok&X-Amz-Signature=abc123"
    )
    shown = redacted(signed)
    assert shown == (
        "https://b.s3.amazonaws.com/w/model.safetensors?X-Amz-Algorithm=***"
        "&X-Amz-Credential=***&X-Amz-Security-Token=***&X-Amz-Signature=***"
    )
    assert str(parse_uri(signed)) == shown and parse_uri(signed) == HttpUri(signed)
    assert redacted("http://user:pw@host:8080/a.bin") == "http://***@host:8080/a.bin"
    plain = "https://host/a.bin"
    assert redacted(plain) == plain
    with pytest.raises(InvalidUri) as caught:
        parse_uri("https://host/folder/?X-Amz-Signature=abc123")
    assert "abc123" not in str(caught.value)
