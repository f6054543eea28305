"""Fault drills for the node cache (connections dropped mid-download, a full disk), and a
link planted where a pulled file goes.

`test_faults.py` shows ranges survive cuts into a plain file and `test_errors.py` that each
refusal leaves the cache empty; these drills follow the bytes into the node cache: what is
there afterwards is a whole, valid entry or nothing, and the next run succeeds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.server.storage import sinks
from ember.server.storage.cache import NodeCache
from ember.server.storage.download import DownloadOptions
from ember.server.storage.errors import CacheError, DownloadFailed
from ember.server.storage.pull import pull
from ember.server.storage.uri import parse_uri

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cache_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def the_error(run: Any) -> str:
    """The one error line `ember pull` wrote, checking it is alone and not a traceback."""
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    record = json.loads(lines[0])
    assert record["level"] == "error"
    return str(record["message"])


def test_dropped_connections_mid_download_leave_a_whole_entry(
    rclone: Any, proxy: Any, tmp_path: Path
) -> None:
    """What the user sees: connections cut or reset mid-body cost a retry of that range only;
    the pull succeeds and the cache holds exactly one entry whose bytes are the object's."""
    bucket = rclone.new_bucket()
    data = os.urandom(3 * MiB + 77)
    rclone.put(bucket, "w.bin", data)
    chunk = 256 * 1024
    first_tries: set[int] = set()
    lock = threading.Lock()

    def decide(seen: Any) -> str | None:
        # The first request for each range is broken off, alternately cut and reset.
        if seen.method != "GET" or seen.range_end is None:
            return None
        with lock:
            if seen.range_end in first_tries:
                return None
            first_tries.add(seen.range_end)
            return "cut" if len(first_tries) % 2 else "reset"

    front = proxy(rclone, decide=decide)
    cache = NodeCache(tmp_path / "cache")
    options = DownloadOptions(concurrency=4, chunk_size=chunk)
    result = pull(
        parse_uri(f"s3://{bucket}/w.bin"),
        s3=rclone.settings(front.endpoint),
        options=options,
        cache=cache,
        sleep=lambda s: None,
    )
    [pulled] = result.files
    assert pulled.downloaded and sha(pulled.path.read_bytes()) == sha(data)
    assert len(front.gets()) == 2 * len(first_tries) == 2 * 13  # each range: one break, one retry
    [entry] = cache.entries()
    assert entry.path == pulled.path and entry.key.size == len(data)
    assert [Path(f).suffix for f in cache_files(tmp_path / "cache")] == [".data", ".json"]


def test_a_range_that_never_arrives_leaves_no_trace_and_the_next_pull_succeeds(
    rclone: Any, proxy: Any, tmp_path: Path
) -> None:
    """What the user sees: a range whose connection drops on every attempt fails the pull with
    one line naming the object and the attempts; the cache keeps no partial file, lock or
    entry, and the next pull (the network healthy again) fills it from scratch."""
    bucket = rclone.new_bucket()
    data = os.urandom(2 * MiB)
    rclone.put(bucket, "w.bin", data)
    chunk = 512 * 1024
    broken = threading.Event()
    broken.set()

    def decide(seen: Any) -> str | None:
        ends_third = seen.range_end == 3 * chunk - 1
        return "reset" if broken.is_set() and seen.method == "GET" and ends_third else None

    front = proxy(rclone, decide=decide)
    cache = NodeCache(tmp_path / "cache")
    uri = parse_uri(f"s3://{bucket}/w.bin")
    options = DownloadOptions(concurrency=2, chunk_size=chunk)
    settings = rclone.settings(front.endpoint)
    with pytest.raises(DownloadFailed) as caught:
        pull(uri, s3=settings, options=options, cache=cache, sleep=lambda s: None)
    message = str(caught.value)
    assert f"s3://{bucket}/w.bin" in message and "3 attempts" in message and "\n" not in message
    assert cache_files(tmp_path / "cache") == [] and cache.entries() == []
    broken.clear()
    result = pull(uri, s3=settings, options=options, cache=cache, sleep=lambda s: None)
    assert sha(result.files[0].path.read_bytes()) == sha(data)
    assert len(cache.entries()) == 1


