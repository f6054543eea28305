"""`pull`: the objects a URI names, into the node cache or into a folder.

Into the cache (no `dest`), each object becomes a cache entry and the result says where its file
is; into a folder (`ember pull URI --dest /mnt/models`, the storage initializer's job), each
object is written to its path relative to the URI, atomically. Several files are fetched at once,
but the number of ranged GETs in flight is the download concurrency, whatever the file count.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TextIO

from ember.server.storage.cache import CacheKey, NodeCache, write_file_atomically
from ember.server.storage.download import ByteRange, DownloadOptions
from ember.server.storage.errors import NoSuchKey, StorageError
from ember.server.storage.progress import Progress, Reporter
from ember.server.storage.settings import S3Settings
from ember.server.storage.sinks import FileSink, Placement, Sink, TeeSink
from ember.server.storage.uri import HttpUri, LocalUri, S3Uri, StorageUri

# Files handled at once; their ranges share the one download pool. More than one keeps the pool
# busy across the small files (configs, tokenizers) beside the large ones.
FILES_AT_ONCE = 4
COPY_BLOCK = 8 * 1024 * 1024

# Reads one range of an object into memory (with the download's retries).
ReadRange = Callable[[ByteRange], bytearray]
# Asked, for each object about to be downloaded (a cache miss), where else its bytes should go
# as they arrive: given the object's relative path, size, a way to read a range of it first (a
# header) and the file being filled; None for nowhere.
PlaceFactory = Callable[[PurePosixPath, int, ReadRange, FileSink], Placement | None]


@dataclass(frozen=True, slots=True)
class PulledFile:
    # Where it sits relative to the URI (the file name for a one-object URI).
    relative: PurePosixPath
    path: Path
    size: int
    # False: found in the cache (or already local), no bytes fetched.
    downloaded: bool
    # Filled as the bytes arrived (a `PlaceFactory` said where); None on a cache hit.
    placement: Placement | None = None


@dataclass(frozen=True, slots=True)
class PullResult:
    files: tuple[PulledFile, ...]
    seconds: float

    @property
    def downloaded_bytes(self) -> int:
        return sum(f.size for f in self.files if f.downloaded)


@dataclass(frozen=True, slots=True)
class _Job:
    relative: PurePosixPath
    size: int
    # The cache key; None when going straight to a folder.
    key: CacheKey | None
    # Fills a sink with the object's bytes, counting them into the progress.
    fill: Callable[[Sink, Progress], object]
    reuse: bool = True
    # One range into memory; None when the server cannot serve ranges.
    read: ReadRange | None = None


def pull(
    uri: StorageUri,
    *,
    s3: S3Settings,
    options: DownloadOptions,
    cache: NodeCache | None = None,
    dest: Path | None = None,
    stream: TextIO | None = None,
    sleep: Callable[[float], None] | None = None,
    place: PlaceFactory | None = None,
) -> PullResult:
    """Fetch what `uri` names into `dest` (a folder) or, without one, into `cache`.

    `stream`: where progress is shown (a bar when it is a terminal, log lines otherwise);
    `sleep`: the backoff wait, for tests; `place`: where else a downloaded object's bytes go
    (cache misses of remote objects only). Raises `StorageError` with one line.
    """
    if dest is None and cache is None:
        raise ValueError("pull needs a cache or a destination folder")
    started = time.monotonic()
    if isinstance(uri, LocalUri):
        files = _local(uri, dest)
    elif isinstance(uri, S3Uri):
        files = _s3(uri, s3, options, cache, dest, stream, sleep, place)
    else:
        files = _http(uri, s3, options, cache, dest, stream, sleep, place)
    return PullResult(tuple(files), time.monotonic() - started)


def _s3(
    uri: S3Uri,
    settings: S3Settings,
    options: DownloadOptions,
    cache: NodeCache | None,
    dest: Path | None,
    stream: TextIO | None,
    sleep: Callable[[float], None] | None,
    place: PlaceFactory | None,
) -> list[PulledFile]:
    from ember.server.storage.s3 import S3Object, S3Store

    with S3Store(settings, options, sleep=sleep) as store:

        def job(relative: PurePosixPath, obj: S3Object) -> _Job:
            key = CacheKey(obj.endpoint, obj.bucket, obj.key, obj.etag, obj.size)
            return _Job(
                relative,
                obj.size,
                key,
                lambda sink, p: store.download(obj, sink, p.add),
                read=functools.partial(store.read, obj),
            )

        jobs = [job(relative, obj) for relative, obj in store.resolve(uri)]
        return _run(jobs, cache, dest, stream, store.cancel, place)


def _http(
    uri: HttpUri,
    settings: S3Settings,
    options: DownloadOptions,
    cache: NodeCache | None,
    dest: Path | None,
    stream: TextIO | None,
    sleep: Callable[[float], None] | None,
    place: PlaceFactory | None,
) -> list[PulledFile]:
    from ember.server.storage.http import HttpStore

    with HttpStore(options, timeout=settings.read_timeout, sleep=sleep) as store:
        obj = store.probe(uri.url)
        # Keyed by the URL asked for, not the one redirected to (often a short-lived signed URL).
        key = CacheKey(uri.url, "", "", obj.version or "", obj.size)
        # Without an ETag or a date nothing says the cached copy is current: fetch it again.
        jobs = [
            _Job(
                PurePosixPath(uri.name),
                obj.size,
                key,
                lambda sink, p: store.download(obj, sink, p.add),
                reuse=obj.version is not None,
                read=functools.partial(store.read, obj) if obj.ranged else None,
            )
        ]
        return _run(jobs, cache, dest, stream, store.cancel, place)


def _run(
    jobs: list[_Job],
    cache: NodeCache | None,
    dest: Path | None,
    stream: TextIO | None,
    cancel: Callable[[], None],
    place: PlaceFactory | None = None,
) -> list[PulledFile]:
    progress = Progress(sum(job.size for job in jobs))

    def one(job: _Job) -> PulledFile:
        placed: list[Placement] = []

        def fill(sink: FileSink) -> None:
            placement = None
            if place is not None and job.read is not None:
                placement = place(job.relative, job.size, job.read, sink)
            if placement is None:
                job.fill(sink, progress)
                return
            try:
                job.fill(TeeSink(sink, placement), progress)
                placement.finish()
            except BaseException:
                placement.abort()
                raise
            placed.append(placement)

        if dest is not None:
            target = dest.joinpath(*job.relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_file_atomically(target, job.size, fill)
            return PulledFile(job.relative, target, job.size, True)
        if cache is None or job.key is None:
            raise ValueError("pull needs a cache or a destination folder")
        path, hit = cache.fetch(job.key, fill, reuse=job.reuse)
        if hit:
            progress.add(job.size)
        return PulledFile(job.relative, path, job.size, not hit, placed[0] if placed else None)

    with (
        _reporting(progress, stream),
        ThreadPoolExecutor(
            min(FILES_AT_ONCE, max(1, len(jobs))), thread_name_prefix="ember-file"
        ) as pool,
    ):
        futures = [pool.submit(one, job) for job in jobs]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:
            # Ctrl-C: without this the pool would wait for every file's last byte.
            cancel()
            raise
        errors = [e for f in futures if f.done() and (e := f.exception()) is not None]
        if errors:
            # One file failed for good: stop the others now, not after their last byte.
            cancel()
            for future in futures:
                future.cancel()
    if errors:
        raise errors[0]
    return [f.result() for f in futures]


@contextlib.contextmanager
def _reporting(progress: Progress, stream: TextIO | None) -> Iterator[None]:
    if stream is None:
        yield
        return
    with Reporter(progress, stream):
        yield


def _local(uri: LocalUri, dest: Path | None) -> list[PulledFile]:
    root = uri.path
    if root.is_file():
        found = [(PurePosixPath(root.name), root)]
    elif root.is_dir():
        found = [
            (PurePosixPath(path.relative_to(root).as_posix()), path)
            for path in sorted(root.rglob("*"))
            if path.is_file()
        ]
    else:
        raise NoSuchKey(f"{root}: no such file or folder")
    files = []
    for relative, path in found:
        size = path.stat().st_size
        if dest is None:
            files.append(PulledFile(relative, path, size, False))
            continue
        target = dest.joinpath(*relative.parts)
        if target.resolve() == path.resolve():
            raise StorageError(f"{path}: the destination is the source")
        target.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(target, size, functools.partial(_copy, path))
        files.append(PulledFile(relative, target, size, True))
    return files


def _copy(source: Path, sink: FileSink) -> None:
    with source.open("rb") as src:
        offset = 0
        while block := src.read(COPY_BLOCK):
            sink.write_at(offset, memoryview(block))
            offset += len(block)
