"""Storage URIs: where a model's bytes are, parsed once into one of three typed forms.

- a path (relative to a base folder, or absolute) or `file:///abs/path`: `LocalUri`;
- `s3://bucket/key` (one object) or `s3://bucket/prefix/` (every object under the prefix, kept at
  its path relative to the prefix; `s3://bucket` is the whole bucket): `S3Uri`;
- `https://host/path/file` (one file; `http://` too, for local servers): `HttpUri`.

Every path that will become a local file name is checked here, so no `..` in a URI or in a key
found under a prefix can place a file outside the folder it is meant for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit, urlunsplit

from ember.server.storage.errors import InvalidUri

_SCHEMES = "s3://, https://, http://, file:// or a path"


@dataclass(frozen=True, slots=True)
class LocalUri:
    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True, slots=True)
class S3Uri:
    bucket: str
    # One object's key, or a prefix: "" (the whole bucket) or ending in "/".
    key: str

    @property
    def is_prefix(self) -> bool:
        return self.key == "" or self.key.endswith("/")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True, slots=True)
class HttpUri:
    url: str

    @property
    def name(self) -> str:
        """The file name the URL's path ends with."""
        return PurePosixPath(unquote(urlsplit(self.url).path)).name

    def __str__(self) -> str:
        return redacted(self.url)


def redacted(url: str) -> str:
    """`url` fit for a log line or an error message: the values of its query string and any
    password in it hidden. Presigned URLs carry their credentials in the query string
    (X-Amz-Credential, X-Amz-Security-Token, X-Amz-Signature), and so do the URLs some hubs
    redirect to."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(f"{pair.partition('=')[0]}=***" for pair in parts.query.split("&") if pair)
    if netloc == parts.netloc and not parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


StorageUri = LocalUri | S3Uri | HttpUri


def safe_relative_path(text: str, what: str) -> PurePosixPath:
    """`a/b/c` -> PurePosixPath('a/b/c'), refusing anything that could leave the folder it is
    joined to: absolute paths, `..` and `.` segments, empty segments, NUL bytes.

    `what` names the source in the error (the URI or key the path came from).
    """
    if not text:
        raise InvalidUri(f"{what}: empty path")
    if "\0" in text:
        raise InvalidUri(f"{what}: NUL byte in path")
    if text.startswith("/"):
        raise InvalidUri(f"{what}: absolute path where a relative one is needed")
    parts = text.split("/")
    if ".." in parts:
        raise InvalidUri(f"{what}: '..' in path")
    if "." in parts or "" in parts:
        raise InvalidUri(f"{what}: empty or '.' segment in path")
    return PurePosixPath(text)


def _parse_s3(text: str) -> S3Uri:
    bucket, _, key = text[len("s3://") :].partition("/")
    if not bucket or any(c.isspace() for c in bucket):
        raise InvalidUri(f"{text}: no bucket name (expected s3://bucket/key)")
    if key:
        # A prefix keeps its trailing "/": check the segments before it.
        safe_relative_path(key.removesuffix("/"), text)
    return S3Uri(bucket, key)


def _parse_http(text: str) -> HttpUri:
    parts = urlsplit(text)
    shown = redacted(text)
    if not parts.hostname:
        raise InvalidUri(f"{shown}: no host")
    path = unquote(parts.path)
    if ".." in path.split("/"):
        raise InvalidUri(f"{shown}: '..' in path")
    if not PurePosixPath(path).name or path.endswith("/"):
        raise InvalidUri(f"{shown}: the URL names no file (a folder cannot be listed over HTTP)")
    return HttpUri(text)


def _parse_file(text: str) -> LocalUri:
    rest = text[len("file://") :]
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost") or not slash:
        raise InvalidUri(f"{text}: expected file:///absolute/path")
    path = "/" + path
    if ".." in path.split("/"):
        raise InvalidUri(f"{text}: '..' in path")
    return LocalUri(Path(path))


def _parse_path(text: str, base: Path) -> LocalUri:
    if os.path.isabs(text):
        if ".." in text.split("/"):
            raise InvalidUri(f"{text}: '..' in path")
        return LocalUri(Path(text))
    # "a/../b" stays inside the base and is fine; "../b" or "a/../../b" is not.
    normal = os.path.normpath(text)
    if normal == ".." or normal.startswith("../"):
        raise InvalidUri(f"{text}: '..' leaves {base}")
    return LocalUri(base / normal)


def parse_uri(text: str, base: Path | None = None) -> StorageUri:
    """Parse a storage URI; a relative path is taken relative to `base` (default: the current
    folder). Raises `InvalidUri` with one line naming the URI and what is wrong with it."""
    text = text.strip()
    if not text:
        raise InvalidUri(f"empty storage URI (expected {_SCHEMES})")
    scheme, sep, _ = text.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme == "s3":
        return _parse_s3(text)
    if scheme in ("http", "https"):
        return _parse_http(text)
    if scheme == "file":
        return _parse_file(text)
    if scheme:
        raise InvalidUri(f"{text}: scheme '{scheme}' is not supported (use {_SCHEMES})")
    return _parse_path(text, Path.cwd() if base is None else base)
