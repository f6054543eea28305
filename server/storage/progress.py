"""How far a pull has got: a bar on a terminal, a log line every few seconds otherwise.

Download threads only add to a counter; one reporter thread reads it on a fixed tick, so the
bar costs the download nothing and a pod log gets a line per interval, not per range.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TextIO

log = logging.getLogger("ember.storage")

BAR_WIDTH = 30


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Bytes done out of a total, added to from any thread."""

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.done = 0
        self._clock = clock
        self.started = clock()
        self._lock = threading.Lock()

    def add(self, count: int) -> None:
        with self._lock:
            self.done += count

    def line(self) -> str:
        elapsed = max(1e-9, self._clock() - self.started)
        rate = self.done / elapsed
        percent = 100.0 * self.done / self.total if self.total else 100.0
        text = (
            f"{percent:5.1f}% {human_bytes(self.done)} of {human_bytes(self.total)} "
            f"at {human_bytes(rate)}/s"
        )
        if 0 < self.done < self.total and rate > 0:
            text += f", {(self.total - self.done) / rate:.0f} s left"
        return text

    def bar(self) -> str:
        filled = int(BAR_WIDTH * self.done / self.total) if self.total else BAR_WIDTH
        return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.line()}"


class Reporter:
    """Shows `progress` every `interval` seconds until stopped, on `stream` if it is a
    terminal, as log lines otherwise."""

    def __init__(
        self, progress: Progress, stream: TextIO, *, interval: float | None = None
    ) -> None:
        self.progress = progress
        self.stream = stream
        self.tty = stream.isatty()
        self.interval = interval if interval is not None else (0.2 if self.tty else 5.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ember-progress", daemon=True)

    def __enter__(self) -> Reporter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.tty:
            # Leave the final bar on screen, then a new line for what comes next.
            self.stream.write(f"\r{self.progress.bar()}\x1b[K\n")
            self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.tty:
                # \x1b[K clears what a longer previous line left to the right.
                self.stream.write(f"\r{self.progress.bar()}\x1b[K")
                self.stream.flush()
            else:
                log.info("pulling: %s", self.progress.line())
