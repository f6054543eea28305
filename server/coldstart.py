"""A cold start, phase by phase: where the time between `exec` and "ready" went.

Phases, each in seconds: `imports` (interpreter start and the serving modules, torch among
them), `config` (reading and validating model.toml), `download` (remote weights or a remote
model folder through the node cache; 0 on a cache hit beyond its HEAD requests), `load`
(weights into the module on its device), `warmup` (the first forward, and CUDA graph capture),
and `total` (process start to the model being ready, everything above plus what lies between:
binding the ports, starting the servers). A model's phases are reported once, when the
process first makes it ready: one log line and the `ember_cold_start_seconds` gauge.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

PHASES = ("imports", "config", "download", "load", "warmup", "total")


def process_started(now: float | None = None) -> float | None:
    """When this process was created, on the `time.monotonic()` scale; None off Linux.

    /proc gives the start in clock ticks since boot, the same clock as CLOCK_BOOTTIME; the
    difference is carried over to the monotonic clock (10 ms resolution)."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[19])  # field 22, counted after the command name
        hertz = os.sysconf("SC_CLK_TCK")
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / hertz
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return (time.monotonic() if now is None else now) - max(0.0, age)


@dataclass(frozen=True, slots=True)
class ProcessPhases:
    """What happened once per process before any model loaded (monotonic times)."""

    started: float
    imported: float
    config_seconds: float = 0.0
    download_seconds: float = 0.0  # a remote model folder (STORAGE_URI) fetched at startup


@dataclass(slots=True)
class LoadPhases:
    """One model's load, summed over its instances."""

    download: float = 0.0
    load: float = 0.0
    warmup: float = 0.0


@dataclass(frozen=True, slots=True)
class ColdStart:
    model: str
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, model: str, process: ProcessPhases, load: LoadPhases, ready: float) -> ColdStart:
        return cls(
            model,
            {
                "imports": process.imported - process.started,
                "config": process.config_seconds,
                "download": process.download_seconds + load.download,
                "load": load.load,
                "warmup": load.warmup,
                "total": ready - process.started,
            },
        )

    def fields(self) -> dict[str, float]:
        """For the log line: `imports_s`, `config_s`, ..., rounded to the millisecond."""
        return {f"{phase}_s": round(self.seconds[phase], 3) for phase in PHASES}
