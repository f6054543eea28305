"""The batching issue's performance targets, checked against a run's numbers.

They are stated for mlp at concurrency 32 with one-row requests, the server pinned to one
core; here they are checked at the run's largest concurrency (C), against the raw forward at
batch C, so a run at other levels says what it measured rather than nothing. Pure.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from ember.server.bench import report
from ember.server.bench.activator import ColdStart
from ember.server.bench.load import OverloadStats, RawRate, Stats
from ember.server.bench.options import ACTIVATOR

# Served rows/s at the largest concurrency as a share of the raw forward's at that batch.
SHARE_OF_RAW = {"v2-binary": 0.45, "v2-json": 0.35}
OVER_COMPARED = 3.0  # rows/s with batching over the same server without it
P99_OVER_P50 = 3.0
GOODPUT_OF_PEAK = 0.90
REJECTION_P99_MS = 5.0
# The activator issue's: latency it adds warm, its throughput against going direct, and what
# it adds to the predictor's own cold start.
ACTIVATOR_P50_ADDED_MS = 1.0
ACTIVATOR_OF_DIRECT = 0.85
ACTIVATOR_COLD_ADDED_MS = 500.0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    value: float | None  # None: not measured in this run
    limit: float
    at_least: bool  # True: value >= limit passes; False: value <= limit (or < for ms)
    unit: str  # "share", "x" or "ms"

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        if self.at_least:
            return self.value >= self.limit
        if self.unit == "ms":
            return self.value < self.limit
        return self.value <= self.limit


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "not measured"
    if unit == "share":
        return f"{value * 100:.1f}%"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.3f} ms"


def evaluate(
    rows: Sequence[Stats],
    raw_rates: Sequence[RawRate],
    overload: OverloadStats | None,
    max_batch: int,
    cold_start: ColdStart | None = None,
) -> list[Check]:
    """Each target that applies to this run (the protocols it ran, --compare, --overload)."""
    items = report.levels(rows, raw_rates, max_batch)
    if not items:
        return []
    if any(i.server == ACTIVATOR for i in items):
        return _activator_checks(items, cold_start)
    primary = items[0].server
    top = max(i.concurrency for i in items)
    at_top = [i for i in items if i.server == primary and i.concurrency == top]
    compared = len({i.server for i in items}) > 1
    checks = []
    for level in at_top:
        where = f"{level.protocol} c={top}"
        share = SHARE_OF_RAW.get(level.protocol)
        if share is not None:
            checks.append(Check(
                f"{where}: rows/s of raw forward rows/s at batch {level.raw_batch}",
                level.of_raw_at_concurrency, share, True, "share",
            ))  # fmt: skip
        if compared:
            checks.append(Check(f"{where}: rows/s over the server without batching",
                                level.over_compared, OVER_COMPARED, True, "x"))  # fmt: skip
        checks.append(Check(f"{where}: p99 / p50", level.p99_over_p50, P99_OVER_P50, False, "x"))
    if overload is not None:
        best = report.peak(rows, primary, overload.protocol)
        of_peak = None
        if best is not None and best.rps > 0:
            of_peak = overload.goodput / best.rps
        where = f"overload {overload.protocol} c={overload.concurrency}"
        checks.append(Check(f"{where}: goodput of the peak throughput", of_peak,
                            GOODPUT_OF_PEAK, True, "share"))  # fmt: skip
        checks.append(Check(f"{where}: rejection (429) latency p99", overload.rejected_p99_ms,
                            REJECTION_P99_MS, False, "ms"))  # fmt: skip
    return checks


def _activator_checks(items: Sequence[report.Level], cold_start: ColdStart | None) -> list[Check]:
    """Through the activator against direct to the same kind of replica, level by level: p50
    added at every concurrency, throughput at the largest."""
    direct = {(i.protocol, i.concurrency): i for i in items if i.server != ACTIVATOR}
    top = max(i.concurrency for i in items)
    checks = []
    for level in (i for i in items if i.server == ACTIVATOR):
        base = direct.get((level.protocol, level.concurrency))
        if base is None:
            continue
        where = f"{level.protocol} c={level.concurrency}"
        added = None
        if level.p50_ms is not None and base.p50_ms is not None:
            added = level.p50_ms - base.p50_ms
        checks.append(Check(f"{where}: p50 added by the activator", added,
                            ACTIVATOR_P50_ADDED_MS, False, "ms"))  # fmt: skip
        if level.concurrency == top:
            share = level.rps / base.rps if base.rps else None
            checks.append(Check(f"{where}: requests/s through the activator of direct", share,
                                ACTIVATOR_OF_DIRECT, True, "share"))  # fmt: skip
    if cold_start is not None:
        added_s = cold_start.added_s
        checks.append(Check(
            "cold start: first response minus the predictor's own start-to-ready",
            None if added_s is None else added_s * 1000, ACTIVATOR_COLD_ADDED_MS, False, "ms",
        ))  # fmt: skip
    return checks


def _verdict(check: Check) -> str:
    return {True: "met", False: "NOT met", None: "not measured"}[check.met]


def _target(check: Check) -> str:
    sign = ">=" if check.at_least else ("<" if check.unit == "ms" else "<=")
    return f"{sign} {_value(check.limit, check.unit)}"


def format_checks(checks: Sequence[Check]) -> str:
    lines = ["targets (the issue's, at this run's levels):"]
    for check in checks:
        lines.append(
            f"  {_verdict(check):>12}  {check.name}: {_value(check.value, check.unit)} "
            f"(target {_target(check)})"
        )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Summary:
    """One target over several passes of the same run: judged on the median pass."""

    median: Check  # the target with the median of the measured values (None: never measured)
    values: tuple[float, ...]  # every pass that measured it, in order
    passes: int  # passes in the run
    met_in: int  # passes in which it was met


def summarize(passes: Sequence[Sequence[Check]]) -> list[Summary]:
    """Each target named in any pass, in the order first seen. The verdict is the median's,
    not any one pass's: on a shared host a ratio from one pass is a sample of the noise too."""
    order: dict[str, Check] = {}
    values: dict[str, list[float]] = {}
    met_in: dict[str, int] = {}
    for checks in passes:
        for check in checks:
            order.setdefault(check.name, check)
            values.setdefault(check.name, [])
            met_in.setdefault(check.name, 0)
            if check.value is not None:
                values[check.name].append(check.value)
            met_in[check.name] += check.met is True
    out = []
    for name, first in order.items():
        seen = values[name]
        median = statistics.median(seen) if seen else None
        out.append(Summary(
            Check(name, median, first.limit, first.at_least, first.unit),
            tuple(seen), len(passes), met_in[name],
        ))  # fmt: skip
    return out


def format_summary(summaries: Sequence[Summary]) -> str:
    passes = max((s.passes for s in summaries), default=0)
    lines = [f"targets over {passes} passes (judged on the median; range and passes met):"]
    for summary in summaries:
        check = summary.median
        spread = ""
        if summary.values:
            low, high = min(summary.values), max(summary.values)
            spread = f", {_value(low, check.unit)} to {_value(high, check.unit)}"
        lines.append(
            f"  {_verdict(check):>12}  {check.name}: median {_value(check.value, check.unit)} "
            f"(target {_target(check)}{spread}; met in {summary.met_in} of {summary.passes})"
        )
    return "\n".join(lines)
