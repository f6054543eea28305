"""The soak's CI run (60 s of mixed traffic through the activator, scale-to-zero on) and the
arithmetic its verdict rests on. The 10-minute run is the same driver from the command line:
`python tests/soak/soak.py --seconds 600 --report /tmp/soak-600.json`."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

_HERE = Path(__file__).resolve().parent


def _load() -> ModuleType:
    # pytest imports test files with --import-mode=importlib: a sibling module is not on
    # sys.path, so the driver is loaded from its file (and registered, as dataclasses need).
    name = "ember_soak_driver"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _HERE / "soak.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


soak = _load()


def test_aligned_slope_ignores_what_repeats_with_the_period() -> None:
    period, interval = 18.0, 2.0
    t = [i * interval for i in range(15, 60)]
    # High during the first third of each period: a plain fit over this window sees a slope.
    wave = [20.0 + (15.0 if (x % period) < 6.0 else 0.0) for x in t]
    assert abs(soak.slope(t[:16], wave[:16]) * 60) > 5
    aligned = soak.aligned_slope(t, wave, period, interval)
    assert aligned is not None and abs(aligned[0] * 60) < 1e-9


def test_aligned_slope_keeps_growth_from_one_period_to_the_next() -> None:
    period, interval = 18.0, 2.0
    t = [i * interval + 0.1 * (i % 3) for i in range(15, 45)]  # a little sampling jitter
    grows = [20.0 + (15.0 if (x % period) < 6.0 else 0.0) + x / 30.0 for x in t]  # 2 per min
    aligned = soak.aligned_slope(t, grows, period, interval)
    assert aligned is not None and aligned[0] * 60 == pytest.approx(2.0, rel=1e-6)
    assert aligned[1] < 1e-9  # nothing but the trend: no error
    # Nothing sampled twice at the same phase: no verdict rather than a guess.
    assert soak.aligned_slope(t[:5], grows[:5], period, interval) is None


def test_a_slope_counts_only_above_its_limit_and_its_floor() -> None:
    figures = {"first": 20, "mid": 20, "last": 23, "max": 23, "window_s": 300.0, "points": 70}
    clear = {**figures, "slope_per_min": 1.5, "stderr_per_min": 0.1}
    grows = soak._judge("activator", "activator", "fds", clear, True)
    assert grows and "grows" in grows[0]
    # As steep, but within the noise of its fit.
    noisy = {**clear, "stderr_per_min": 0.6}
    assert soak._judge("activator", "activator", "fds", noisy, True) == []
    # One step of one fd within a 30 s window: steep and clean, but not above the floor.
    step = {**figures, "slope_per_min": 2.0, "stderr_per_min": 0.1, "window_s": 30.0}
    assert soak._judge("activator", "activator", "fds", step, True) == []
    capped = {**figures, "last": 10_000, "slope_per_min": 0.0}
    assert "above the cap" in soak._judge("x", "replica", "fds", capped, False)[0]


@pytest.mark.e2e
def test_sixty_seconds_of_mixed_traffic_leak_nothing_and_fail_no_good_request(
    tmp_path: Path,
) -> None:
    if not (soak.MODELS / "mlp" / "model.pt").is_file():
        pytest.skip("models/mlp/model.pt is missing: run `make models`")
    report = soak.run(soak.Options(seconds=60.0, run_dir=tmp_path / "run"))
    saved = tmp_path / "soak.json"
    saved.write_text(json.dumps(report, indent=1))
    summary = (
        f"report: {saved}\n{report['requests']}\n{report['table']}\n"
        + "\n".join(str(f) for f in report["failures"][:20])
        + f"\n{report.get('activator_log_tail', '')}"
    )
    assert report["passed"], "\n".join(report["problems"]) + "\n" + summary
    counts = report["requests"]
    # The run did what it claims: traffic of every kind, and the bursty model went to zero.
    assert counts["good_ok"] > 1000 and counts["bad_ok"] > 200, summary
    assert report["bursty_zero_gaps"] >= 2 and report["bursty_replicas"] >= 3, summary
