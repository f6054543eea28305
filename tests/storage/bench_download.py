"""Download speed on loopback: boto3's `download_file` beside ember's downloader (not a test).

    python tests/storage/bench_download.py [--size-mib 512] [--repeat 3] [--grid]

Starts `rclone serve s3` over a temporary folder holding one random file, warms rclone's MD5
(its ETag, computed once per file), then times each way of fetching the file into a file on the
same disk: best wall time of `--repeat`, and the CPU time of this process in that run. `--grid`
also sweeps concurrency and chunk size (how the defaults in `download.py` were chosen).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.server.storage.download import DownloadOptions
from ember.server.storage.s3 import S3Store
from ember.server.storage.settings import S3Settings
from ember.server.storage.sinks import FileSink, MemorySink

MiB = 1 << 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _best(repeat: int, run: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the fastest of `repeat` runs."""
    results = []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        results.append((time.perf_counter() - wall, time.process_time() - cpu))
    return min(results)


def _wait_ready(client: Any) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            client.head_object(Bucket="bench", Key="blob")  # warms rclone's MD5 too
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--grid", action="store_true")
    args = parser.parse_args()
    rclone = shutil.which("rclone", path=str(Path(sys.executable).parent)) or "rclone"
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "data" / "bench").mkdir(parents=True)
        with (root / "data" / "bench" / "blob").open("wb") as out:
            for _ in range(args.size_mib):
                out.write(os.urandom(MiB))
        port = _free_port()
        argv = [rclone, "serve", "s3", str(root / "data"), "--addr", f"127.0.0.1:{port}"]
        server = subprocess.Popen([*argv, "--config", "/dev/null"], stderr=subprocess.DEVNULL)
        try:
            env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
            env |= {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}
            settings = S3Settings.from_env(env)
            client = settings.client(max_pool_connections=16)
            _wait_ready(client)
            target = root / "out"
            rows: list[tuple[str, tuple[float, float]]] = []

            def boto3_default() -> None:
                client.download_file("bench", "blob", str(target))

            def boto3_tuned() -> None:
                from boto3.s3.transfer import TransferConfig

                config = TransferConfig(multipart_chunksize=16 * MiB, max_concurrency=16)
                client.download_file("bench", "blob", str(target), Config=config)

            def ours(concurrency: int, chunk: int, memory: bool = False) -> Callable[[], None]:
                options = DownloadOptions(concurrency=concurrency, chunk_size=chunk)
                buffer = bytearray(size) if memory else None

                def run() -> None:
                    with S3Store(settings, options) as store:
                        obj = store.head("bench", "blob")
                        if buffer is not None:
                            store.download(obj, MemorySink(buffer))
                            return
                        with FileSink.create(target, obj.size) as sink:
                            store.download(obj, sink)

                return run

            bench = (
                ("boto3 download_file, defaults (8 MiB, 10 threads)", boto3_default),
                ("boto3 download_file, 16 MiB x 16 threads", boto3_tuned),
                ("ember, defaults (16 MiB x 16), into a file", ours(16, 16 * MiB)),
                ("ember, defaults, into memory", ours(16, 16 * MiB, memory=True)),
            )
            for name, run in bench:
                rows.append((name, _best(args.repeat, run)))
            if args.grid:
                for n in (1, 2, 4, 8, 16, 32):
                    rows.append(
                        (f"ember c={n} chunk=16 MiB", _best(args.repeat, ours(n, 16 * MiB)))
                    )
                for chunk in (4, 8, 32, 64):
                    run = ours(16, chunk * MiB)
                    rows.append((f"ember c=16 chunk={chunk} MiB", _best(args.repeat, run)))
            print(f"{args.size_mib} MiB from rclone serve s3 on loopback, best of {args.repeat}")
            for name, (wall, cpu) in rows:
                print(f"{name:<50} {wall:6.2f} s {size / wall / 1e6:6.0f} MB/s  cpu {cpu:5.2f} s")
        finally:
            server.terminate()
            server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
