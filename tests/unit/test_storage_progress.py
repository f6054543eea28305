from __future__ import annotations

import io
import logging
import time

import pytest

from ember.server.storage.progress import Progress, Reporter, human_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_human_bytes() -> None:
    assert human_bytes(12) == "12 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 << 30) == "3.0 GiB"


def test_progress_line_and_bar() -> None:
    clock = Clock()
    progress = Progress(total=400 << 20, clock=clock)
    progress.add(100 << 20)
    clock.now += 2.0
    assert progress.line() == " 25.0% 100.0 MiB of 400.0 MiB at 50.0 MiB/s, 6 s left"
    assert progress.bar().startswith("[#######.......................]")
    progress.add(300 << 20)
    assert progress.line().startswith("100.0%")
    assert Progress(total=0).line().startswith("100.0%")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_redrawn_in_place() -> None:
    stream = Terminal()
    progress = Progress(total=10)
    with Reporter(progress, stream, interval=0.01):
        progress.add(10)
    text = stream.getvalue()
    assert text.startswith("\r[") and text.endswith("\n")
    assert "100.0%" in text.splitlines()[-1]


def test_elsewhere_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    progress = Progress(total=10)
    with caplog.at_level(logging.INFO, logger="ember.storage"):
        reporter = Reporter(progress, stream, interval=0.01)
        assert reporter.interval == 0.01
        with reporter:
            progress.add(5)
            time.sleep(0.05)
    assert stream.getvalue() == ""
    assert any(r.getMessage().startswith("pulling:  50.0%") for r in caplog.records)
    assert Reporter(progress, io.StringIO()).interval == 5.0
