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

from ember.server.bench.load import OverloadStats, RawRate, Stats
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
    # With --compare, a server column first (one server: the table is as it was).
    with_server = len({r.server for r in rows}) > 1
    header = list(_HEADER)
    if with_protocol:
        header.insert(1, "protocol")
    if with_server:
        header.insert(0, "server")
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
        if with_server:
            line.insert(0, row.server or "-")
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


# --- levels: rows/s against the raw forward at the batch sizes the server ran ------------

LEVELS_LEGEND = {
    "rows/s": "rows per request x requests per second",
    "rows/fwd": "rows per forward the server ran in the window (its /v2/models/{m}/stats)",
    "%raw@c": "rows/s as a share of the raw forward's rows/s at batch = concurrency (the "
    "largest batch the level can form; capped at the model's max_batch_size)",
    "%raw@fwd": "the same at the rows/fwd the server ran, rounded",
    "client cpu": "CPU the bench process used in the window, as a share of its CPUs",
    "server cpu": "CPU the server process used in the window, as a share of its CPUs",
    "fwd time": "the share of the window the server spent inside forwards (compute_infer)",
    "others": "CPU (in cores) every other process on the machine used in the window: above "
    "0.1 the level shared its cores with something else, and its numbers are suspect",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Level:
    """One infer level, with what it is compared against."""

    server: str
    protocol: str
    concurrency: int
    errors: int
    rps: float
    rows_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    p99_over_p50: float | None
    mean_batch: float | None  # rows per forward the server ran
    batches: dict[int, int] | None  # executions per batch size in the window
    raw_batch: int  # min(concurrency, what one forward can take)
    of_raw_at_concurrency: float | None  # rows/s / raw rows/s at raw_batch
    observed_batch: int | None  # mean_batch rounded (and capped), as raw was measured
    of_raw_at_observed: float | None
    over_compared: float | None  # rows/s / the compared server's, same protocol and level
    client_cpu: float | None  # share of the client's CPUs
    server_cpu: float | None  # share of the server's CPUs (cores when it was not pinned)
    forward_share: float | None
    other_cpu: float | None  # cores used by every other process meanwhile


def _share(used: float | None, cores: int | None) -> float | None:
    if used is None:
        return None
    return used / cores if cores else used


def levels(rows: Sequence[Stats], raw_rates: Sequence[RawRate], max_batch: int) -> list[Level]:
    """Every infer row as a `Level`. The first server that ran is the one compared; the
    second (`--compare`) is what it is compared with."""
    raw_by = {r.batch: r for r in raw_rates}
    infer = [r for r in rows if r.target == INFER]
    servers = list(dict.fromkeys(r.server for r in infer))
    by_key = {(r.server, r.protocol, r.concurrency): r for r in infer}
    out = []
    for row in infer:
        seen = row.observed
        mean = seen.mean_batch if seen else None
        observed = None if mean is None else min(max(1, round(mean)), max_batch)
        raw_batch = min(row.concurrency, max_batch)
        at_c, at_seen = raw_by.get(raw_batch), raw_by.get(observed) if observed else None
        compared = None
        if len(servers) > 1 and row.server == servers[0]:
            other = by_key.get((servers[1], row.protocol, row.concurrency))
            compared = _ratio(row.rows_per_s, other.rows_per_s if other else None)
        p99_over_p50 = _ratio(row.p99_ms, row.p50_ms)
        out.append(Level(
            server=row.server, protocol=row.protocol, concurrency=row.concurrency,
            errors=row.errors, rps=row.rps, rows_per_s=row.rows_per_s, p50_ms=row.p50_ms,
            p99_ms=row.p99_ms, p99_over_p50=p99_over_p50, mean_batch=mean,
            batches=seen.batches if seen else None, raw_batch=raw_batch,
            of_raw_at_concurrency=_ratio(row.rows_per_s, at_c.rows_per_s if at_c else None),
            observed_batch=observed,
            of_raw_at_observed=_ratio(row.rows_per_s, at_seen.rows_per_s if at_seen else None),
            over_compared=compared,
            client_cpu=_share(seen.client_cpu, seen.client_cores) if seen else None,
            server_cpu=_share(seen.server_cpu, seen.server_cores) if seen else None,
            forward_share=seen.forward_share if seen else None,
            other_cpu=seen.other_cpu if seen else None,
        ))  # fmt: skip
    return out


def format_percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def format_rate(value: float | None) -> str:
    """12345.6 -> "12,346": rows and requests per second, to the unit."""
    return "-" if value is None else f"{value:,.0f}"


def format_raw_rates(rates: Sequence[RawRate], threads: int | None = None) -> str:
    threads_text = "" if threads is None else f", torch threads {threads}"
    lines: list[Sequence[str]] = [("raw forward", "rows", "forwards", "p50 ms", "rows/s")]
    for r in rates:
        lines.append((f"batch {r.batch}", str(r.rows), str(r.calls), f"{r.p50_ms:.3f}",
                      format_rate(r.rows_per_s)))  # fmt: skip
    return f"raw forward in the bench process{threads_text}\n" + _align(lines)


def format_levels(rows: Sequence[Stats], raw_rates: Sequence[RawRate], max_batch: int) -> str:
    """The infer levels against the raw forward at the batch sizes the server ran."""
    items = levels(rows, raw_rates, max_batch)
    servers = list(dict.fromkeys(i.server for i in items))
    with_server = len(servers) > 1
    header = ["protocol", "conc", "rps", "rows/s", "p50 ms", "p99 ms", "p99/p50", "rows/fwd",
              "%raw@c", "%raw@fwd", "client cpu", "server cpu", "fwd time", "others"]  # fmt: skip
    if with_server:
        header[0:0] = ["server"]
        header.insert(header.index("client cpu"), f"x {servers[1]}")
    lines: list[Sequence[str]] = [header]
    for i in items:
        line = [
            i.protocol, str(i.concurrency), format_rate(i.rps), format_rate(i.rows_per_s),
            format_ms(i.p50_ms), format_ms(i.p99_ms), format_ratio(i.p99_over_p50),
            "-" if i.mean_batch is None else f"{i.mean_batch:.1f}",
            format_percent(i.of_raw_at_concurrency), format_percent(i.of_raw_at_observed),
            format_percent(i.client_cpu), format_percent(i.server_cpu),
            format_percent(i.forward_share),
            "-" if i.other_cpu is None else f"{i.other_cpu:.2f}",
        ]  # fmt: skip
        if with_server:
            line[0:0] = [i.server]
            line.insert(header.index("client cpu"), format_ratio(i.over_compared))
        lines.append(line)
    return _align(lines)


def peak(rows: Sequence[Stats], server: str, protocol: str) -> Stats | None:
    """The infer level with the most requests per second on `server` over `protocol`."""
    found = [r for r in rows if r.target == INFER and r.server == server and r.protocol == protocol]
    return max(found, key=lambda r: r.rps, default=None)


def overload_summary(stats: OverloadStats, best: Stats | None) -> dict[str, Any]:
    """The overload level's numbers, with goodput against the peak of the normal levels."""
    return {
        **dataclasses.asdict(stats),
        "goodput_rows_per_s": stats.goodput * stats.rows_per_request,
        "peak_rps": None if best is None else best.rps,
        "peak_concurrency": None if best is None else best.concurrency,
        "goodput_of_peak": _ratio(stats.goodput, best.rps if best else None),
    }


def format_overload(stats: OverloadStats, best: Stats | None) -> str:
    summary = overload_summary(stats, best)
    of_peak = summary["goodput_of_peak"]
    against = (
        "" if best is None or of_peak is None
        else f" = {of_peak * 100:.1f}% of the peak {format_rate(best.rps)} rps "
        f"({best.protocol} c={best.concurrency})"
    )  # fmt: skip
    retry = "-" if stats.retry_after_s is None else f"{stats.retry_after_s:g} s"
    lines = [
        f"overload: {stats.concurrency} clients over {stats.protocol}, each waits the "
        f"Retry-After after a 429 (capped at {stats.retry_after_cap_s:g} s; the server sent "
        f"{retry})",
        f"  goodput {format_rate(stats.goodput)} rps "
        f"({format_rate(summary['goodput_rows_per_s'])} rows/s){against}",
        f"  answered {stats.ok} (p50 {format_ms(stats.ok_p50_ms)} ms, p99 "
        f"{format_ms(stats.ok_p99_ms)} ms); refused (429) {stats.rejected} (p50 "
        f"{format_ms(stats.rejected_p50_ms)} ms, p99 {format_ms(stats.rejected_p99_ms)} ms); "
        f"other errors {stats.errors}",
    ]
    seen = stats.observed
    if seen is not None:
        mean = seen.mean_batch
        lines.append(
            f"  server: rows/fwd {'-' if mean is None else f'{mean:.1f}'}, cpu "
            f"{format_percent(_share(seen.server_cpu, seen.server_cores))}, forwards "
            f"{format_percent(seen.forward_share)} of the time; client cpu "
            f"{format_percent(_share(seen.client_cpu, seen.client_cores))}"
        )
    return "\n".join(lines)


# The client is suspected of limiting a level when it was this busy, or when its floor (the
# same client against a canned answer) was not this much faster than what was served.
CLIENT_BUSY = 0.9
FLOOR_MARGIN = 1.2
# Cores other processes may use during a level before the run is called contended.
OTHERS_LIMIT = 0.1


def client_headroom(rows: Sequence[Stats]) -> dict[str, Any] | None:
    """How close the load generator came to being the bottleneck: its busiest infer level
    (CPU share of its own CPUs, and the server's CPU there), and per concurrency the client
    floor's rps against the most served. None when nothing was measured."""
    seen_rows = [(r, r.observed) for r in rows if r.target == INFER and r.observed is not None]
    if not seen_rows:
        return None
    busiest, seen = max(seen_rows, key=lambda item: item[1].client_cpu / item[1].client_cores)
    client = seen.client_cpu / seen.client_cores
    floors = []
    for row in rows:
        if row.target != CLIENT_FLOOR:
            continue
        served = max(
            (r.rps for r in rows if r.target == INFER and r.concurrency == row.concurrency),
            default=0.0,
        )
        floors.append({"concurrency": row.concurrency, "client_floor_rps": row.rps,
                       "most_served_rps": served,
                       "floor_over_served": _ratio(row.rps, served)})  # fmt: skip
    short = [f for f in floors if (f["floor_over_served"] or 0.0) < FLOOR_MARGIN]
    others = [(r, o.other_cpu) for r, o in seen_rows if o.other_cpu is not None]
    noisiest = max(others, key=lambda item: item[1], default=None)
    return {
        "busiest": {
            "server": busiest.server,
            "protocol": busiest.protocol,
            "concurrency": busiest.concurrency,
            "client_cpu": client,
            "client_cores": seen.client_cores,
            "server_cpu": _share(seen.server_cpu, seen.server_cores),
            "server_cores": seen.server_cores,
        },
        "floors": floors,
        "suspect": client >= CLIENT_BUSY or bool(short),
        "others_max_cpu": None if noisiest is None else noisiest[1],
        "others_max_at": None
        if noisiest is None
        else {
            "server": noisiest[0].server,
            "protocol": noisiest[0].protocol,
            "concurrency": noisiest[0].concurrency,
        },
        "contended": noisiest is not None and noisiest[1] > OTHERS_LIMIT,
    }


def format_client_check(check: dict[str, Any] | None) -> str:
    if check is None:
        return ""
    b = check["busiest"]
    name = " ".join(p for p in (b["server"], b["protocol"]) if p)
    server = "" if b["server_cpu"] is None else (
        f" while the server used {format_percent(b['server_cpu'])} of its "
        f"{b['server_cores'] or 'unpinned'} CPU(s)"
    )  # fmt: skip
    lines = [
        f"client check: the bench process used at most {format_percent(b['client_cpu'])} of "
        f"its {b['client_cores']} CPU(s) ({name} c={b['concurrency']}){server}"
    ]
    for f in check["floors"]:
        lines.append(
            f"  c={f['concurrency']}: client floor {format_rate(f['client_floor_rps'])} rps, "
            f"{format_ratio(f['floor_over_served'])} the most served "
            f"({format_rate(f['most_served_rps'])} rps)"
        )
    floor = (
        f", its floor over {FLOOR_MARGIN:g}x every served rate" if check["floors"]
        else "; no client floor was measured"
    )  # fmt: skip
    verdict = (
        "the client may be the bottleneck: its CPU or its floor is close to what was served"
        if check["suspect"]
        else f"the client is not the bottleneck (under {CLIENT_BUSY:.0%} busy{floor})"
    )
    lines.append(f"  {verdict}")
    if check.get("others_max_cpu") is not None:
        at = check["others_max_at"]
        where = " ".join(p for p in (at["server"], at["protocol"]) if p)
        lines.append(
            f"  other processes used at most {check['others_max_cpu']:.2f} cores during a level "
            f"({where} c={at['concurrency']})"
            + (": the machine was shared, so rerun when it is quiet" if check["contended"]
               else "")
        )  # fmt: skip
    return "\n".join(lines)


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
    raw_rates: Sequence[RawRate] = (),
    overload: OverloadStats | None = None,
    servers: Sequence[dict[str, Any]] = (),
    max_batch: int = 1,
    checks: Sequence[dict[str, Any]] = (),
    cold_start: dict[str, Any] | None = None,
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
        "servers": list(servers),
        "max_requests_per_forward": max_batch,
        "raw_forwards": [dataclasses.asdict(r) for r in raw_rates],
        "levels": [dataclasses.asdict(level) for level in levels(rows, raw_rates, max_batch)],
        "overload": None
        if overload is None
        else overload_summary(
            overload, peak(rows, rows[0].server if rows else "", overload.protocol)
        ),
        "client_check": client_headroom(rows),
        "cold_start_through_activator": cold_start,
        "targets": list(checks),
    }
