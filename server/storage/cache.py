"""The node cache: one copy of each object version per machine, shared by every process on it.

Layout under the root (`EMBER_CACHE_DIR`, default `~/.cache/ember`):

    objects/<object id>/<version id>.data     the bytes
    objects/<object id>/<version id>.json     sidecar: endpoint, bucket, key, ETag, size
    objects/<object id>/<version id>.lock     flock'd by the one process filling the entry
    objects/<object id>/<version id>.partial.<pid>  the download in progress

The object id hashes (endpoint, bucket, key), the version id (ETag, size). An entry is used only
when its sidecar matches the key and the data file has the sidecar's size; the data file is
renamed into place after an fsync and the sidecar is written (the same way) after it, so a crash
at any point leaves either a whole entry or one that is ignored and refilled. Finding an entry
makes no request for data: the caller learns the current ETag with a HEAD (or a LIST) and a
different ETag is a different entry. Publishing a version removes the older versions of the same
object (a process still reading an old file keeps its open inode).

Processes starting together take the entry's lock in turn: the first downloads, the others wait
and then find the entry filled. The lock file is removed by whoever holds it when done, so a
locker checks, after locking, that the file it locked is still the one at the path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from ember.server.storage.errors import CacheError
from ember.server.storage.sinks import FileSink
from ember.server.storage.uri import redacted

log = logging.getLogger("ember.storage")

DEFAULT_CACHE_DIR = "~/.cache/ember"


def cache_dir_from_env(env: Mapping[str, str]) -> Path:
    return Path(env.get("EMBER_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


@dataclass(frozen=True, slots=True)
class CacheKey:
    """One version of one object. For an HTTP file: the URL as endpoint, no bucket or key."""

    endpoint: str
    bucket: str
    key: str
    etag: str
    size: int

    @property
    def object_id(self) -> str:
        return _digest(self.endpoint, self.bucket, self.key)[:32]

    @property
    def version_id(self) -> str:
        return _digest(self.etag, str(self.size))[:16]

    def __str__(self) -> str:
        if not self.bucket:
            return redacted(self.endpoint)
        return f"s3://{self.bucket}/{self.key} at {self.endpoint}"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CacheEntry:
    key: CacheKey
    path: Path
    # When it was last found or filled (the sidecar's mtime).
    last_used: float


Fill = Callable[[FileSink], None]


def write_file_atomically(target: Path, size: int, fill: Fill) -> None:
    """Create `target` holding `size` bytes that `fill` writes, or leave no trace: the bytes go
    to a temporary file beside it, which is fsync'd and renamed over `target`."""
    temp = target.with_name(f".{target.name}.partial.{os.getpid()}")
    try:
        with FileSink.create(temp, size) as sink:
            fill(sink)
            sink.sync()
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    _sync_dir(target.parent)


