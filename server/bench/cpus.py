"""CPU sets and CPU time: `--serve-cpus`, the pinning of the bench itself, and the CPU each
side used during a level (how the bench shows that the client was not the bottleneck).

Linux only, like `taskset`: affinity is per thread, so "pin this process" means every thread
it has now (`/proc/self/task`); threads started later inherit their creator's set.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator
from pathlib import Path

from ember.server.bench.errors import BenchError


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """`0`, `0-2,5` (taskset's list format) -> sorted CPU numbers, no repeats.

    Raises ValueError with a one-line message, so argparse can show it."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, sep, high = part.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"expected CPU numbers or ranges such as 0-2,5, got {text!r}")
        first, last = int(low), int(high) if sep else int(low)
        if last < first:
            raise ValueError(f"the range {part.strip()!r} runs backwards")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def format_cpu_list(cpus: Collection[int]) -> str:
    """(0, 1, 2, 5) -> "0-2,5": the shortest list taskset reads back as the same set."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def split_cpus(allowed: Collection[int], serve: Collection[int]) -> tuple[int, ...]:
    """The client's CPUs: those this process may use, less the server's. Raises BenchError
    when the server's set is not allowed here or leaves the client nothing."""
    outside = sorted(set(serve) - set(allowed))
    if outside:
        raise BenchError(
            f"--serve-cpus {format_cpu_list(serve)}: CPU(s) {format_cpu_list(outside)} are not "
            f"available to this process (it may use {format_cpu_list(allowed)})"
        )
    client = tuple(sorted(set(allowed) - set(serve)))
    if not client:
        raise BenchError(
            f"--serve-cpus {format_cpu_list(serve)} leaves no CPU for the load generator "
            f"(this process may use {format_cpu_list(allowed)})"
        )
    return client


def allowed_cpus() -> tuple[int, ...]:
    return tuple(sorted(os.sched_getaffinity(0)))


def _threads(task_dir: Path = Path("/proc/self/task")) -> list[int]:
    try:
        return [int(entry.name) for entry in task_dir.iterdir() if entry.name.isdigit()]
    except OSError:
        return [0]  # no /proc: at least the calling thread


def pin_process(cpus: Collection[int]) -> None:
    """Every thread of this process onto `cpus` (a thread that ended meanwhile is skipped)."""
    wanted = set(cpus)
    for tid in _threads():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(tid, wanted)


@contextlib.contextmanager
def pinned(cpus: Collection[int], back_to: Collection[int]) -> Iterator[None]:
    """This process on `cpus` for the block, then on `back_to`: the raw forward runs on the
    server's CPUs (with the server stopped), so it is the ceiling of that core."""
    pin_process(cpus)
    try:
        yield
    finally:
        pin_process(back_to)


def cpus_allowed_list(pid: int) -> str | None:
    """`Cpus_allowed_list` of a process, as the kernel reports it (e.g. "0"); None if gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "Cpus_allowed_list":
            return value.strip()
    return None


def parse_stat_cpu_seconds(stat: str, ticks_per_second: int) -> float:
    """utime + stime of a `/proc/PID/stat` line, in seconds (every thread of the process).

    The command name (field 2) is in parentheses and may hold spaces, so fields are counted
    after its closing parenthesis: utime and stime are fields 14 and 15."""
    rest = stat[stat.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): field N is rest[N - 3].
    return (int(rest[11]) + int(rest[12])) / ticks_per_second


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds another process has used so far (user + system, all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return parse_stat_cpu_seconds(stat, os.sysconf("SC_CLK_TCK"))


def parse_busy_seconds(proc_stat: str, ticks_per_second: int) -> float:
    """CPU seconds the whole machine has been busy (every CPU, every process), from the
    `cpu` line of /proc/stat: all time but idle and iowait (guest time is inside user)."""
    for line in proc_stat.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            return (sum(values) - values[3] - values[4]) / ticks_per_second
    raise ValueError("no aggregate cpu line in /proc/stat")


def machine_busy_seconds() -> float | None:
    """CPU seconds the machine has been busy so far; None without /proc/stat."""
    try:
        text = Path("/proc/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    return parse_busy_seconds(text, os.sysconf("SC_CLK_TCK"))
