"""`pull` and `ember pull` against real S3-compatible servers: bytes, cache hits, folders."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from ember.server.storage.cache import NodeCache
from ember.server.storage.download import DownloadOptions, plan_ranges
from ember.server.storage.pull import pull
from ember.server.storage.s3 import S3Store
from ember.server.storage.settings import S3Settings
from ember.server.storage.sinks import MemorySink
from ember.server.storage.uri import parse_uri

pytestmark = pytest.mark.e2e

MiB = 1 << 20
SMALL = DownloadOptions(concurrency=4, chunk_size=256 * 1024)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_pull_into_the_cache_then_hit_without_data_gets(
    rclone: Any, proxy: Any, tmp_path: Path
) -> None:
    bucket = rclone.new_bucket()
    data = os.urandom(3 * MiB + 17)
    rclone.put(bucket, "models/w.safetensors", data)
    front = proxy(rclone)
    settings = S3Settings.from_env(rclone.env(front.endpoint))
    cache = NodeCache(tmp_path / "cache")
    uri = parse_uri(f"s3://{bucket}/models/w.safetensors")

    first = pull(uri, s3=settings, options=SMALL, cache=cache)
    (pulled,) = first.files
    assert pulled.downloaded and sha(pulled.path.read_bytes()) == sha(data)
    assert len(front.gets()) == len(plan_ranges(len(data), SMALL.chunk_size))

    front.seen.clear()
    second = pull(uri, s3=settings, options=SMALL, cache=cache)
    assert second.files[0].path == pulled.path and not second.files[0].downloaded
    # A hit costs one HEAD (to learn the current ETag) and no GET.
    assert [s.method for s in front.seen] == ["HEAD"]


def test_a_replaced_object_is_fetched_again(rclone: Any, tmp_path: Path) -> None:
    bucket = rclone.new_bucket()
    rclone.put(bucket, "w.bin", b"version one " * 50_000)
    cache = NodeCache(tmp_path / "cache")
    uri = parse_uri(f"s3://{bucket}/w.bin")
    settings = rclone.settings()
    old = pull(uri, s3=settings, options=SMALL, cache=cache).files[0].path
    new_data = b"version two!" * 60_000
    rclone.put(bucket, "w.bin", new_data)

    result = pull(uri, s3=settings, options=SMALL, cache=cache)
    assert result.files[0].downloaded
    assert result.files[0].path.read_bytes() == new_data
    # The superseded version is gone; one entry remains.
    assert not old.exists()
    assert [e.key.size for e in cache.entries()] == [len(new_data)]


def test_a_prefix_into_a_folder_like_the_storage_initializer(
    rclone: Any, ember_cli: Any, tmp_path: Path
) -> None:
    bucket = rclone.new_bucket()
    objects = {
        "mlp/config.json": b'{"layers": 2}',
        "mlp/weights/part-1.safetensors": os.urandom(700_000),
        "mlp/weights/part-2.safetensors": os.urandom(300_001),
        "mlp/empty.txt": b"",
        "other/not-this.bin": b"x",
    }
    for key, data in objects.items():
        rclone.put(bucket, key, data)
    dest = tmp_path / "mnt" / "models"
    env = rclone.env(EMBER_CACHE_DIR=str(tmp_path / "cache"))
    # No trailing "/": KServe takes a key with objects under it as a folder, and so do we.
    run = ember_cli(
        ["pull", f"s3://{bucket}/mlp", "--dest", str(dest), "--chunk-size", "256k"], env
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(dest)
    got = {str(p.relative_to(dest)): p.read_bytes() for p in files_under(dest)}
    assert got == {k.removeprefix("mlp/"): v for k, v in objects.items() if k.startswith("mlp/")}
    # Straight to the folder: the cache was not touched; the log is JSON lines off a terminal.
    assert not (tmp_path / "cache").exists()
    last = json.loads(run.stderr.strip().splitlines()[-1])
    assert last["level"] == "info" and "4 files" in last["message"]


def test_ember_pull_prints_the_cached_file_and_cache_commands(
    rclone: Any, ember_cli: Any, tmp_path: Path
) -> None:
    bucket = rclone.new_bucket()
    data = os.urandom(MiB)
    rclone.put(bucket, "w.bin", data)
    env = rclone.env(EMBER_CACHE_DIR=str(tmp_path / "cache"))

    run = ember_cli(["pull", f"s3://{bucket}/w.bin"], env)
    assert run.returncode == 0, run.stderr
    path = Path(run.stdout.strip())
    assert path.is_relative_to(tmp_path / "cache") and path.read_bytes() == data

    listing = ember_cli(["cache", "ls"], env)
    assert listing.returncode == 0
    assert f"s3://{bucket}/w.bin at {rclone.endpoint}" in listing.stdout
    assert "1 objects, 1.0 MiB" in listing.stdout

    kept = ember_cli(["cache", "prune", "--older-than", "1h"], env)
    assert "removed 0 objects" in kept.stdout and path.exists()
    pruned = ember_cli(["cache", "prune", "--all"], env)
    assert "removed 1 objects, freed 1.0 MiB" in pruned.stdout
    assert files_under(tmp_path / "cache") == []


def test_anonymous_access(rclone: Any, tmp_path: Path) -> None:
    bucket = rclone.new_bucket()
    rclone.put(bucket, "public.bin", b"open data")
    env = {"AWS_ENDPOINT_URL": rclone.endpoint, "awsAnonymousCredential": "true"}
    result = pull(
        parse_uri(f"s3://{bucket}/public.bin"),
        s3=S3Settings.from_env(env),
        options=SMALL,
        dest=tmp_path / "out",
    )
    assert (tmp_path / "out" / "public.bin").read_bytes() == b"open data"
    assert result.downloaded_bytes == 9


def test_multipart_etag_and_into_memory(moto: Any) -> None:
    # moto gives multipart objects real "<md5>-<parts>" ETags and honours If-Match on them.
    bucket = moto.new_bucket()
    client = moto.client()
    parts = [os.urandom(5 * MiB), os.urandom(MiB + 3)]
    upload = client.create_multipart_upload(Bucket=bucket, Key="big.bin")
    done = [
        {
            "PartNumber": n,
            "ETag": client.upload_part(
                Bucket=bucket, Key="big.bin", UploadId=upload["UploadId"], PartNumber=n, Body=part
            )["ETag"],
        }
        for n, part in enumerate(parts, start=1)
    ]
    client.complete_multipart_upload(
        Bucket=bucket, Key="big.bin", UploadId=upload["UploadId"],
        MultipartUpload={"Parts": done},
    )  # fmt: skip
    options = DownloadOptions(concurrency=4, chunk_size=MiB)
    with S3Store(moto.settings(), options) as store:
        obj = store.head(bucket, "big.bin")
        assert obj.etag.endswith("-2")
        buffer = bytearray(obj.size)
        stats = store.download(obj, MemorySink(buffer))
    assert sha(bytes(buffer)) == sha(b"".join(parts))
    assert (stats.ranges, stats.retries) == (7, 0)


def test_https_style_file_with_ranges_and_cache(rclone_http: Any, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + 5)
    (rclone_http.root / "w.bin").write_bytes(data)
    cache = NodeCache(tmp_path / "cache")
    uri = parse_uri(f"{rclone_http.url}/w.bin")
    settings = S3Settings.from_env({})
    first = pull(uri, s3=settings, options=SMALL, cache=cache)
    assert first.files[0].downloaded and first.files[0].path.read_bytes() == data
    # rclone's http server sends Last-Modified (no ETag): the date keys the cache.
    second = pull(uri, s3=settings, options=SMALL, cache=cache)
    assert not second.files[0].downloaded


def test_local_paths(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.bin").write_bytes(b"a")
    (source / "sub" / "b.bin").write_bytes(b"bb")
    settings = S3Settings.from_env({})
    here = pull(parse_uri(f"file://{source}"), s3=settings, options=SMALL, dest=None,
                cache=NodeCache(tmp_path / "cache"))  # fmt: skip
    assert [str(f.relative) for f in here.files] == ["a.bin", "sub/b.bin"]
    assert not any(f.downloaded for f in here.files)
    copied = pull(parse_uri("src", tmp_path), s3=settings, options=SMALL, dest=tmp_path / "out")
    assert (tmp_path / "out" / "sub" / "b.bin").read_bytes() == b"bb"
    assert copied.downloaded_bytes == 3
