"""Cold start from S3 on loopback, the storage issue's benchmark (not a test).

    python tests/storage/bench_cold_start.py [--size-mib 512]

One `rclone serve s3` (its request log counts GETs) over a synthetic safetensors file of
`--size-mib` (width x width FP32 matrices of an MLP without biases), then, in one run:

  (a) boto3 `download_file` with default settings, in this process;
  (b) `ember pull` of the object into an empty cache (the whole command, and the download
      time it reports);
  (0) `ember serve` of a model with no weights (`identity`): process start to ready, and its
      peak RSS: the no-model baseline;
  (c) `ember serve` of a model whose weights are that object, empty cache: start to ready;
  (d) the same with the cache from (c): start to ready, and the data GETs it made.

Peak RSS is the server's VmHWM when it turned ready; RssAnon beside it is the memory that
is not the cache file's pages. On the CPU the loaded weights are host memory by definition
(the model lives there), so the figure to compare with 25% of the model is what the load
needs beyond the model itself: peak RSS - baseline - model size.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import save_file

from ember.server.storage.settings import S3Settings

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
WIDTH = 4096

ARCH = f"""
import torch


class Stack(torch.nn.Module):
    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Linear({WIDTH}, {WIDTH}, bias=False) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
"""

TOML = """
name = "big"
format = "safetensors"
architecture = "arch:Stack"
storage_uri = "s3://bench/big.safetensors"
device = "cpu"
[architecture_kwargs]
layers = {layers}
[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, {width}]
[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1, {width}]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ember() -> str:
    return shutil.which("ember", path=str(Path(sys.executable).parent)) or "ember"


def status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of a live process, in bytes."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            found[key] = int(value.split()[0]) * 1024
    return found


class Rclone:
    def __init__(self, data: Path, log: Path) -> None:
        self.port = free_port()
        self.log = log
        argv = [shutil.which("rclone", path=str(Path(sys.executable).parent)) or "rclone",
                "serve", "s3", str(data), "--addr", f"127.0.0.1:{self.port}",
                "--config", "/dev/null", "-vv", "--log-file", str(log)]  # fmt: skip
        self.process = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
        self.env = {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
        }

    def gets(self) -> int:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return len(re.findall(r"GET OBJECT", text))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def serve_until_ready(args: list[str], env: dict[str, str]) -> tuple[float, dict[str, int], str]:
    """Seconds from spawn to /v2/health/ready, memory at that moment, the server's log."""
    port = free_port()
    argv = [ember(), "serve", *args, "--host", "127.0.0.1", "--http_port", str(port),
            "--grpc_port", str(free_port())]  # fmt: skip
    fd, log_name = tempfile.mkstemp(prefix="ember-bench-", suffix=".log")
    started = time.perf_counter()
    with os.fdopen(fd, "wb") as log:
        process = subprocess.Popen(argv, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                   stderr=log, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"ember serve exited {process.returncode}: "
                                 f"{Path(log_name).read_text()[-2000:]}")  # fmt: skip
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready",
                                            timeout=1) as answer:  # fmt: skip
                    if answer.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.01)
        seconds = time.perf_counter() - started
        memory = status(process.pid)
    finally:
        process.terminate()
        process.wait(30)
    text = Path(log_name).read_text()
    os.unlink(log_name)
    return seconds, memory, text


