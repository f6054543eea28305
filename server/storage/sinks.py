"""Where downloaded bytes go: anything with `write_at(offset, data)`.

Ranges arrive in any order from several threads, so a sink places each piece at its offset and
never appends. `FileSink` writes into a preallocated file with `os.pwrite` (no shared file
position, no lock); `MemorySink` writes into a caller's buffer (pinned host memory, say) and also
lends views of it, so the downloader can `readinto` the buffer with no intermediate copy.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

from ember.server.storage.errors import CacheError


class Sink(Protocol):
    """Receives an object's bytes; `write_at` is called from many threads at once, each with a
    different, non-overlapping range."""

    def write_at(self, offset: int, data: memoryview) -> None: ...


@runtime_checkable
class BufferSink(Sink, Protocol):
    """A sink whose memory the downloader may read into directly."""

    def view(self, offset: int, length: int) -> memoryview: ...


class FileSink:
    """A file of the object's size, filled range by range with `os.pwrite`."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def create(cls, path: Path, size: int) -> FileSink:
        """Create (or truncate) `path` and reserve `size` bytes, so a full disk fails now."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _reserve(fd, size, path)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    def write_at(self, offset: int, data: memoryview) -> None:
        try:
            while data:
                written = os.pwrite(self.fd, data, offset)
                data = data[written:]
                offset += written
        except OSError as exc:
            # A local failure, final: retrying the range would blame the network for it.
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheError(f"no space left in {self.path.parent}") from None
            raise CacheError(f"cannot write {self.path}: {exc.strerror}") from None

    def sync(self) -> None:
        """Flush to disk: a file published after a crash must hold the bytes it claims to."""
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FileSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reserve(fd: int, size: int, path: Path) -> None:
    if size == 0:
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise CacheError(f"no space left in {path.parent} for {size} bytes") from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        # Filesystems without fallocate: a sparse file of the right size will do.
        os.ftruncate(fd, size)


class MemorySink:
    """A caller-provided writable buffer at least as large as the object."""

    def __init__(self, buffer: memoryview | bytearray) -> None:
        self._buffer = memoryview(buffer).cast("B")
        if self._buffer.readonly:
            raise ValueError("MemorySink needs a writable buffer")

    def view(self, offset: int, length: int) -> memoryview:
        return self._buffer[offset : offset + length]

    def write_at(self, offset: int, data: memoryview) -> None:
        self._buffer[offset : offset + len(data)] = data


class Placement(Sink, Protocol):
    """Somewhere an object's bytes go besides the cache file while it downloads (tensors on a
    device): `finish` once every byte was written, `abort` when the download failed."""

    def finish(self) -> None: ...

    def abort(self) -> None: ...


class TeeSink:
    """Every piece to the file first, then to the placement."""

    def __init__(self, file: Sink, placement: Placement) -> None:
        self.file = file
        self.placement = placement

    def write_at(self, offset: int, data: memoryview) -> None:
        self.file.write_at(offset, data)
        self.placement.write_at(offset, data)
