"""`--plot`: rows/s and p99 against concurrency, one line per server and protocol, with the
raw forward's rows/s as horizontal lines. matplotlib is imported only here, and only when a
plot is asked for; the series are built by a pure function, tested without it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ember.server.bench.errors import BenchError
from ember.server.bench.load import OverloadStats, RawRate, Stats
from ember.server.bench.report import INFER

# Small enough to commit: 9 x 3.6 inches at 100 dpi, a few tens of KB.
SIZE_INCHES = (9.0, 3.6)
DPI = 100


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    concurrency: list[int]
    rows_per_s: list[float]
    p99_ms: list[float | None]


def series(rows: Sequence[Stats]) -> list[Series]:
    """One series per (server, protocol) of the infer rows, points in concurrency order."""
    grouped: dict[tuple[str, str], list[Stats]] = {}
    for row in rows:
        if row.target == INFER:
            grouped.setdefault((row.server, row.protocol), []).append(row)
    out = []
    for (server, protocol), items in grouped.items():
        items.sort(key=lambda r: r.concurrency)
        out.append(Series(
            label=" ".join(p for p in (server, protocol) if p) or "infer",
            concurrency=[r.concurrency for r in items],
            rows_per_s=[r.rows_per_s for r in items],
            p99_ms=[r.p99_ms for r in items],
        ))  # fmt: skip
    return out


def ceilings(raw_rates: Sequence[RawRate], concurrency: Sequence[int]) -> list[RawRate]:
    """The raw forwards drawn as lines: batch 1 and the largest batch the levels could form
    (the observed sizes in between would crowd the plot; the table has them)."""
    if not raw_rates:
        return []
    largest = max((r for r in raw_rates if r.batch <= max(concurrency, default=1)),
                  key=lambda r: r.batch, default=None)  # fmt: skip
    chosen = {r.batch: r for r in raw_rates if r.batch == 1}
    if largest is not None:
        chosen[largest.batch] = largest
    return [chosen[b] for b in sorted(chosen)]


def write_plot(
    path: Path,
    rows: Sequence[Stats],
    raw_rates: Sequence[RawRate],
    overload: OverloadStats | None = None,
    title: str = "",
) -> None:
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    lines = series(rows)
    levels = sorted({c for s in lines for c in s.concurrency})
    fig, (left, right) = plt.subplots(1, 2, figsize=SIZE_INCHES, dpi=DPI)
    for s in lines:
        left.plot(s.concurrency, s.rows_per_s, marker="o", label=s.label)
        points = [(c, p) for c, p in zip(s.concurrency, s.p99_ms, strict=True) if p is not None]
        right.plot([c for c, _ in points], [p for _, p in points], marker="o", label=s.label)
    for ceiling in ceilings(raw_rates, levels):
        left.axhline(ceiling.rows_per_s, linestyle="--", linewidth=1, color="grey")
        left.annotate(f"raw batch {ceiling.batch}", (levels[0] if levels else 1,
                      ceiling.rows_per_s), fontsize=7, va="bottom", color="grey")  # fmt: skip
    if overload is not None:
        left.plot([overload.concurrency], [overload.goodput * overload.rows_per_request],
                  marker="x", linestyle="none", color="black",
                  label=f"overload goodput {overload.protocol}")  # fmt: skip
        levels.append(overload.concurrency)
    for axis, label in ((left, "rows/s"), (right, "p99 ms")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(c) for c in levels])
        axis.set_xlabel("concurrency")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.grid(True, linewidth=0.3)
    left.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
