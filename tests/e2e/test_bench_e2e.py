"""`ember bench --serve` end to end: it starts a server, benches it, stops it, writes JSON."""

from __future__ import annotations

import importlib.util
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


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.e2e
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pins the server to one CPU")
def test_bench_pinned_compare_and_overload(tmp_path: Path) -> None:
    """The batching issue's bench, short: the server pinned to CPU 0, a second server without
    batching, the raw forward at the batch sizes seen, an overload level with capped waits."""
    out = tmp_path / "bench.json"
    argv = [ember(), "bench", "--serve", "--serve-cpus", "0", "--model", "mlp",
            "--compare", "no-batching", "--overload", "2", "--retry-after-cap", "0.2",
            # A queue as long as the largest level: the levels are never refused, the
            # overload level (8 clients) may be.
            "--queue-size", "4", "--concurrency", "1,4", "--duration", "1",
            "--warmup", "0.3", "--floor-duration", "0.3", "--raw-seconds", "0.3",
            "--json", str(out)]  # fmt: skip
    plot = importlib.util.find_spec("matplotlib") is not None
    if plot:
        argv += ["--plot", str(tmp_path / "bench.png")]
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rows/fwd" in done.stdout and "targets" in done.stdout

    doc = json.loads(out.read_text())
    servers = {s["label"]: s for s in doc["servers"]}
    assert list(servers) == ["batching", "no-batching"]
    assert all(s["cpus_allowed"] == "0" and s["torch_threads"] == 1 for s in servers.values())
    assert servers["no-batching"]["flags"][0] == "--no-batching"
    levels = {(lv["server"], lv["concurrency"]): lv for lv in doc["levels"]}
    assert set(levels) == {(s, c) for s in servers for c in (1, 4)}
    for key, level in levels.items():
        assert level["errors"] == 0 and level["rows_per_s"] > 0, key
        # The batch sizes the server ran in the window, from its statistics.
        assert level["batches"] and level["mean_batch"] >= 1, key
        assert level["client_cpu"] > 0 and level["server_cpu"] > 0, key
    assert set(levels["no-batching", 4]["batches"]) == {"1"}  # one request per forward
    assert levels["batching", 4]["over_compared"] > 0
    raw = {r["batch"]: r for r in doc["raw_forwards"]}
    assert {1, 4} <= set(raw) and all(r["rows_per_s"] > 0 for r in raw.values())
    assert levels["batching", 4]["of_raw_at_concurrency"] > 0
    overload = doc["overload"]
    assert overload["concurrency"] == 8 and overload["errors"] == 0
    assert overload["goodput"] > 0 and overload["goodput_of_peak"] > 0
    assert overload["rejected"] >= 0 and overload["retry_after_cap_s"] == 0.2
    assert doc["client_check"]["busiest"]["client_cores"] >= 1
    assert {t["name"].split(":")[0] for t in doc["targets"]} >= {"v2-json c=4"}
    if plot:
        assert (tmp_path / "bench.png").stat().st_size > 1000
    pids = [int(p) for p in re.findall(r"started ember serve \(\S+\) \(pid (\d+)\)", done.stderr)]
    assert len(pids) == 2, done.stderr
    assert all(_gone(pid) for pid in pids)


@pytest.mark.e2e
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pins the server to one CPU")
def test_gpu_check_runs_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, "loadtests/gpu_check.py", "--device", "cpu", "--quick",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "served no-batching" in done.stdout and "CUDA graphs" in done.stdout
    assert "pageable" in done.stdout
    doc = json.loads(out.read_text())
    assert [(m["runner"], m["batch"]) for m in doc["outputs_match"]] == [
        ("eager", 1), ("eager", 7), ("eager", 64),
    ]  # fmt: skip
    assert all(m["ok"] for m in doc["outputs_match"])
    # CUDA graphs do not apply on the CPU: no second bench, no numbers.
    assert doc["bench_cuda_graphs"] is None
    assert all(r["graphs_rows_per_s"] is None for r in doc["throughput"])
    assert all(r["batching_rows_per_s"] > 0 for r in doc["throughput"])
    # The weights step: both loaders, the same tensors, 64 MiB (4 FP16 4096x4096 tensors).
    assert [w["loader"] for w in doc["weights"]] == [
        "ember placement", "safetensors", "ember pieces",
    ]  # fmt: skip
    assert all(w["identical"] and w["size_bytes"] >= 64 << 20 for w in doc["weights"])
    assert "weights: 64 MiB of safetensors onto cpu" in done.stdout


@pytest.mark.e2e
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pins the server to one CPU")
def test_bench_repeat_measures_each_pass_and_summarises(tmp_path: Path) -> None:
    """--repeat 2: two pinned servers one after the other (the second pass pins again from
    where the first started), each pass with its own raw forwards and targets, and the
    targets judged on the median of the two."""
    out = tmp_path / "bench.json"
    argv = [ember(), "bench", "--serve", "--serve-cpus", "0", "--model", "mlp",
            "--concurrency", "2",
            "--duration", "0.5", "--warmup", "0.2", "--floor-duration", "0",
            "--raw-seconds", "0.3", "--repeat", "2", "--json", str(out)]  # fmt: skip
    done = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "=== pass 1 of 2 ===" in done.stdout and "=== pass 2 of 2 ===" in done.stdout
    assert "targets over 2 passes (judged on the median" in done.stdout

    doc = json.loads(out.read_text())
    passes = doc["passes"]
    assert len(passes) == 2 and doc["config"]["repeat"] == 2
    pids = [p["servers"][0]["pid"] for p in passes]
    assert pids[0] != pids[1] and all(_gone(pid) for pid in pids)
    assert all(p["servers"][0]["cpus_allowed"] == "0" for p in passes)
    for one in passes:
        assert one["raw_forwards"] and all(r["rows_per_s"] > 0 for r in one["raw_forwards"])
        (level,) = one["levels"]
        assert level["errors"] == 0 and level["of_raw_at_concurrency"] > 0
    by_name = {s["name"]: s for s in doc["summary"]}
    share = by_name["v2-json c=2: rows/s of raw forward rows/s at batch 2"]
    values = [t["value"] for p in passes for t in p["targets"] if t["name"] == share["name"]]
    assert share["values"] == values and share["passes"] == 2
    assert share["median"] == pytest.approx(sum(values) / 2)
    assert share["met_in"] == sum(
        t["met"] for p in passes for t in p["targets"] if t["name"] == share["name"]
    )
