"""Tensors filled in place, on their device, as a download's ranges arrive.

`TensorPlacement` allocates every tensor a safetensors header names on the target device, then
takes pieces of the file at any offset, from many download threads at once, and copies each
into the tensors it overlaps. On a CUDA device a piece goes through a `StagingRing`: a few
reusable pinned host buffers, each copied to the device with `non_blocking=True` on one copy
stream and reused once its copy's event has completed. The host memory a load needs is then the
ring (and the downloader's read buffers), not the model; the network and the host-to-device
copy overlap. On the CPU the tensors are host memory already and pieces are copied straight in.
"""

from __future__ import annotations

import bisect
import functools
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ember.server.weights.header import Header, TensorEntry

# Four 4 MiB slots: a piece is at most the downloader's read size (1 MiB by default), so a slot
# rarely holds less than a whole piece, and four keep the copy engine busy while the threads
# fill the next ones.
DEFAULT_SLOTS = 4
DEFAULT_SLOT_BYTES = 4 * 1024 * 1024
# Reading a file into place: threads at once, and the most one read asks for on the CPU.
READ_THREADS = 4
READ_PIECE = 16 * 1024 * 1024

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F64": torch.float64,
    "C64": torch.complex64,
}


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's memory."""
    return tensor.reshape(-1).view(torch.uint8)


class StagingRing:
    """`slots` host buffers of `slot_bytes`, lent one at a time to copy a piece to `device`.

    On CUDA the buffers are pinned and the copies asynchronous on the ring's own stream; a
    buffer goes back to the ring with its copy's event, and whoever takes it next waits for
    that event before writing into it. On any other device the copy is synchronous (the ring
    still bounds memory and is what the tests drive on the CPU).
    """

    def __init__(
        self,
        device: torch.device,
        slots: int = DEFAULT_SLOTS,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
    ) -> None:
        if slots < 1 or slot_bytes < 1:
            raise ValueError(f"a ring needs slots and bytes, got {slots} x {slot_bytes}")
        self.device = device
        self.slot_bytes = slot_bytes
        cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if cuda else None  # type: ignore[no-untyped-call]
        self._buffers = [
            torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(slots)
        ]
        self._host = [b.numpy() for b in self._buffers]
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(slots):
            self._free.put(index)
        self.copies = 0
        self._lock = threading.Lock()

    @property
    def host_bytes(self) -> int:
        return len(self._buffers) * self.slot_bytes

    def send(
        self,
        length: int,
        fill: Callable[[np.ndarray], None],
        targets: list[tuple[torch.Tensor, int]],
    ) -> None:
        """Take a slot, let `fill` write `length` (at most `slot_bytes`) bytes into its host
        memory, then copy the slot's bytes from `at` into each flat uint8 `destination`. Returns
        once the slot's host memory is filled; the device copies may still be in flight."""
        index = self._free.get()
        try:
            event = self._events[index]
            if event is not None:
                event.synchronize()
            fill(self._host[index][:length])
            staged = self._buffers[index]
            if self._stream is None:
                for destination, at in targets:
                    destination.copy_(staged[at : at + destination.numel()])
            else:
                with torch.cuda.stream(self._stream):
                    try:
                        for destination, at in targets:
                            piece = staged[at : at + destination.numel()]
                            destination.copy_(piece, non_blocking=True)
                    finally:
                        # Even when a copy failed: those queued before it still read the
                        # slot. Blocking: a waiting thread sleeps instead of spinning.
                        event = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
                        event.record(self._stream)
                        self._events[index] = event
            with self._lock:
                self.copies += len(targets)
        finally:
            self._free.put(index)

    def copy(self, destination: torch.Tensor, data: memoryview) -> None:
        """Copy `data` (at most `slot_bytes`) into the flat uint8 `destination` of its length."""

        def fill(host: np.ndarray) -> None:
            host[:] = np.frombuffer(data, dtype=np.uint8)

        self.send(len(data), fill, [(destination, 0)])

    def follow_current(self) -> None:
        """Order the ring's copies after the work already queued on the calling thread's
        stream: the tensors they fill were allocated there, and the caching allocator may have
        handed out memory whose last kernels on that stream have not run yet."""
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))

    def synchronize(self) -> None:
        """Wait for every copy issued so far."""
        if self._stream is not None:
            self._stream.synchronize()