def cold_line(log: str) -> str:
    """The cold start's phases, and how the weights were placed (EMBER_STREAM_WEIGHTS)."""
    placed = re.search(r'"weights placed onto ([^"]+)"', log)
    how = f"; placed onto {placed.group(1)}" if placed else ""
    for line in log.splitlines():
        if '"cold start"' in line and '"big"' in line:
            fields = re.findall(r'"(\w+)_s":([0-9.]+)', line)
            return ", ".join(f"{k} {float(v):.2f}" for k, v in fields) + how
    return "(no cold-start line)" + how


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=512)
    args = parser.parse_args()
    layers = max(1, args.size_mib * MiB // (WIDTH * WIDTH * 4))
    with tempfile.TemporaryDirectory(prefix="ember-cold-") as tmp:
        root = Path(tmp)
        (root / "data" / "bench").mkdir(parents=True)
        blob = root / "data" / "bench" / "big.safetensors"
        generator = torch.Generator().manual_seed(0)
        state = {f"layers.{i}.weight": torch.randn(WIDTH, WIDTH, generator=generator) * 0.01
                 for i in range(layers)}  # fmt: skip
        save_file(state, str(blob))
        del state
        size = blob.stat().st_size
        repo = root / "repo" / "big"
        repo.mkdir(parents=True)
        (repo / "arch.py").write_text(ARCH)
        (repo / "model.toml").write_text(TOML.format(layers=layers, width=WIDTH))
        rclone = Rclone(root / "data", root / "rclone.log")
        try:
            client = S3Settings.from_env(rclone.env).client()
            for _ in range(100):
                try:
                    client.head_object(Bucket="bench", Key="big.safetensors")  # warms the MD5
                    break
                except Exception:
                    time.sleep(0.1)
            rows = []
            target = root / "boto3.out"
            best = min(_timed(lambda: client.download_file(
                "bench", "big.safetensors", str(target))) for _ in range(2))  # fmt: skip
            target.unlink()
            rows.append(("(a) boto3 download_file, defaults", best, ""))

            cache_b = root / "cache-b"
            env_b = {**os.environ, **rclone.env, "EMBER_CACHE_DIR": str(cache_b)}
            started = time.perf_counter()
            done = subprocess.run([ember(), "pull", "s3://bench/big.safetensors"], env=env_b,
                                  capture_output=True, text=True, check=True)  # fmt: skip
            pull_wall = time.perf_counter() - started
            reported = re.search(r"downloaded in ([0-9.]+) s", done.stderr)
            inside = f"download {reported.group(1)} s of it" if reported else ""
            rows.append(("(b) ember pull, empty cache (whole command)", pull_wall, inside))

            base_s, base_mem, _ = serve_until_ready(
                ["--model-repository", str(ROOT / "models"), "--model", "identity"], {}
            )
            rows.append(("(0) ember serve, no weights (identity)", base_s, ""))

            env_c = {**rclone.env, "EMBER_CACHE_DIR": str(root / "cache-c")}
            gets_before = rclone.gets()
            cold_s, cold_mem, cold_log = serve_until_ready(
                ["--model-repository", str(repo.parent)], env_c
            )
            cold_gets = rclone.gets() - gets_before
            rows.append(("(c) ember serve, empty cache", cold_s, cold_line(cold_log)))
            gets_before = rclone.gets()
            warm_s, warm_mem, warm_log = serve_until_ready(
                ["--model-repository", str(repo.parent)], env_c
            )
            warm_gets = rclone.gets() - gets_before
            rows.append(("(d) ember serve, warm cache", warm_s, cold_line(warm_log)))
        finally:
            rclone.stop()
    print(f"{size / MiB:.0f} MiB safetensors ({layers} x {WIDTH}x{WIDTH} FP32) from rclone "
          f"serve s3 on loopback; {os.cpu_count()} CPUs")  # fmt: skip
    for name, seconds, note in rows:
        rate = f"{size / seconds / 1e6:6.0f} MB/s" if name[1] in "abc" else " " * 11
        print(f"{name:<46} {seconds:6.2f} s  {rate}  {note}")
    print(f"GETs: (c) {cold_gets}, (d) {warm_gets}")
    for label, memory in (("(0)", base_mem), ("(c)", cold_mem), ("(d)", warm_mem)):
        print(
            f"peak RSS {label} {memory['VmHWM'] / MiB:7.0f} MiB  (at ready: RssAnon "
            f"{memory['RssAnon'] / MiB:.0f} MiB, RssFile {memory['RssFile'] / MiB:.0f} MiB)"
        )
    a, b, c, d = rows[0][1], rows[1][1], rows[3][1], rows[4][1]
    extra = cold_mem["VmHWM"] - base_mem["VmHWM"] - size
    print("targets:")
    print(f"  (b) >= 2x faster than (a): {a / b:.2f}x")
    print(f"  (c) <= (b) + (0) + 1 s: {c:.2f} s vs {b + base_s + 1:.2f} s")
    print(f"  (d) no data GETs: {warm_gets}; >= 3x faster than (c): {c / d:.2f}x")
    print(
        f"  (c) peak RSS above baseline and the model itself: {extra / MiB:.0f} MiB "
        f"= {100 * extra / size:.0f}% of the model (target < 25%)"
    )
    return 0


def _timed(run: object) -> float:
    assert callable(run)
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
