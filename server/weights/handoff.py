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


class _Dropped:
    """Where pieces go once a handoff's target gave up: nowhere (the file still gets them)."""

    def write_at(self, offset: int, data: memoryview) -> None:
        pass

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def read_file(self, fd: int, extents: list[tuple[int, int]]) -> None:
        pass


class Handoff:
    """The storage-side `Placement` of one object downloading with nobody to take it yet."""

    def __init__(self, header: Header, file: FileSink) -> None:
        self.header = header
        # Its own descriptor for reading back: the download closes and renames the file when
        # it ends, and an open descriptor outlives both.
        self._fd = os.open(file.path, os.O_RDONLY | os.O_CLOEXEC)
        self._lock = threading.Lock()
        # Signalled when the last piece being handed to the target has been.
        self._idle = threading.Condition(self._lock)
        self._handing = 0
        self._written: list[tuple[int, int]] = []
        self._target: Target | None = None
        self._released = False
        self._ended = threading.Event()
        self._failed = False

    def write_at(self, offset: int, data: memoryview) -> None:
        # The file already holds these bytes (the tee writes it first).
        with self._lock:
            target = self._target
            if target is None:
                if not self._released:
                    self._written.append((offset, len(data)))
                return
            self._handing += 1
        try:
            target.write_at(offset, data)
        finally:
            with self._lock:
                self._handing -= 1
                if not self._handing:
                    self._idle.notify_all()

    def finish(self) -> None:
        self._ended.set()

    def abort(self) -> None:
        self._failed = True
        self._ended.set()

    def release(self) -> None:
        """Nobody will attach (the model loads from the cache file instead)."""
        with self._lock:
            if self._target is None and not self._released:
                self._released = True
                os.close(self._fd)
                self._written = []

    def attach(self, target: Target, timeout: float | None = None) -> None:
        """Give `target` every byte written so far and all later ones, and return once the
        download has ended; raises if it failed or took longer than `timeout` (then `target`
        is incomplete, and no download thread touches it any more)."""
        with self._lock:
            if self._target is not None or self._released:
                raise RuntimeError("a handoff is attached once, and not after its release")
            self._target = target
            backlog, self._written = self._written, []
        try:
            try:
                target.read_file(self._fd, coalesce(backlog))
            finally:
                os.close(self._fd)
            if not self._ended.wait(timeout):
                raise TimeoutError("the download did not end in time")
            if self._failed:
                raise OSError("the download failed")
        except BaseException:
            self._detach()
            raise

    def _detach(self) -> None:
        # The download may still be running: its later pieces go nowhere, and the caller may
        # free the target only once no piece is on its way into it.
        with self._lock:
            self._target = _Dropped()
            self._idle.wait_for(lambda: self._handing == 0)
