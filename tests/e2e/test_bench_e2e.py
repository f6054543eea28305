"""`ember bench --serve` end to end: it starts a server, benches it, stops it, writes JSON."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def ember() -> str:
    found = shutil.which("ember", path=str(Path(sys.executable).parent)) or shutil.which("ember")
    if found is None:
        pytest.fail("the `ember` console script is not installed (pip install -e .)")
    return found


@pytest.mark.e2e
def test_bench_serve_mlp_writes_sane_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [ember(), "bench", "--serve", "--model", "mlp", "--concurrency", "1",
            "--duration", "2", "--json", str(out)]  # fmt: skip
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "p50-raw ms" in done.stdout  # the table was printed

    doc = json.loads(out.read_text())
    (infer,) = [r for r in doc["results"] if r["target"] == "infer"]
    raw = doc["raw"]
    assert infer["concurrency"] == 1
    assert infer["rps"] > 0 and infer["requests"] > 0
    assert infer["errors"] == 0, infer["first_error"]
    assert infer["p50_ms"] >= raw["p50_ms"] > 0
    assert infer["overhead_p50_ms"] == pytest.approx(infer["p50_ms"] - raw["p50_ms"])
    # The floors ran beside it, and the machine is on record.
    assert {r["target"] for r in doc["results"]} == {"infer", "live-floor", "client-floor"}
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["torch"]
    # The server it started is gone.
    match = re.search(r"started ember serve \(pid (\d+)\)", done.stderr)
    assert match, done.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int(match.group(1)), 0)


@pytest.mark.e2e
def test_bench_serve_identity_compares_protocols(tmp_path: Path) -> None:
    """JSON, binary tensors and gRPC against one server, with the copy floor beside them."""
    out = tmp_path / "bench.json"
    protocols = ["v2-json", "v2-binary", "grpc"]
    argv = [ember(), "bench", "--serve", "--model", "identity", "--input", "INPUT_FP32",
            "--shape", "1,65536", "--protocol", ",".join(protocols), "--concurrency", "1",
            "--duration", "1",
            # Short ceilings: this checks the plumbing; the numbers are for `ember bench` runs.
            "--warmup", "0.3", "--floor-duration", "0.3", "--raw-seconds", "0.3",
            "--copy-seconds", "0.3", "--json", str(out)]  # fmt: skip
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "copy/this" in done.stdout  # the throughput table was printed

    doc = json.loads(out.read_text())
    infer = {r["protocol"]: r for r in doc["results"] if r["target"] == "infer"}
    assert list(infer) == protocols
    for name, result in infer.items():
        assert result["requests"] > 0 and result["errors"] == 0, (name, result["first_error"])
    # The gRPC floor ran on the server's gRPC port, the HTTP floors on its HTTP port.
    floors = {(r["target"], r["protocol"]) for r in doc["results"] if r["target"] != "infer"}
    assert floors == {("client-floor", "http"), ("live-floor", "http"), ("live-floor", "grpc")}
    rates = {r["protocol"] or r["target"]: r for r in doc["throughput"]}
    assert list(rates) == ["copy-floor", *protocols]
    size = 65536 * 4
    for name, rate in rates.items():
        assert rate["mb_per_s"] > 0, name
        assert (rate["request_bytes"], rate["response_bytes"]) == (size, size), name
    assert rates["v2-json"]["this_over_json"] == pytest.approx(1.0)
    assert doc["copy_floor"]["requests"] > 0
    match = re.search(r"started ember serve \(pid (\d+)\)", done.stderr)
    assert match, done.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int(match.group(1)), 0)
