"""Dropped connections, 500s, throttling, a replaced object, four processes at once."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from ember.server.storage.cache import NodeCache
from ember.server.storage.download import DownloadOptions, plan_ranges
from ember.server.storage.errors import ObjectChanged
from ember.server.storage.pull import pull
from ember.server.storage.s3 import S3Store
from ember.server.storage.sinks import FileSink
from ember.server.storage.uri import parse_uri

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_ranges_survive_cuts_500s_and_slowdowns(rclone: Any, proxy: Any, tmp_path: Path) -> None:
    bucket = rclone.new_bucket()
    data = os.urandom(6 * MiB + 1234)
    rclone.put(bucket, "w.bin", data)
    chunk = 512 * 1024
    ranges = plan_ranges(len(data), chunk)
    faulted: dict[int, str] = {}
    lock = threading.Lock()

    def decide(seen: Any) -> str | None:
        # The first request for every other range fails, in turn: cut mid-body, 500, reset,
        # 503.
        # A retry asks for the same last byte, and is let through.
        end = seen.range_end
        if seen.method != "GET" or end is None:
            return None
        index = end // chunk
        with lock:
            if index % 2 or end in faulted:
                return None
            faulted[end] = ("cut", "500", "reset", "503")[(index // 2) % 4]
            return faulted[end]

    front = proxy(rclone, decide=decide)
    options = DownloadOptions(concurrency=4, chunk_size=chunk)
    with S3Store(rclone.settings(front.endpoint), options, sleep=lambda s: None) as store:
        obj = store.head(bucket, "w.bin")
        target = tmp_path / "w.bin"
        with FileSink.create(target, obj.size) as sink:
            stats = store.download(obj, sink)

    assert sha(target.read_bytes()) == sha(data)
    assert sorted(faulted.values()).count("cut") >= 2
    assert set(faulted.values()) == {"cut", "500", "reset", "503"}
    assert stats.retries == len(faulted)
    # Every faulted range was asked for again (a cut one from where it broke off), and no
    # other range was asked for twice: the file was not restarted.
    gets = front.gets()
    assert len(gets) == len(ranges) + len(faulted)
    ends = [g.range_end for g in gets]
    assert all(ends.count(end) == 2 for end in faulted)
    assert all(ends.count(r.end - 1) == 1 for r in ranges if r.end - 1 not in faulted)
    cut_retries = [g for g in gets if g.range_end in faulted and g.action is None
                   and faulted[g.range_end] == "cut"]  # fmt: skip
    assert all(int(g.range.split("=")[1].split("-")[0]) % chunk != 0 for g in cut_retries)


def test_four_processes_download_once(
    rclone: Any, proxy: Any, spawn_ember: Any, tmp_path: Path
) -> None:
    bucket = rclone.new_bucket()
    data = os.urandom(4 * MiB)
    rclone.put(bucket, "w.bin", data)
    # Each GET held 0.3 s: the download takes >= 1.2 s, so the processes overlap.
    front = proxy(rclone, delay=0.3)
    env = rclone.env(front.endpoint, EMBER_CACHE_DIR=str(tmp_path / "cache"))
    args = ["pull", f"s3://{bucket}/w.bin", "--concurrency", "2", "--chunk-size", "1M"]
    processes = [spawn_ember(args, env) for _ in range(4)]
    outputs = [p.communicate(timeout=60) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0, 0], outputs
    paths = {stdout.strip() for stdout, _ in outputs}
    assert len(paths) == 1
    assert sha(Path(paths.pop()).read_bytes()) == sha(data)
    assert len(front.gets()) == 4, [(g.method, g.range) for g in front.seen]
    assert sum(1 for s in front.seen if s.method == "HEAD") == 4
    downloaded = [json.loads(err.strip().splitlines()[-1])["message"] for _, err in outputs]
    assert sum("4.0 MiB downloaded" in m for m in downloaded) == 1, downloaded


def test_an_object_replaced_mid_download_fails_cleanly(
    moto: Any, proxy: Any, tmp_path: Path
) -> None:
    bucket = moto.new_bucket()
    moto.put(bucket, "w.bin", os.urandom(2 * MiB))
    replaced = threading.Event()

    def replace_after_the_first_range(seen: Any) -> None:
        later = seen.method == "GET" and seen.range and seen.range != "bytes=0-262143"
        if later and not replaced.is_set():
            moto.put(bucket, "w.bin", os.urandom(2 * MiB))
            replaced.set()

    front = proxy(moto, before=replace_after_the_first_range)
    cache = NodeCache(tmp_path / "cache")
    options = DownloadOptions(concurrency=1, chunk_size=256 * 1024)
    with pytest.raises(ObjectChanged) as caught:
        pull(
            parse_uri(f"s3://{bucket}/w.bin"),
            s3=moto.settings(front.endpoint),
            options=options,
            cache=cache,
            sleep=lambda s: None,
        )
    message = str(caught.value)
    assert message.startswith(f"s3://{bucket}/w.bin at {front.endpoint} changed during download")
    # moto answered the second range's If-Match with 412, which is final: nothing was retried
    # and the ranges not yet started never were.
    ranges = [g.range for g in front.gets()]
    assert len(set(ranges)) == len(ranges) < 8
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
