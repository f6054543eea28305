"""The locustfiles in loadtests/, run headless for a few seconds against real processes.

One locust process runs the V2 binary, V2 JSON, V1 and gRPC locustfiles and the mixed-model
one together (one user each) against `ember serve` with mlp and identity; a second runs the
cold-start scenario through `ember activator`. Each run's `--csv` stats must show requests on
every row it should have and not one failure.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LOADTESTS = ROOT / "loadtests"
RUN_SECONDS = 8
# The cold start itself (a replica importing torch and loading) may take several seconds on a
# busy machine; the run must outlast it with warm traffic to spare.
COLD_RUN_SECONDS = 12
LOCUST_TIMEOUT_S = 90.0
# Options of the locustfiles and locust itself that the environment could set.
_ENV_PREFIXES = ("LOCUST_", "EMBER_")


def locust_executable() -> str:
    found = Path(sys.executable).parent / "locust"
    if not found.is_file():
        pytest.fail(f"locust is not installed beside {sys.executable} (pip install -e '.[test]')")
    return str(found)


def run_locust(
    out: Path, files: list[str], users: int, host: str, *extra: str, seconds: int = RUN_SECONDS
) -> list[dict[str, str]]:
    """Run locust headless for `seconds`; the rows of its `_stats.csv`."""
    out.mkdir(parents=True, exist_ok=True)
    argv = [
        locust_executable(),
        "-f", ",".join(str(LOADTESTS / f) for f in files),
        "--headless", "-u", str(users), "-r", str(users), "-t", f"{seconds}s",
        "--csv", str(out / "out"), "--html", str(out / "out.html"),
        "--host", host, "--only-summary", "--stop-timeout", "5",
        *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
    started = time.monotonic()
    try:
        done = subprocess.run(
            argv, cwd=out, env=env, capture_output=True, text=True, timeout=LOCUST_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"locust still running after {LOCUST_TIMEOUT_S} s: {exc.stderr!r}")
    log = f"`{' '.join(argv)}` ({time.monotonic() - started:.1f} s):\n{done.stderr[-6000:]}"
    assert done.returncode == 0, log
    assert (out / "out.html").stat().st_size > 0, log
    with (out / "out_stats.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    print(f"locust {files}: {len(rows)} rows, {time.monotonic() - started:.1f} s")
    for row in rows:
        median = float(row["Median Response Time"] or 0)
        print(f"  {row['Type']:10} {row['Name']:45} {row['Request Count']:>7} requests, "
              f"{row['Failure Count']} failures, median {median:.1f} ms")  # fmt: skip
    for row in rows:
        assert row["Failure Count"] == "0", (row, log)
    return rows


def requests_by_row(rows: list[dict[str, str]]) -> dict[tuple[str, str], int]:
    return {(r["Type"], r["Name"]): int(r["Request Count"]) for r in rows}


def test_protocol_and_mixed_locustfiles_run_without_failures(
    ember_session: Callable[..., Any], tmp_path: Path
) -> None:
    server = ember_session("--model-repository", ROOT / "models", "--model", "mlp",
                           "--model", "identity")  # fmt: skip
    grpc_port = server.args[server.args.index("--grpc_port") + 1]
    files = ["v2_binary.py", "v2_json.py", "v1_json.py", "grpc_v2.py", "mixed.py"]
    rows = run_locust(
        tmp_path, files, len(files), server.base_url,
        "--model", "mlp", "--grpc-host", f"127.0.0.1:{grpc_port}", "--mix", "mlp=1,identity=1",
    )  # fmt: skip
    counts = requests_by_row(rows)
    # One user per file: each row is one closed loop of RUN_SECONDS (the mixed user's split in
    # two), so even a slow shared machine makes dozens.
    expected = {
        ("POST", "/v2/models/mlp/infer [binary]"): 20,  # v2_binary.py and the mixed user
        ("POST", "/v2/models/mlp/infer"): 20,  # v2_json.py
        ("POST", "/v1/models/mlp:predict"): 20,
        ("grpc", "mlp ModelInfer"): 20,
        ("POST", "/v2/models/identity/infer [binary]"): 5,  # the mixed user
    }
    for row, least in expected.items():
        assert counts.get(row, 0) >= least, (row, counts)
    assert counts[("", "Aggregated")] == sum(n for k, n in counts.items() if k[0])


def test_cold_start_through_the_activator(ember: Callable[..., Any], tmp_path: Path) -> None:
    activator = ember("--model-repository", ROOT / "models", "--model", "identity",
                      "--run-dir", tmp_path / "run", command="activator")  # fmt: skip
    users = 3
    rows = run_locust(
        tmp_path / "locust", ["cold_start.py"], users, activator.base_url,
        "--model", "identity", "--zero-timeout", "20", seconds=COLD_RUN_SECONDS,
    )  # fmt: skip
    counts = requests_by_row(rows)
    # A fresh activator starts at zero: the wait is short, and every user's first request
    # queued for the one replica it started.
    assert counts[("cold-start", "wait for zero replicas")] == 1, counts
    assert counts[("POST", "/v2/models/identity/infer [binary] [cold]")] == users, counts
    assert counts[("cold-start", "time to first answer")] == 1, counts
    assert counts[("cold-start", "X-Ember-Cold-Start-Ms")] >= 1, counts
    assert counts.get(("POST", "/v2/models/identity/infer [binary]"), 0) >= 20, counts
    first = next(r for r in rows if r["Name"] == "time to first answer")
    # A cold start runs `ember serve` to readiness: far longer than a warm request.
    assert float(first["Median Response Time"]) > 100, first