class TensorPlacement:
    """The tensors of one safetensors file on `device`, filled by `write_at(offset, data)` with
    file offsets (the header's own bytes are skipped). Implements storage's `Placement`."""

    def __init__(
        self, header: Header, device: torch.device, ring: StagingRing | None = None
    ) -> None:
        self.header = header
        self.device = device
        # CPU tensors take pieces directly; a device tensor needs the host-side ring.
        self._ring = ring if ring is not None or device.type == "cpu" else StagingRing(device)
        entries = [e for e in header.tensors if e.nbytes > 0]
        self._begins = [e.begin for e in entries]
        self._entries = entries
        self.tensors: dict[str, torch.Tensor] = {}
        self._targets: list[torch.Tensor] = []
        self._host_targets: list[np.ndarray] = []
        for entry in header.tensors:
            tensor = torch.empty(entry.shape, dtype=TORCH_DTYPES[entry.dtype], device=device)
            self.tensors[entry.name] = tensor
        for entry in entries:
            target = _as_bytes(self.tensors[entry.name])
            self._targets.append(target)
            if device.type == "cpu":
                self._host_targets.append(target.numpy())
        if self._ring is not None:
            self._ring.follow_current()
        self._placed = 0
        self._aborted = False
        self._lock = threading.Lock()

    @property
    def placed_bytes(self) -> int:
        return self._placed

    def write_at(self, offset: int, data: memoryview) -> None:
        if self._aborted:
            return
        data = data.cast("B") if data.format != "B" else data
        placed = 0
        for index, lo, hi in self._overlaps(offset, offset + len(data)):
            self._place(index, self._entries[index], lo, data[lo - offset : hi - offset])
            placed += hi - lo
        if placed:
            with self._lock:
                self._placed += placed

    def _place(self, index: int, entry: TensorEntry, at: int, piece: memoryview) -> None:
        into = at - entry.begin
        if self._ring is None:
            self._host_targets[index][into : into + len(piece)] = np.frombuffer(piece, np.uint8)
            return
        step = self._ring.slot_bytes
        target = self._targets[index]
        for cut in range(0, len(piece), step):
            part = piece[cut : cut + step]
            self._ring.copy(target[into + cut : into + cut + len(part)], part)

    def _overlaps(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(tensor index, lo, hi) for every tensor overlapping file bytes [start, end)."""
        start = max(start, self.header.data_start)
        index = max(0, bisect.bisect_right(self._begins, start) - 1)
        found = []
        while index < len(self._entries) and self._entries[index].begin < end:
            entry = self._entries[index]
            lo, hi = max(start, entry.begin), min(end, entry.end)
            if lo < hi:
                found.append((index, lo, hi))
            index += 1
        return found

    def read_file(
        self, fd: int, extents: list[tuple[int, int]], threads: int = READ_THREADS
    ) -> None:
        """File bytes in `extents` ([start, end) pairs) read from `fd` straight into place: on
        the CPU into the tensors' own memory, on a device into ring slots that are then copied
        out, a few reads at once (the page cache serves one thread at memcpy speed, not the
        copy engine's)."""
        tasks: list[Callable[[], int]] = []
        for start, end in extents:
            if self._ring is None:
                for index, lo, hi in self._overlaps(start, end):
                    for cut in range(lo, hi, READ_PIECE):
                        tasks.append(
                            functools.partial(
                                self._read_host, fd, index, cut, min(hi, cut + READ_PIECE)
                            )
                        )
            else:
                step = self._ring.slot_bytes
                for cut in range(max(start, self.header.data_start), end, step):
                    tasks.append(
                        functools.partial(self._read_staged, fd, cut, min(end, cut + step))
                    )
        if not tasks:
            return
        pool = ThreadPoolExecutor(min(threads, len(tasks)), thread_name_prefix="ember-place")
        try:
            placed = sum(pool.map(lambda task: task(), tasks))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # not the reads still queued
            raise
        pool.shutdown(wait=True)
        with self._lock:
            self._placed += placed

    def _read_host(self, fd: int, index: int, lo: int, hi: int) -> int:
        entry = self._entries[index]
        _read_exactly(fd, self._host_targets[index][lo - entry.begin : hi - entry.begin].data, lo)
        return hi - lo

    def _read_staged(self, fd: int, start: int, end: int) -> int:
        assert self._ring is not None
        overlaps = self._overlaps(start, end)
        targets = []
        for index, lo, hi in overlaps:
            begin = self._entries[index].begin
            targets.append((self._targets[index][lo - begin : hi - begin], lo - start))

        def fill(host: np.ndarray) -> None:
            _read_exactly(fd, host.data, start)

        self._ring.send(end - start, fill, targets)
        return sum(hi - lo for _, lo, hi in overlaps)

    def finish(self) -> None:
        """Wait for the copies in flight; every tensor byte must have arrived."""
        if self._ring is not None:
            self._ring.synchronize()
        expected = sum(e.nbytes for e in self._entries)
        if self._placed != expected:
            raise RuntimeError(f"placed {self._placed} of {expected} tensor bytes")

    def abort(self) -> None:
        """The download failed: let copies drain and give the device memory back."""
        self._aborted = True
        if self._ring is not None:
            self._ring.synchronize()
        self.tensors.clear()
        self._targets.clear()
        self._host_targets.clear()


def _read_exactly(fd: int, into: memoryview, offset: int) -> None:
    done = 0
    while done < len(into):
        got = os.preadv(fd, [into[done:]], offset + done)
        if got <= 0:
            raise OSError(f"the weights file ended at byte {offset + done}")
        done += got
