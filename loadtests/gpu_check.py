"""The GPU check of the batching issue, in one command (under 5 minutes on a CUDA machine):

1. correctness: mlp's outputs on the device match its outputs on the CPU (batches 1, 7, 64),
   eager and with CUDA graphs (`cuda_graphs = true`: 7 rows run padded in the graph of 8);
2. throughput: the raw in-process forward against the served one, mlp with batching on and
   off, over V2 binary (`ember bench --serve --compare no-batching`, its JSON read back), and
   on CUDA the same again with CUDA graphs on (a copy of the model with `cuda_graphs = true`);
3. copies: host-to-device and device-to-host GB/s of 64 MiB from pinned and pageable memory;
4. weights: a synthetic safetensors file placed onto the device through Ember's staging ring
   (`weights/placement.py`, what streams weights from S3) against the safetensors package's
   own `load_file(device=...)`, both from the page cache, and the same bytes given as a
   download gives them (16 threads, 1 MiB pieces, shuffled); the tensors must be identical.

    python loadtests/gpu_check.py                      # CUDA; fails at once without it
    python loadtests/gpu_check.py --device cpu --quick  # the same steps on the CPU, short

The server is started with the model as `models/mlp/model.toml` declares it (`device =
"auto"`: CUDA when there is one). On the CPU CUDA graphs do not apply and their columns say
n/a. Writes every number to --json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mlp"
CHECK_BATCHES = (1, 7, 64)
# FP32 on both sides; CUDA's kernels sum in another order (and may use TF32 where torch
# allows it), so results agree to a tolerance, not bit for bit.
RTOL = 1e-3
ATOL = 1e-4
COPY_BYTES = 64 * 1024 * 1024
NOT_IMPLEMENTED = "n/a"


@dataclass(frozen=True, slots=True)
class Plan:
    """How long each step runs: the full check, or `--quick` (a minute on a laptop CPU)."""

    concurrency: tuple[int, ...]
    duration: float
    warmup: float
    raw_seconds: float
    copy_repeats: int
    weights_bytes: int


FULL = Plan(concurrency=(1, 8, 32, 64), duration=5.0, warmup=1.0, raw_seconds=2.0,
            copy_repeats=20, weights_bytes=2 << 30)  # fmt: skip
QUICK = Plan(concurrency=(1, 8), duration=1.0, warmup=0.3, raw_seconds=0.3, copy_repeats=3,
             weights_bytes=64 << 20)  # fmt: skip


class CheckError(Exception):
    """A step that cannot run; the message is one line for the user."""


@dataclass(frozen=True, slots=True)
class Match:
    batch: int
    max_abs_diff: float
    ok: bool
    runner: str = "eager"  # or "cuda-graphs"


@dataclass(frozen=True, slots=True)
class Copy:
    direction: str  # "H2D" or "D2H"
    memory: str  # "pinned" or "pageable"
    gb_per_s: float | None  # None: not possible on this device


@dataclass(frozen=True, slots=True)
class WeightsLoad:
    # "ember placement" (the file through the staging ring on CUDA), "safetensors", or
    # "ember pieces" (16 threads writing shuffled 1 MiB pieces through the ring)
    loader: str
    size_bytes: int
    seconds: float
    identical: bool

    @property
    def gb_per_s(self) -> float:
        return self.size_bytes / self.seconds / 1e9


@dataclass(frozen=True, slots=True)
class Throughput:
    concurrency: int
    raw_rows_per_s: float | None  # raw forward at batch = concurrency (capped)
    batching_rows_per_s: float | None
    no_batching_rows_per_s: float | None
    batching_of_raw: float | None
    batching_over_no_batching: float | None
    mean_batch: float | None
    graphs_rows_per_s: float | None = None  # batching on, cuda_graphs = true
    graphs_over_eager: float | None = None


def require_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        built = torch.version.cuda or "no CUDA (a CPU-only build)"
        raise CheckError(
            f"CUDA is not available (torch {torch.__version__}, built with {built}; "
            f"{torch.cuda.device_count()} device(s) visible): run this on a CUDA machine, "
            "or pass --device cpu to try the same steps on the CPU"
        )


def check_outputs(repository: Path, device: str, seed: int = 0) -> list[Match]:
    """The model's outputs on `device` against the CPU's, for each batch size; on CUDA also
    through captured graphs."""
    from ember.server import loading
    from ember.server.config import discover

    ((config, model_dir),) = discover(repository, [MODEL])
    reference, _ = loading.load(config, model_dir, "cpu")
    candidates = [("eager", loading.load(config, model_dir, device)[0])]
    if device == "cuda":
        graphs = config.model_copy(update={"cuda_graphs": True})
        candidates.append(("cuda-graphs", loading.load(graphs, model_dir, device)[0]))
    matches = []
    for name, candidate in candidates:
        matches += _compare(config, reference, candidate, name, seed)
    return matches


def _compare(config: Any, reference: Any, candidate: Any, runner: str, seed: int) -> list[Match]:
    import numpy as np

    rng = np.random.default_rng(seed)
    (spec,) = config.inputs
    width = spec.shape[1]
    matches = []
    for batch in CHECK_BATCHES:
        inputs = {spec.name: rng.standard_normal((batch, width)).astype(np.float32)}
        expected = reference.predict(dict(inputs))
        got = candidate.predict(dict(inputs))
        diff = 0.0
        ok = set(expected) == set(got)
        for name, array in expected.items():
            other = got.get(name)
            if other is None or other.shape != array.shape:
                ok = False
                continue
            diff = max(diff, float(np.max(np.abs(other.astype(np.float64) - array))))
            ok = ok and bool(np.allclose(other, array, rtol=RTOL, atol=ATOL))
        matches.append(Match(batch, diff, ok, runner))
    return matches


def _time_copy(dst: Any, src: Any, repeats: int, sync: Any) -> float:
    """Median seconds of `dst.copy_(src)` (after one warm-up), synchronised each time."""
    dst.copy_(src, non_blocking=True)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def copy_rates(device: str, repeats: int, size: int = COPY_BYTES) -> list[Copy]:
    """GB/s (10^9 bytes) of `size`-byte copies each way, from pinned and pageable host memory.

    On the CPU there is no device: the "copies" are host to host, pageable only (pinning
    needs CUDA), which keeps the step's shape and says what this machine's memcpy does."""
    import torch

    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    target = torch.device("cuda" if cuda else "cpu")
    on_device = torch.empty(size, dtype=torch.uint8, device=target)
    on_device.fill_(1)
    rates = []
    for memory in ("pinned", "pageable"):
        if memory == "pinned" and not cuda:
            rates += [Copy("H2D", memory, None), Copy("D2H", memory, None)]
            continue
        host = torch.empty(size, dtype=torch.uint8, pin_memory=memory == "pinned")
        host.fill_(2)  # touch every page before timing
        for direction, dst, src in (("H2D", on_device, host), ("D2H", host, on_device)):
            seconds = _time_copy(dst, src, repeats, sync)
            rates.append(Copy(direction, memory, size / seconds / 1e9))
    return rates


def weights_loads(device: str, size: int) -> list[WeightsLoad]:
    """Seconds to put a `size`-byte safetensors file (FP16 4096x4096 tensors) onto `device`:
    Ember's placement through the staging ring, then the safetensors package; best of two
    each, after a first read has put the file in the page cache."""
    import torch
    from safetensors.torch import load_file, save_file

    from ember.server.loading import _place_file

    target = torch.device("cuda" if device == "cuda" else "cpu")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    per_tensor = 4096 * 4096 * 2
    generator = torch.Generator().manual_seed(0)
    state = {
        f"layer{i}.weight": torch.randn(4096, 4096, generator=generator).to(torch.float16)
        for i in range(max(1, size // per_tensor))
    }
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() else None) as folder:
        path = Path(folder) / "weights.safetensors"
        save_file(state, str(path))
        del state
        total = path.stat().st_size
        path.read_bytes()  # into the page cache for both loaders

        def best(load: Any) -> tuple[float, dict[str, Any]]:
            times, result = [], {}
            for _ in range(2):
                result = {}
                sync()
                start = time.perf_counter()
                result = load()
                sync()
                times.append(time.perf_counter() - start)
            return min(times), result

        ring_s, placed = best(lambda: _place_file(path, target))
        lib_s, loaded = best(lambda: load_file(str(path), device=str(target)))
        data = path.read_bytes()
        pieces_s, pieced = best(lambda: _place_pieces(data, target))

        def same(got: dict[str, Any]) -> bool:
            return got.keys() == loaded.keys() and all(
                torch.equal(got[k], loaded[k]) for k in loaded
            )

        results = [
            WeightsLoad("ember placement", total, ring_s, same(placed)),
            WeightsLoad("safetensors", total, lib_s, True),
            WeightsLoad("ember pieces", total, pieces_s, same(pieced)),
        ]
    return results


def _place_pieces(data: bytes, device: Any, threads: int = 16) -> dict[str, Any]:
    """What a download does to a placement: `threads` threads writing 1 MiB pieces in a
    shuffled order (through the staging ring, also on the CPU, so its reuse is exercised)."""
    import random
    import threading

    from ember.server.weights.header import parse_header
    from ember.server.weights.placement import StagingRing, TensorPlacement

    placement = TensorPlacement(parse_header(data, len(data)), device, StagingRing(device))
    starts = list(range(0, len(data), 1 << 20))
    random.Random(0).shuffle(starts)
    view = memoryview(data)

    def work(share: list[int]) -> None:
        for start in share:
            placement.write_at(start, view[start : start + (1 << 20)])

    workers = [threading.Thread(target=work, args=(starts[i::threads],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    placement.finish()
    return placement.tensors


def bench_command(plan: Plan, json_path: Path, repository: Path) -> list[str]:
    """`ember bench` for step 2: both servers, V2 binary, the raw forward at the batch sizes."""
    argv = [
        sys.executable, "-m", "ember.server.cli", "bench", "--serve", "--model", MODEL,
        "--model-repository", str(repository), "--protocol", "v2-binary",
        "--concurrency", ",".join(map(str, plan.concurrency)), "--duration", str(plan.duration),
        "--warmup", str(plan.warmup), "--raw-seconds", str(plan.raw_seconds),
        "--floor-duration", "0", "--compare", "no-batching", "--json", str(json_path),
    ]  # fmt: skip
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        # The server on the first half of the CPUs, the load generator on the rest.
        half = cpus[: len(cpus) // 2]
        argv += ["--serve-cpus", ",".join(map(str, half))]
    return argv


def write_graphs_copy(repository: Path, target: Path) -> Path:
    """A repository in `target` holding mlp with `cuda_graphs = true` (weights linked)."""
    source = (repository / MODEL).resolve()
    folder = target / MODEL
    folder.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != "model.toml":
            (folder / entry.name).symlink_to(entry)
    text = (source / "model.toml").read_text(encoding="utf-8")
    (folder / "model.toml").write_text("cuda_graphs = true\n" + text, encoding="utf-8")
    return target


def run_bench(plan: Plan, device: str, repository: Path) -> dict[str, Any]:
    env = dict(os.environ)
    if device == "cpu":
        # The server's "auto" device would pick a GPU if one were visible: hide them.
        env["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory(prefix="ember-gpu-check-") as folder:
        out = Path(folder) / "bench.json"
        argv = bench_command(plan, out, repository)
        print("$ ember " + " ".join(argv[3:]), file=sys.stderr, flush=True)
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=600)  # fmt: skip
        if done.returncode != 0 or not out.exists():
            tail = (done.stdout + done.stderr)[-3000:]
            raise CheckError(f"ember bench exited with {done.returncode}:\n{tail}")
        doc: dict[str, Any] = json.loads(out.read_text())
    return doc


def throughput(doc: dict[str, Any], graphs: dict[str, Any] | None = None) -> list[Throughput]:
    """Rows/s per concurrency from the bench's JSON: raw at batch = concurrency, served with
    batching on ("batching") and off ("no-batching"); from `graphs` (the same bench against
    the CUDA-graph copy) the batching rows/s with graphs on."""
    with_graphs = {
        lv["concurrency"]: lv["rows_per_s"]
        for lv in (graphs or {}).get("levels") or []
        if lv["server"] == "batching"
    }
    levels = doc.get("levels") or []
    raw = {r["batch"]: r["rows_per_s"] for r in doc.get("raw_forwards") or []}
    served = {(lv["server"], lv["concurrency"]): lv for lv in levels}
    out = []
    for concurrency in sorted({lv["concurrency"] for lv in levels}):
        on = served.get(("batching", concurrency))
        off = served.get(("no-batching", concurrency))
        raw_rate = raw.get(on["raw_batch"]) if on else None
        on_rate = on["rows_per_s"] if on else None
        off_rate = off["rows_per_s"] if off else None
        graph_rate = with_graphs.get(concurrency)
        out.append(Throughput(
            concurrency=concurrency, raw_rows_per_s=raw_rate, batching_rows_per_s=on_rate,
            no_batching_rows_per_s=off_rate,
            batching_of_raw=on_rate / raw_rate if on_rate and raw_rate else None,
            batching_over_no_batching=on_rate / off_rate if on_rate and off_rate else None,
            mean_batch=on["mean_batch"] if on else None,
            graphs_rows_per_s=graph_rate,
            graphs_over_eager=graph_rate / on_rate if graph_rate and on_rate else None,
        ))  # fmt: skip
    return out


def _cell(value: float | None, form: str, suffix: str = "") -> str:
    # "n/a" for what this run could not measure (or the server does not implement).
    return NOT_IMPLEMENTED if value is None else format(value, form) + suffix


def _align(lines: Sequence[Sequence[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                  enumerate(zip(line, widths, strict=True))).rstrip()
        for line in lines
    )  # fmt: skip


def format_report(
    device: str,
    matches: Sequence[Match],
    rates: Sequence[Throughput],
    copies: Sequence[Copy],
    loads: Sequence[WeightsLoad] = (),
) -> str:
    parts = [f"mlp on {device}: outputs against the CPU's (rtol {RTOL:g}, atol {ATOL:g})"]
    lines: list[Sequence[str]] = [("runner", "batch", "max |diff|", "match")]
    lines += [(m.runner, str(m.batch), f"{m.max_abs_diff:.2e}", "ok" if m.ok else "MISMATCH")
              for m in matches]  # fmt: skip
    parts.append(_align(lines))
    parts.append(f"\nmlp on {device}, V2 binary, one-row requests: rows/s")
    lines = [("concurrency", "raw forward", "served batching", "served no-batching",
              "batching/raw", "batching/no-batching", "rows/fwd", "CUDA graphs",
              "graphs/eager")]  # fmt: skip
    for r in rates:
        lines.append((
            str(r.concurrency), _cell(r.raw_rows_per_s, ",.0f"),
            _cell(r.batching_rows_per_s, ",.0f"), _cell(r.no_batching_rows_per_s, ",.0f"),
            _cell(None if r.batching_of_raw is None else r.batching_of_raw * 100, ".0f", "%"),
            _cell(r.batching_over_no_batching, ".2f", "x"),
            _cell(r.mean_batch, ".1f"), _cell(r.graphs_rows_per_s, ",.0f"),
            _cell(r.graphs_over_eager, ".2f", "x"),
        ))  # fmt: skip
    parts.append(_align(lines))
    parts.append("  raw forward: in the bench process at batch = concurrency (up to 64); "
                 "CUDA graphs: served rows/s with batching and cuda_graphs = true "
                 "(n/a on the CPU)")  # fmt: skip
    parts.append(f"\ncopies of {COPY_BYTES // (1024 * 1024)} MiB, GB/s (10^9 bytes/s)")
    lines = [("memory", "H2D", "D2H")]
    for memory in ("pinned", "pageable"):
        by = {c.direction: c.gb_per_s for c in copies if c.memory == memory}
        lines.append((memory, _cell(by.get("H2D"), ".2f"), _cell(by.get("D2H"), ".2f")))
    parts.append(_align(lines))
    if device == "cpu":
        parts.append("  on --device cpu the copies are host to host; pinning needs CUDA (n/a)")
    if loads:
        size = loads[0].size_bytes / (1024 * 1024)
        parts.append(
            f"\nweights: {size:,.0f} MiB of safetensors onto {device}, from the page cache"
        )
        lines = [("loader", "seconds", "GB/s", "tensors")]
        lines += [(w.loader, f"{w.seconds:.3f}", f"{w.gb_per_s:.2f}",
                   "identical" if w.identical else "DIFFER") for w in loads]  # fmt: skip
        parts.append(_align(lines))
        if device == "cpu":
            parts.append(
                "  on the CPU a file is placed with no ring (the pieces row uses one), and "
                "safetensors maps the file (no copy)"
            )
    return "\n".join(parts)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="where mlp runs (default cuda; cpu tries the same steps)",
    )
    parser.add_argument("--quick", action="store_true", help="short steps (about a minute)")
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=ROOT / "models",
        help="where mlp is (default models/)",
    )
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"),
                        help="where every number goes (default %(default)s)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    plan = QUICK if args.quick else FULL
    started = datetime.datetime.now(datetime.UTC)
    try:
        require_device(args.device)
        print(f"1/4 outputs on {args.device} against the CPU's", file=sys.stderr, flush=True)
        matches = check_outputs(args.model_repository, args.device)
        print("2/4 raw and served throughput (ember bench)", file=sys.stderr, flush=True)
        doc = run_bench(plan, args.device, args.model_repository)
        graphs_doc = None
        if args.device == "cuda":
            print("2b/4 the same with CUDA graphs", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory(prefix="ember-graphs-") as folder:
                copy = write_graphs_copy(args.model_repository, Path(folder))
                graphs_doc = run_bench(plan, args.device, copy)
        rates = throughput(doc, graphs_doc)
        print("3/4 copies", file=sys.stderr, flush=True)
        copies = copy_rates(args.device, plan.copy_repeats)
        print("4/4 weights onto the device", file=sys.stderr, flush=True)
        loads = weights_loads(args.device, plan.weights_bytes)
    except CheckError as exc:
        print(f"gpu_check: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(args.device, matches, rates, copies, loads))
    report = {
        "schema": "ember-gpu-check/1",
        "date": started.isoformat(timespec="seconds"),
        "device": args.device,
        "quick": args.quick,
        "machine": doc.get("machine"),
        "outputs_match": [asdict(m) for m in matches],
        "throughput": [asdict(r) for r in rates],
        "copies": [asdict(c) for c in copies],
        "weights": [{**asdict(w), "gb_per_s": w.gb_per_s} for w in loads],
        "bench": doc,
        "bench_cuda_graphs": graphs_doc,
    }
    args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(m.ok for m in matches) and all(w.identical for w in loads) else 1


if __name__ == "__main__":
    sys.exit(main())
