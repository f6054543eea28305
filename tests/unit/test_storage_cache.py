"""The node cache on a real folder, filled by plain functions (the e2e tests fill it over S3)."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest

from ember.server.storage.cache import CacheKey, NodeCache, cache_dir_from_env
from ember.server.storage.errors import DownloadFailed
from ember.server.storage.sinks import FileSink


def _key(etag: str = "e1", size: int = 5, key: str = "m/w.bin") -> CacheKey:
    return CacheKey("http://s3:9000", "bucket", key, etag, size)


def _filler(data: bytes, calls: list[bytes]):  # type: ignore[no-untyped-def]
    def fill(sink: FileSink) -> None:
        calls.append(data)
        sink.write_at(0, memoryview(data))

    return fill


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_cache_dir_from_env() -> None:
    assert cache_dir_from_env({"EMBER_CACHE_DIR": "/c"}) == Path("/c")
    assert cache_dir_from_env({}) == Path("~/.cache/ember").expanduser()


def test_fill_once_then_hit(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    calls: list[bytes] = []
    path, hit = cache.fetch(_key(), _filler(b"hello", calls))
    assert not hit and path.read_bytes() == b"hello"
    again, hit = cache.fetch(_key(), _filler(b"XXXXX", calls))
    assert hit and again == path and again.read_bytes() == b"hello"
    assert calls == [b"hello"]
    # Data and sidecar only: no lock or temporary file left behind.
    assert [Path(f).suffix for f in _files(tmp_path)] == [".data", ".json"]
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert (sidecar["etag"], sidecar["size"], sidecar["key"]) == ("e1", 5, "m/w.bin")


def test_a_failed_fill_leaves_nothing(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)

    def fail(sink: FileSink) -> None:
        sink.write_at(0, memoryview(b"he"))
        raise DownloadFailed("boom")

    with pytest.raises(DownloadFailed):
        cache.fetch(_key(), fail)
    assert _files(tmp_path) == []
    assert cache.lookup(_key()) is None


@pytest.mark.parametrize("damage", ["truncate", "no sidecar", "bad sidecar", "other etag"])
def test_a_damaged_entry_is_never_used(tmp_path: Path, damage: str) -> None:
    cache = NodeCache(tmp_path)
    path, _ = cache.fetch(_key(), _filler(b"hello", []))
    meta = path.with_suffix(".json")
    if damage == "truncate":
        os.truncate(path, 3)
    elif damage == "no sidecar":
        meta.unlink()
    elif damage == "bad sidecar":
        meta.write_text("{not json")
    else:
        meta.write_text(meta.read_text().replace('"e1"', '"e0"'))
    assert cache.lookup(_key()) is None
    calls: list[bytes] = []
    again, hit = cache.fetch(_key(), _filler(b"world", calls))
    assert not hit and calls == [b"world"] and again.read_bytes() == b"world"


def test_leftovers_of_a_dead_download_are_replaced(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    path, _ = cache.fetch(_key(), _filler(b"hello", []))
    path.with_suffix(".json").unlink()
    partial = path.with_name(f".{path.name}.partial.99999")
    partial.write_bytes(b"hel")
    cache.fetch(_key(), _filler(b"world", []))
    assert not partial.exists()


def test_a_new_etag_is_a_new_entry_and_drops_the_old(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    old, _ = cache.fetch(_key("e1"), _filler(b"hello", []))
    new, hit = cache.fetch(_key("e2", 6), _filler(b"hello!", []))
    assert not hit and new != old and new.read_bytes() == b"hello!"
    assert not old.exists()
    assert [e.key.etag for e in cache.entries()] == ["e2"]


def test_entries_and_prune(tmp_path: Path) -> None:
    now = [1_000_000.0]
    cache = NodeCache(tmp_path, clock=lambda: now[0])
    a, _ = cache.fetch(_key(key="a"), _filler(b"aaaaa", []))
    b, _ = cache.fetch(_key(key="b"), _filler(b"bbbbb", []))
    os.utime(a.with_suffix(".json"), (now[0] - 7200, now[0] - 7200))
    os.utime(b.with_suffix(".json"), (now[0] - 60, now[0] - 60))
    assert [e.key.key for e in cache.entries()] == ["b", "a"]
    assert cache.prune(older_than=3600) == (1, 5)
    assert [e.key.key for e in cache.entries()] == ["b"]
    assert cache.prune(older_than=None) == (1, 5)
    assert _files(tmp_path) == []
    assert list((tmp_path / "objects").iterdir()) == []


def test_prune_removes_leftovers(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    path, _ = cache.fetch(_key(), _filler(b"hello", []))
    path.with_suffix(".json").unlink()
    assert cache.prune(older_than=10**9) == (0, 0)
    assert _files(tmp_path) == []


def test_a_hit_counts_as_a_use(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    path, _ = cache.fetch(_key(), _filler(b"hello", []))
    os.utime(path.with_suffix(".json"), (1.0, 1.0))
    cache.fetch(_key(), _filler(b"hello", []))
    assert cache.entries()[0].last_used > 1.0


def test_shrink_drops_the_least_recently_used_until_the_cache_fits(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    paths = {}
    for age, name in ((300, "old"), (200, "mid"), (100, "new")):
        data = (name * 10).encode()[:30]
        paths[name], _ = cache.fetch(_key(key=name, size=30), _filler(data, []))
        stamp = time.time() - age
        os.utime(paths[name].with_suffix(".json"), (stamp, stamp))
    sizes = {e.key.key: e.key.size for e in cache.entries()}
    assert sizes == {"old": 30, "mid": 30, "new": 30}
    assert cache.shrink(90) == (0, 0)  # fits already
    assert cache.shrink(60) == (1, 30)
    assert [e.key.key for e in cache.entries()] == ["new", "mid"]
    assert cache.shrink(1) == (2, 60)
    assert cache.entries() == []
    assert list((tmp_path / "objects").iterdir()) == []


def test_shrink_skips_an_entry_another_process_is_filling(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path)
    held, _ = cache.fetch(_key(key="held", size=40), _filler(b"h" * 40, []))
    cache.fetch(_key(key="other", size=40), _filler(b"o" * 40, []))
    stamp = time.time() - 1000
    os.utime(held.with_suffix(".json"), (stamp, stamp))  # the oldest: first to go
    lock = held.with_suffix(".lock")
    with lock.open("w") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert cache.shrink(40) == (1, 40)  # "other" goes instead; the total is then 40
    assert [e.key.key for e in cache.entries()] == ["held"]
