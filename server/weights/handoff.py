"""A download that starts before anyone can take its bytes, handed over once someone can.

`ember serve` starts pulling remote weights while the interpreter is still importing torch
(`server/prefetch.py`); only afterwards can tensors be allocated on a device. A `Handoff` is the
placement that download writes to meanwhile: it notes which extents reached the cache file, and
when the loader attaches its `TensorPlacement` the extents already written are read back from
the file (page cache, usually) and every later piece goes straight to the placement as it
arrives. Cold start is then the longer of the import and the download, not their sum, and the
bytes still reach the device through the staging ring. Torch is not imported here.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol

from ember.server.storage.sinks import FileSink, Placement
from ember.server.weights.header import Header


class Target(Placement, Protocol):
    """A placement that can also read extents of a file into place (`TensorPlacement`)."""

    def read_file(self, fd: int, extents: list[tuple[int, int]]) -> None: ...


def coalesce(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) pieces as sorted [start, end) runs, touching pieces joined."""
    runs: list[tuple[int, int]] = []
    for offset, length in sorted(extents):
        if runs and runs[-1][1] == offset:
            runs[-1] = (runs[-1][0], offset + length)
        else:
            runs.append((offset, offset + length))
    return runs


class Handoff:
    """The storage-side `Placement` of one object downloading with nobody to take it yet."""

    def __init__(self, header: Header, file: FileSink) -> None:
        self.header = header
        # Its own descriptor for reading back: the download closes and renames the file when
        # it ends, and an open descriptor outlives both.
        self._fd = os.open(file.path, os.O_RDONLY | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._written: list[tuple[int, int]] = []
        self._target: Target | None = None
        self._ended = threading.Event()
        self._failed = False

    def write_at(self, offset: int, data: memoryview) -> None:
        # The file already holds these bytes (the tee writes it first).
        with self._lock:
            target = self._target
            if target is None:
                self._written.append((offset, len(data)))
                return
        target.write_at(offset, data)

    def finish(self) -> None:
        self._ended.set()

    def abort(self) -> None:
        self._failed = True
        self._ended.set()

    def release(self) -> None:
        """Nobody will attach (the model loads from the cache file instead)."""
        with self._lock:
            if self._target is None and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
                self._written = []

    def attach(self, target: Target, timeout: float | None = None) -> None:
        """Give `target` every byte written so far and all later ones, and return once the
        download has ended; raises if it failed (then `target` is incomplete)."""
        with self._lock:
            if self._target is not None or self._fd < 0:
                raise RuntimeError("a handoff is attached once, and not after its release")
            self._target = target
            backlog, self._written = self._written, []
        try:
            target.read_file(self._fd, coalesce(backlog))
        finally:
            os.close(self._fd)
            self._fd = -1
        if not self._ended.wait(timeout):
            raise TimeoutError("the download did not end in time")
        if self._failed:
            raise OSError("the download failed")