# --- a full disk -------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs to put the cache on (root and mount(8) needed; skipped otherwise)."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_a_full_cache_disk_is_one_clear_line_and_leaves_no_entry(
    rclone: Any, ember_cli: Any, small_disk: Path, tmp_path: Path
) -> None:
    """What the user sees: `ember pull` of an object larger than the free space exits 1 with
    one line saying there is no space where, for how many bytes; the cache keeps no partial
    file, lock or entry. Once there is room (the disk grown), the same pull succeeds."""
    bucket = rclone.new_bucket()
    data = os.urandom(6 * MiB)
    rclone.put(bucket, "w.bin", data)
    cache = small_disk / "cache"
    env = rclone.env(EMBER_CACHE_DIR=str(cache))
    args = ["pull", f"s3://{bucket}/w.bin", "--chunk-size", "1M"]
    message = the_error(ember_cli(args, env))
    assert message.startswith("no space left in ") and f"for {len(data)} bytes" in message
    assert str(cache) in message
    assert cache_files(cache) == []
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    run = ember_cli(args, env)
    assert run.returncode == 0, run.stderr
    assert sha(Path(run.stdout.strip()).read_bytes()) == sha(data)
    assert [Path(f).suffix for f in cache_files(cache)] == [".data", ".json"]


def test_a_disk_full_by_one_sidecar_leaves_no_orphaned_data(rclone: Any, small_disk: Path) -> None:
    """What the user sees: when the bytes fit but their sidecar does not (the object takes the
    disk's last page), the pull fails with the same one line and gives the space back: no data
    file without a sidecar is left to take the room of the next attempt."""
    bucket = rclone.new_bucket()
    data = os.urandom(4 * MiB)  # all of the 4 MiB tmpfs
    rclone.put(bucket, "w.bin", data)
    cache = NodeCache(small_disk / "cache")
    with pytest.raises(CacheError, match="no space left in "):
        pull(
            parse_uri(f"s3://{bucket}/w.bin"),
            s3=rclone.settings(),
            options=DownloadOptions(concurrency=2, chunk_size=MiB),
            cache=cache,
        )
    assert cache_files(small_disk / "cache") == [] and cache.entries() == []


def test_a_write_refused_for_space_is_final_not_retried(
    rclone: Any, proxy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the user sees on a filesystem that cannot reserve space up front (no fallocate,
    so the disk fills while bytes are written): a CacheError naming the folder, at once,
    not a download error after three attempts that blames the network; no partial file."""
    bucket = rclone.new_bucket()
    data = os.urandom(2 * MiB)
    rclone.put(bucket, "w.bin", data)
    real_pwrite = os.pwrite
    written = [0]
    lock = threading.Lock()

    def no_fallocate(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    def filling_pwrite(fd: int, data: Any, offset: int) -> int:
        with lock:
            if written[0] >= MiB:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            written[0] += len(data)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(sinks.os, "posix_fallocate", no_fallocate)
    monkeypatch.setattr(sinks.os, "pwrite", filling_pwrite)
    front = proxy(rclone)
    cache = NodeCache(tmp_path / "cache")
    with pytest.raises(CacheError) as caught:
        pull(
            parse_uri(f"s3://{bucket}/w.bin"),
            s3=rclone.settings(front.endpoint),
            options=DownloadOptions(concurrency=2, chunk_size=256 * 1024),
            cache=cache,
            sleep=lambda s: None,
        )
    assert "no space left" in str(caught.value) and str(tmp_path / "cache") in str(caught.value)
    # Final at once: no range was asked for twice.
    ranges = [g.range for g in front.gets()]
    assert len(ranges) == len(set(ranges))
    assert cache_files(tmp_path / "cache") == []


# --- links planted where files go ----------------------------------------------------------------


def test_a_link_planted_in_the_destination_is_replaced_not_followed(
    rclone: Any, ember_cli: Any, tmp_path: Path
) -> None:
    """What the user sees: `ember pull --dest` into a folder where a file's path is a symlink
    to a file elsewhere (planted by whoever could write there) puts the pulled file in the
    link's place; the file the link pointed to is untouched."""
    bucket = rclone.new_bucket()
    data = os.urandom(64 * 1024)
    rclone.put(bucket, "p/sub/w.bin", data)
    dest = tmp_path / "dest"
    (dest / "sub").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (dest / "sub" / "w.bin").symlink_to(victim)
    run = ember_cli(["pull", f"s3://{bucket}/p/", "--dest", str(dest)], rclone.env())
    assert run.returncode == 0, run.stderr
    assert victim.read_bytes() == b"precious"
    assert not (dest / "sub" / "w.bin").is_symlink()
    assert (dest / "sub" / "w.bin").read_bytes() == data