def _sync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk.
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(path: Path, waiting: Callable[[], None], blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (created if missing). Yields False instead of waiting
    when `blocking` is off and another process holds it."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            # Another process removed the (then empty) folder between our mkdir and open.
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    yield False
                    return
                waiting()
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield True
                return
            # The holder removed the lock file before we locked it: lock the new one.
        finally:
            os.close(fd)


class NodeCache:
    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self._clock = clock

    def _paths(self, key: CacheKey) -> tuple[Path, Path, Path]:
        folder = self.root / "objects" / key.object_id
        stem = key.version_id
        return folder / f"{stem}.data", folder / f"{stem}.json", folder / f"{stem}.lock"

    def lookup(self, key: CacheKey) -> Path | None:
        """The data file of a complete entry for `key`, or None."""
        data, meta, _ = self._paths(key)
        if not _valid(key, data, meta):
            return None
        # Last use is the sidecar's mtime (for `prune --older-than`); a read-only cache still
        # serves hits.
        with contextlib.suppress(OSError):
            os.utime(meta)
        return data

    def fetch(self, key: CacheKey, fill: Fill, *, reuse: bool = True) -> tuple[Path, bool]:
        """The entry's data file, filled by `fill` unless it is already complete (then the
        second value is True). `reuse=False` refills it even so (a file with no validator)."""
        if reuse and (found := self.lookup(key)) is not None:
            return found, True
        data, _, lock = self._paths(key)
        try:
            data.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot use cache folder {self.root}: {exc.strerror}") from None

        def waiting() -> None:
            log.info("waiting for another process downloading %s", key)

        try:
            with _locked(lock, waiting):
                try:
                    if reuse and (found := self.lookup(key)) is not None:
                        return found, True
                    self._fill(key, fill)
                finally:
                    # Removed while still held (the close releases it), so a failed fill leaves
                    # no file behind; lockers check they locked the file still at the path.
                    lock.unlink(missing_ok=True)
        finally:
            _remove_empty(data.parent)
        self._drop_older_versions(key)
        return data, False

    def _fill(self, key: CacheKey, fill: Fill) -> None:
        data, meta, _ = self._paths(key)
        # Whatever is here came from a process that died mid-download (under the lock nobody
        # else writes this entry): it is never used.
        for stale in (meta, data, *data.parent.glob(f".{key.version_id}.*.partial.*")):
            stale.unlink(missing_ok=True)
        write_file_atomically(data, key.size, fill)
        sidecar = memoryview(json.dumps({**asdict(key), "created": self._clock()}).encode())
        try:
            write_file_atomically(meta, len(sidecar), lambda sink: sink.write_at(0, sidecar))
        except BaseException:
            # Without its sidecar the data is never used: give its space back (a disk that had
            # room for the bytes but not for the sidecar would otherwise stay full).
            data.unlink(missing_ok=True)
            raise

    def _drop_older_versions(self, key: CacheKey) -> None:
        data, _, _ = self._paths(key)
        for meta in data.parent.glob("*.json"):
            if meta.stem != key.version_id:
                self._remove(meta.with_suffix(""), blocking=False)

    def entries(self) -> list[CacheEntry]:
        """Every complete entry, most recently used first."""
        found = []
        for meta in (self.root / "objects").glob("*/*.json"):
            entry = _read_entry(meta)
            if entry is not None:
                found.append(entry)
        return sorted(found, key=lambda e: e.last_used, reverse=True)

    def prune(self, older_than: float | None) -> tuple[int, int]:
        """Remove entries unused for `older_than` seconds (every entry when None), and leftovers
        of dead downloads. Entries being filled right now are left alone. Returns (entries
        removed, bytes freed)."""
        now = self._clock()
        removed = freed = 0
        for folder in list((self.root / "objects").glob("*")):
            stems = {p.name.lstrip(".").split(".")[0] for p in folder.iterdir()}
            for stem in stems:
                base = folder / stem
                entry = _read_entry(base.with_suffix(".json"))
                # Leftovers of dead downloads (no entry) go whatever their age.
                expired = entry is None or older_than is None or now - entry.last_used >= older_than
                if not expired:
                    continue
                size = self._remove(base, blocking=False)
                if size is not None and entry is not None:
                    removed += 1
                    freed += size
            _remove_empty(folder)
        return removed, freed

    def shrink(self, max_bytes: int) -> tuple[int, int]:
        """Remove the least recently used entries until the complete ones add up to at most
        `max_bytes`; entries being read or filled by another process right now are skipped
        (the total may then stay above). Returns (entries removed, bytes freed)."""
        entries = self.entries()  # most recently used first
        total = sum(e.key.size for e in entries)
        removed = freed = 0
        for entry in reversed(entries):
            if total <= max_bytes:
                break
            size = self._remove(entry.path.with_suffix(""), blocking=False)
            if size is not None:
                removed += 1
                freed += size
                total -= entry.key.size
                _remove_empty(entry.path.parent)
        return removed, freed

    def _remove(self, base: Path, *, blocking: bool) -> int | None:
        """Remove one version's files unless a process is filling it; the bytes freed."""
        lock = base.with_suffix(".lock")
        with _locked(lock, lambda: None, blocking=blocking) as held:
            if not held:
                return None
            try:
                data = base.with_suffix(".data")
                size = data.stat().st_size if data.exists() else 0
                # Sidecar first: from then on the entry is not valid, whatever else remains.
                for path in (
                    base.with_suffix(".json"),
                    data,
                    *base.parent.glob(f".{base.name}.*.partial.*"),
                ):
                    path.unlink(missing_ok=True)
            finally:
                lock.unlink(missing_ok=True)
        return size


def _valid(key: CacheKey, data: Path, meta: Path) -> bool:
    try:
        recorded = json.loads(meta.read_bytes())
        size = data.stat().st_size
    except (OSError, ValueError):
        return False
    return (
        isinstance(recorded, dict)
        and all(recorded.get(name) == value for name, value in asdict(key).items())
        and size == key.size
    )


def _read_entry(meta: Path) -> CacheEntry | None:
    try:
        recorded = json.loads(meta.read_bytes())
        key = CacheKey(
            str(recorded["endpoint"]),
            str(recorded["bucket"]),
            str(recorded["key"]),
            str(recorded["etag"]),
            int(recorded["size"]),
        )
        last_used = meta.stat().st_mtime
    except (OSError, ValueError, KeyError, TypeError):
        return None
    data = meta.with_suffix(".data")
    if not _valid(key, data, meta):
        return None
    return CacheEntry(key, data, last_used)


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise
