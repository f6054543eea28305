"""The cold-start report: phases from measured times, and the process's start from /proc."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from ember.server.coldstart import ColdStart, LoadPhases, ProcessPhases, process_started


def test_phases_add_up_from_the_process_and_the_load() -> None:
    process = ProcessPhases(started=100.0, imported=103.5, config_seconds=0.25,
                            download_seconds=1.0)  # fmt: skip
    load = LoadPhases(download=2.0, load=0.5, warmup=0.125)
    cold = ColdStart.of("m", process, load, ready=108.0)
    assert cold.seconds == {"imports": 3.5, "config": 0.25, "download": 3.0, "load": 0.5,
                            "warmup": 0.125, "total": 8.0}  # fmt: skip
    assert cold.fields() == {"imports_s": 3.5, "config_s": 0.25, "download_s": 3.0,
                             "load_s": 0.5, "warmup_s": 0.125, "total_s": 8.0}  # fmt: skip


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_this_process_started_before_now_and_after_pytest_began() -> None:
    now = time.monotonic()
    started = process_started(now)
    assert started is not None
    # pytest has been running for a while but not for hours; ticks are 10 ms.
    assert now - 4 * 3600 < started <= now + 0.02
