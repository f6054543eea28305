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
from ember.server.bench.options import TRANSPORTS

INFER = "infer"
LIVE_FLOOR = "live-floor"
CLIENT_FLOOR = "client-floor"
RAW = "raw-forward"
COPY_FLOOR = "copy-floor"
JSON_PROTOCOL = "v2-json"

LEGEND = {
    INFER: "the model served over the wire protocol, by the closed loop",
    LIVE_FLOOR: "the same client against the server's GET /v2/health/live (HTTP stack, no model)",
    CLIENT_FLOOR: "the same client against a canned HTTP answer (client + loopback TCP only)",
    RAW: "the forward in this process, one thread, no HTTP (the model's own cost)",
}
# Shown when the run has gRPC rows (a plain HTTP run prints the legend above as it always did).
GRPC_LEGEND = {
    f"{LIVE_FLOOR} grpc": "a gRPC channel like the load's against the server's ServerLive "
    "(gRPC stack, no model; there is no gRPC client floor)",
}
THROUGHPUT_LEGEND = {
    COPY_FLOOR: "one request's and one response's tensor bytes copied in this process into "
    "buffers allocated once (two memcpy, no protocol): the floor of any round trip",
    "request/response": "tensor bytes per request and per answer (raw size; JSON text on the "
    "wire is larger)",
    "MB/s": "(request + response tensor bytes) x concurrency / mean latency, 1 MB = 10^6 bytes",
    "copy/this": "how many times faster the copy floor moves the same bytes",
    f"this/{JSON_PROTOCOL}": f"how many times faster than {JSON_PROTOCOL} at the same concurrency",
}

_HEADER = ("target", "conc", "requests", "rps", "p50 ms", "p90 ms", "p99 ms", "errors",
           "p50-raw ms")  # fmt: skip
_THROUGHPUT_HEADER = ("target", "protocol", "conc", "request", "response", "MB/s", "copy/this",
                      f"this/{JSON_PROTOCOL}")  # fmt: skip


def format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_bytes(size: int) -> str:
    """1536 -> "1.5 KiB": binary units, three significant figures at most."""
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024 or unit == "MiB":
            break
        value /= 1024
    if unit == "B":
        return f"{size} B"
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"


def format_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}x" if value < 100 else f"{value:.0f}x"


