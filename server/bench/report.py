"""The bench's outputs: a table for people, a JSON document for machines, both pure."""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from ember.server.bench.load import Stats

INFER = "infer"
LIVE_FLOOR = "live-floor"
CLIENT_FLOOR = "client-floor"
RAW = "raw-forward"

LEGEND = {
    INFER: "the model served over the wire protocol, by the closed loop",
    LIVE_FLOOR: "the same client against the server's GET /v2/health/live (HTTP stack, no model)",
    CLIENT_FLOOR: "the same client against a canned HTTP answer (client + loopback TCP only)",
    RAW: "the forward in this process, one thread, no HTTP (the model's own cost)",
}

_HEADER = ("target", "conc", "requests", "rps", "p50 ms", "p90 ms", "p99 ms", "errors",
           "p50-raw ms")  # fmt: skip


def format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def overhead_ms(row: Stats, raw: Stats | None) -> float | None:
    """Served p50 minus raw forward p50: what serving adds at this level (infer rows only)."""
    if row.target != INFER or raw is None or row.p50_ms is None or raw.p50_ms is None:
        return None
    return row.p50_ms - raw.p50_ms


def format_table(rows: Sequence[Stats], raw: Stats | None = None) -> str:
    """A fixed-width table, the raw forward first when there is one."""
    lines = [_HEADER]
    for row in ([raw] if raw is not None else []) + list(rows):
        errors = "-" if row.target == RAW else str(row.errors)
        lines.append((
            row.target, str(row.concurrency), str(row.requests), f"{row.rps:.1f}",
            format_ms(row.p50_ms), format_ms(row.p90_ms), format_ms(row.p99_ms), errors,
            format_ms(overhead_ms(row, raw)),
        ))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(_HEADER))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                  enumerate(zip(line, widths, strict=True))).rstrip()
        for line in lines
    )  # fmt: skip


def breakdown(rows: Sequence[Stats], raw: Stats | None, concurrency: int = 1) -> dict[str, float]:
    """Where the p50 of one request goes at `concurrency`, from differences of p50s.

    Differences of medians are estimates, not an exact split; at concurrency 1 there is no
    queueing, so they are close. Empty when a needed row is missing.
    """
    p50 = {r.target: r.p50_ms for r in rows if r.concurrency == concurrency}
    infer, live, client = p50.get(INFER), p50.get(LIVE_FLOOR), p50.get(CLIENT_FLOOR)
    forward = None if raw is None else raw.p50_ms
    if infer is None or live is None or client is None or forward is None:
        return {}
    return {
        "served_p50_ms": infer,
        "client_and_tcp_ms": client,
        "server_http_ms": live - client,
        "server_infer_path_ms": infer - live - forward,
        "forward_ms": forward,
    }


def format_breakdown(parts: dict[str, float], concurrency: int = 1) -> str:
    if not parts:
        return ""
    return (
        f"p50 at concurrency {concurrency}: {parts['served_p50_ms']:.3f} ms = "
        f"client+TCP {parts['client_and_tcp_ms']:.3f} + server HTTP {parts['server_http_ms']:.3f}"
        f" + server infer path (decode, dispatch, encode) {parts['server_infer_path_ms']:.3f}"
        f" + forward {parts['forward_ms']:.3f}"
    )


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return None


def machine_info(torch_threads: int | None) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": _version("torch"),
        "torch_threads": torch_threads,
        "numpy": _version("numpy"),
        "aiohttp": _version("aiohttp"),
        "ember": _version("ember"),
    }


def document(
    *,
    config: dict[str, Any],
    machine: dict[str, Any],
    rows: Sequence[Stats],
    raw: Stats | None,
    now: datetime.datetime,
) -> dict[str, Any]:
    """Every number of the run, with what it ran on and when."""
    results = []
    for row in rows:
        item = dataclasses.asdict(row)
        item["overhead_p50_ms"] = overhead_ms(row, raw)
        results.append(item)
    return {
        "schema": "ember-bench/1",
        "date": now.isoformat(timespec="seconds"),
        "config": config,
        "machine": machine,
        "legend": LEGEND,
        "raw": None if raw is None else dataclasses.asdict(raw),
        "results": results,
        "breakdown_p50_ms": breakdown(rows, raw),
    }
