"""Each failure is one line naming what is wrong, `ember pull` exits 1, the cache stays clean."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ember.server.storage.cache import NodeCache
from ember.server.storage.download import DownloadOptions
from ember.server.storage.errors import (
    AccessDenied,
    EndpointUnreachable,
    InvalidUri,
    NoSuchBucket,
    NoSuchKey,
    StorageError,
)
from ember.server.storage.pull import pull
from ember.server.storage.settings import S3Settings
from ember.server.storage.uri import parse_uri

pytestmark = pytest.mark.e2e


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def the_error(run: Any) -> str:
    """The one error line `ember pull` wrote (JSON off a terminal), checking it is alone."""
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    record = json.loads(lines[0])
    assert record["level"] == "error"
    return str(record["message"])


def cache_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_no_such_bucket(rclone: Any, ember_cli: Any, cache_dir: Path) -> None:
    env = rclone.env(EMBER_CACHE_DIR=str(cache_dir))
    message = the_error(ember_cli(["pull", "s3://no-such-bucket-here/w.bin"], env))
    assert message == f"no such bucket 'no-such-bucket-here' at {rclone.endpoint}"
    assert cache_files(cache_dir) == []


def test_no_such_key(rclone: Any, ember_cli: Any, cache_dir: Path) -> None:
    bucket = rclone.new_bucket()
    env = rclone.env(EMBER_CACHE_DIR=str(cache_dir))
    message = the_error(ember_cli(["pull", f"s3://{bucket}/models/missing.bin"], env))
    assert message == f"no such key 'models/missing.bin' in bucket '{bucket}' at {rclone.endpoint}"
    empty_prefix = the_error(ember_cli(["pull", f"s3://{bucket}/nothing/"], env))
    assert empty_prefix == f"no objects under s3://{bucket}/nothing/ at {rclone.endpoint}"
    assert cache_files(cache_dir) == []


def test_wrong_credentials(rclone_auth: Any, ember_cli: Any, cache_dir: Path) -> None:
    bucket = rclone_auth.new_bucket()
    rclone_auth.put(bucket, "w.bin", b"secret weights")
    env = rclone_auth.env(
        EMBER_CACHE_DIR=str(cache_dir), AWS_SECRET_ACCESS_KEY="not-the-right-secret-at-all"
    )
    message = the_error(ember_cli(["pull", f"s3://{bucket}/w.bin"], env))
    assert message.startswith(f"access denied to s3://{bucket}/w.bin at {rclone_auth.endpoint}")
    assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message
    assert cache_files(cache_dir) == []


def test_unreachable_endpoint(ember_cli: Any, cache_dir: Path) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "AKIAEMBERTESTKEY0001",
        "AWS_SECRET_ACCESS_KEY": "x" * 30,
        "EMBER_CACHE_DIR": str(cache_dir),
    }
    message = the_error(ember_cli(["pull", "s3://bucket/w.bin"], env))
    assert message.startswith(
        f"cannot reach S3 endpoint {endpoint} for s3://bucket/w.bin after 3 attempts"
    )
    assert cache_files(cache_dir) == []


def test_dot_dot_in_the_uri(ember_cli: Any, cache_dir: Path, tmp_path: Path) -> None:
    env = {"EMBER_CACHE_DIR": str(cache_dir)}
    message = the_error(ember_cli(["pull", "s3://bucket/models/../../etc/passwd"], env))
    assert message == "s3://bucket/models/../../etc/passwd: '..' in path"
    dest = tmp_path / "dest"
    message = the_error(ember_cli(["pull", "../outside", "--dest", str(dest)], env))
    assert message.startswith("../outside: '..' leaves")
    assert cache_files(cache_dir) == [] and not dest.exists()


def test_dot_dot_in_a_key_under_the_prefix(moto: Any, ember_cli: Any, tmp_path: Path) -> None:
    # S3 keys are just strings: a bucket can hold "p/../../evil", which must not become a file
    # outside the destination.
    bucket = moto.new_bucket()
    moto.put(bucket, "p/ok.bin", b"ok")
    moto.put(bucket, "p/../../evil", b"evil")
    dest = tmp_path / "mnt" / "models"
    message = the_error(ember_cli(["pull", f"s3://{bucket}/p/", "--dest", str(dest)], moto.env()))
    assert message == f"s3://{bucket}/p/../../evil: '..' in path"
    assert cache_files(tmp_path) == []


def test_library_errors_are_typed(rclone: Any, tmp_path: Path) -> None:
    bucket = rclone.new_bucket()
    options = DownloadOptions(concurrency=2)
    cache = NodeCache(tmp_path / "cache")
    cases: list[tuple[str, S3Settings, type[StorageError]]] = [
        ("s3://absent-bucket-x/k", rclone.settings(), NoSuchBucket),
        (f"s3://{bucket}/absent", rclone.settings(), NoSuchKey),
        ("s3://b/k", S3Settings.from_env({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}",
                                           "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}),
         EndpointUnreachable),
    ]  # fmt: skip
    for text, settings, error in cases:
        with pytest.raises(error) as caught:
            pull(parse_uri(text), s3=settings, options=options, cache=cache, sleep=lambda s: None)
        assert "\n" not in str(caught.value)
    with pytest.raises(InvalidUri):
        parse_uri("s3://b/../k")
    assert not issubclass(AccessDenied, NoSuchKey)
    assert cache_files(tmp_path / "cache") == []


def test_no_credentials_at_all(rclone_auth: Any, ember_cli: Any, cache_dir: Path) -> None:
    env = {"AWS_ENDPOINT_URL": rclone_auth.endpoint, "EMBER_CACHE_DIR": str(cache_dir)}
    message = the_error(ember_cli(["pull", "s3://bucket/w.bin"], env))
    assert message.startswith(f"no AWS credentials for s3://bucket/w.bin at {rclone_auth.endpoint}")
    assert "awsAnonymousCredential=true" in message