def _align(lines: Sequence[Sequence[str]]) -> str:
    """Fixed-width columns: the first left-aligned, the others right-aligned."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                  enumerate(zip(line, widths, strict=True))).rstrip()
        for line in lines
    )  # fmt: skip


def infer_protocols(rows: Sequence[Stats]) -> list[str]:
    """The wire protocols of the infer rows, in the order they ran."""
    return list(dict.fromkeys(r.protocol for r in rows if r.target == INFER))


def overhead_ms(row: Stats, raw: Stats | None) -> float | None:
    """Served p50 minus raw forward p50: what serving adds at this level (infer rows only)."""
    if row.target != INFER or raw is None or row.p50_ms is None or raw.p50_ms is None:
        return None
    return row.p50_ms - raw.p50_ms


def format_table(rows: Sequence[Stats], raw: Stats | None = None) -> str:
    """A fixed-width table, the raw forward first when there is one.

    With several wire protocols, a protocol column follows the target (one protocol: the
    table is the same as before protocols could be compared)."""
    with_protocol = len(infer_protocols(rows)) > 1
    header = list(_HEADER)
    if with_protocol:
        header.insert(1, "protocol")
    lines = [header]
    for row in ([raw] if raw is not None else []) + list(rows):
        errors = "-" if row.target == RAW else str(row.errors)
        line = [
            row.target, str(row.concurrency), str(row.requests), f"{row.rps:.1f}",
            format_ms(row.p50_ms), format_ms(row.p90_ms), format_ms(row.p99_ms), errors,
            format_ms(overhead_ms(row, raw)),
        ]  # fmt: skip
        if with_protocol:
            line.insert(1, row.protocol or "-")
        lines.append(line)
    return _align(lines)


def breakdown(
    rows: Sequence[Stats], raw: Stats | None, concurrency: int = 1, protocol: str | None = None
) -> dict[str, float]:
    """Where the p50 of one request over `protocol` (default: the first that ran) goes at
    `concurrency`, from differences of p50s.

    Differences of medians are estimates, not an exact split; at concurrency 1 there is no
    queueing, so they are close. Empty when a needed row is missing: over gRPC always, since
    there is no gRPC client floor.
    """
    infer_rows = [
        r for r in rows
        if r.target == INFER and r.concurrency == concurrency
        and (protocol is None or r.protocol == protocol)
    ]  # fmt: skip
    if not infer_rows:
        return {}
    # Rows made before protocols had names ("") are HTTP ones.
    transport = TRANSPORTS.get(infer_rows[0].protocol, "http")
    floors = {
        r.target: r.p50_ms for r in rows
        if r.target in (LIVE_FLOOR, CLIENT_FLOOR) and r.concurrency == concurrency
        and r.protocol in (transport, "")
    }  # fmt: skip
    infer, live, client = infer_rows[0].p50_ms, floors.get(LIVE_FLOOR), floors.get(CLIENT_FLOOR)
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


def format_breakdown(
    parts: dict[str, float], concurrency: int = 1, protocol: str | None = None
) -> str:
    if not parts:
        return ""
    over = "" if protocol is None else f" over {protocol}"
    return (
        f"p50 at concurrency {concurrency}{over}: {parts['served_p50_ms']:.3f} ms = "
        f"client+TCP {parts['client_and_tcp_ms']:.3f} + server HTTP {parts['server_http_ms']:.3f}"
        f" + server infer path (decode, dispatch, encode) {parts['server_infer_path_ms']:.3f}"
        f" + forward {parts['forward_ms']:.3f}"
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Throughput:
    """One row of the throughput table: tensor bytes moved per second, and how that compares."""

    target: str
    protocol: str
    concurrency: int
    request_bytes: int
    response_bytes: int
    mb_per_s: float | None  # None when nothing succeeded
    copy_over_this: float | None  # the copy floor's MB/s / this row's
    this_over_json: float | None  # this row's MB/s / v2-json's at the same concurrency


def mb_per_s(request_bytes: int, response_bytes: int, row: Stats) -> float | None:
    """Tensor MB (10^6 bytes) moved per second: (request + response bytes) x concurrency /
    mean latency. In a closed loop that is the rate the workers move bytes at (Little's law),
    without the window's edge, which matters when one request takes a second or more."""
    if row.mean_ms is None or row.mean_ms <= 0:
        return None
    return (request_bytes + response_bytes) * row.concurrency / (row.mean_ms / 1e3) / 1e6


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def throughput(
    rows: Sequence[Stats],
    sizes: dict[str, tuple[int, int]],
    copy: Stats | None,
    copy_sizes: tuple[int, int] | None,
) -> list[Throughput]:
    """The copy floor, then each infer row: MB/s and the ratios to the copy and to v2-json.

    `sizes` holds (request, response) tensor bytes per protocol, from the check before the
    load; `copy_sizes` what the copy floor copied."""
    copy_rate = None
    out = []
    if copy is not None and copy_sizes is not None:
        copy_rate = mb_per_s(*copy_sizes, copy)
        itself = 1.0 if copy_rate else None
        out.append(Throughput(COPY_FLOOR, "", 1, *copy_sizes, copy_rate, itself, None))
    infer_rows = [r for r in rows if r.target == INFER and r.protocol in sizes]
    json_rate = {
        r.concurrency: mb_per_s(*sizes[r.protocol], r)
        for r in infer_rows if r.protocol == JSON_PROTOCOL
    }  # fmt: skip
    for row in infer_rows:
        rate = mb_per_s(*sizes[row.protocol], row)
        out.append(Throughput(
            INFER, row.protocol, row.concurrency, *sizes[row.protocol], rate,
            _ratio(copy_rate, rate), _ratio(rate, json_rate.get(row.concurrency)),
        ))  # fmt: skip
    return out


def format_throughput(rows: Sequence[Throughput]) -> str:
    lines: list[Sequence[str]] = [_THROUGHPUT_HEADER]
    for row in rows:
        rate = "-" if row.mb_per_s is None else f"{row.mb_per_s:.1f}"
        lines.append((
            row.target, row.protocol or "-", str(row.concurrency), format_bytes(row.request_bytes),
            format_bytes(row.response_bytes), rate, format_ratio(row.copy_over_this),
            format_ratio(row.this_over_json),
        ))  # fmt: skip
    return _align(lines)


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
        "grpcio": _version("grpcio"),
        "ember": _version("ember"),
    }


def document(
    *,
    config: dict[str, Any],
    machine: dict[str, Any],
    rows: Sequence[Stats],
    raw: Stats | None,
    now: datetime.datetime,
    copy: Stats | None = None,
    rates: Sequence[Throughput] = (),
) -> dict[str, Any]:
    """Every number of the run, with what it ran on and when."""
    results = []
    for row in rows:
        item = dataclasses.asdict(row)
        item["overhead_p50_ms"] = overhead_ms(row, raw)
        results.append(item)
    legend = dict(LEGEND)
    if any(r.protocol == "grpc" for r in rows):
        legend |= GRPC_LEGEND
    if rates:
        legend |= THROUGHPUT_LEGEND
    return {
        "schema": "ember-bench/1",
        "date": now.isoformat(timespec="seconds"),
        "config": config,
        "machine": machine,
        "legend": legend,
        "raw": None if raw is None else dataclasses.asdict(raw),
        "results": results,
        "breakdown_p50_ms": breakdown(rows, raw),
        "breakdowns_p50_ms": {
            p: parts for p in infer_protocols(rows) if (parts := breakdown(rows, raw, 1, p))
        },
        "copy_floor": None if copy is None else dataclasses.asdict(copy),
        "throughput": [dataclasses.asdict(r) for r in rates],
    }
