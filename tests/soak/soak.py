"""Soak: a bounded run of mixed traffic through a real `ember activator` with scale-to-zero on,
sampling every process it runs, and a verdict on whether anything grows without bound.

The activator serves a repository written to a temporary folder with two models:

- `mlp` (the warm model): traffic never pauses, so its one replica lives the whole run and,
  with the activator, is what the growth check fits;
- `identity` (the bursty model): traffic comes in bursts with idle gaps longer than its stable
  window, so it goes 1 -> 0 -> 1 again and again; requests that arrive while it is at zero wait
  for the cold start and must succeed.

Each worker thread sends a weighted mix of KServe V1 JSON, V2 JSON, V2 binary (Triton's
extension) and V2 gRPC, good and bad: a good request must succeed with the right answer, a bad
one must get exactly the 4xx (or gRPC code) it deserves. During the bursty model's gaps its
workers send only what the activator answers itself (unknown models, model readiness), which
must not wake it.

Every few seconds (on a grid that divides the burst period) a sampler reads each process (the
activator and its child replicas, found with psutil and told apart by pid): RSS, open file
descriptors, threads, and `ember_asyncio_tasks` from the process's own /metrics, the counts as
the least of three quick readings so that requests in flight add little. The verdict fits a
least-squares slope over the second half of the run (the first half is warm-up: lazily grown
pools, caches, allocator arenas), phase-aligned to the burst period, for each series of each
long-lived process, against the limits in LIMITS; it also fails on any good request that
failed, any bad one that got another answer than its own, a warm replica that was replaced,
a bursty model that never reached zero, and anything the activator logged above info.

    python tests/soak/soak.py --seconds 600 --report /tmp/soak-600.json

Importable: `run(Options(...))` returns the report that the CLI writes; tests/soak/test_soak.py
is the CI run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"

WARM = "mlp"
BURSTY = "identity"
MLP_WIDTH = 784
MLP_CLASSES = 10
# Any good request may have to wait for a cold start on a crowded machine.
REQUEST_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 45.0


@dataclass(frozen=True, slots=True)
class Options:
    seconds: float = 60.0
    workers: int = 8  # half send to the warm model, half to the bursty one
    # None: every 2 s, or more rarely on long runs so a report holds a few hundred samples.
    sample_every_s: float | None = None
    burst_s: float = 6.0
    # Longer than the stable window plus a scaler tick and the replica's exit, so the bursty
    # model is at zero for a few seconds of every gap.
    gap_s: float = 12.0
    stable_window_s: float = 6.0
    container_concurrency: int = 2
    # Pause after each request, per worker: bounds the request rate (8 workers ~ 100/s at
    # most) so the machine, not the client, is what is measured.
    think_s: float = 0.05
    # Share of HTTP requests sent with `Connection: close`, and of gRPC calls on a channel of
    # their own: connection set-up and tear-down is where descriptors leak.
    fresh_connection_share: float = 0.1
    seed: int = 1
    run_dir: Path | None = None  # None: a temporary folder, removed unless the run failed
    verbose: bool = False

    @property
    def period_s(self) -> float:
        return self.burst_s + self.gap_s

    @property
    def interval_s(self) -> float:
        """A whole fraction of the burst period, so samples fall on the same phases each
        period (see `aligned_slope`)."""
        wanted = self.sample_every_s or max(2.0, self.seconds / 150.0)
        return self.period_s / max(1, round(self.period_s / wanted))


# --- growth limits ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """A series grows without bound when its fitted slope over the second half is above
    `per_min`, is significant (SIGNIFICANCE standard errors above zero) *and* the rise that
    slope makes over the window is above `floor`: over a 30 s window one lazily started thread
    or one more allocator arena reads as a steep and clean slope, and is not a leak. `cap`
    bounds the last value of any process of that kind, whatever its slope."""

    per_min: float
    floor: float
    cap_activator: float
    cap_replica: float
    unit: str


# Rationale for the slopes: a replica is meant to run for days. 2 MiB/min is ~2.8 GiB a day,
# enough to get a pod with a few GiB of limit OOM-killed within a day, and below it allocator
# noise dominates a few-minute window; 1 fd/min reaches the default soft limit of 1024 in
# under a day; 0.5 thread/min is 720 threads a day; under steady traffic the number of live
# asyncio tasks is steady, so more than 1 a minute is a task kept per request or per replica.
# The caps are several times the values this machine shows (the activator ~85 MiB, a replica
# ~260-290 MiB with torch, 20-40 fds, 9-13 threads, 10-30 tasks).
LIMITS: dict[str, Limit] = {
    "rss_mib": Limit(per_min=2.0, floor=4.0, cap_activator=512, cap_replica=2048, unit="MiB"),
    "fds": Limit(per_min=1.0, floor=2.0, cap_activator=512, cap_replica=512, unit="fds"),
    "threads": Limit(per_min=0.5, floor=2.0, cap_activator=128, cap_replica=256, unit="threads"),
    "tasks": Limit(per_min=1.0, floor=3.0, cap_activator=500, cap_replica=500, unit="tasks"),
}
METRICS = tuple(LIMITS)
# A slope is growth only when it is this many standard errors above zero: in a 30 s window
# the in-flight requests alone make the task and descriptor counts jitter by a few, which a
# short fit reads as +-5 a minute; the 10-minute run's errors are a tenth of that.
SIGNIFICANCE = 3.0


# --- the model repository ------------------------------------------------------------------------


def _scaling(cc: int, window: float) -> str:
    # max_replicas = 1: the warm model keeps one long-lived replica to fit, and the bursty one
    # goes exactly 1 -> 0 -> 1; both queue in the activator beyond `cc` in flight.
    return (
        "\n[scaling]\n"
        f"stable_window_s = {window}\n"
        "scale_to_zero_grace_s = 0\n"
        f"container_concurrency = {cc}\n"
        "max_replicas = 1\n"
    )


def write_repository(root: Path, options: Options) -> Path:
    """Copies of models/identity and models/mlp (weights included) with a `[scaling]` section."""
    weights = MODELS / "mlp" / "model.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: run `make models` first")
    root.mkdir(parents=True, exist_ok=True)
    scaling = _scaling(options.container_concurrency, options.stable_window_s)
    for name, files in ((BURSTY, ("model.py",)), (WARM, ("model.pt",))):
        folder = root / name
        folder.mkdir()
        for file in files:
            shutil.copyfile(MODELS / name / file, folder / file)
        toml = (MODELS / name / "model.toml").read_text()
        (folder / "model.toml").write_text(toml.rstrip() + "\n" + scaling)
    return root


# --- the activator process ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ember_executable() -> str:
    found = shutil.which("ember", path=str(Path(sys.executable).parent)) or shutil.which("ember")
    if found is None:
        raise FileNotFoundError("the `ember` console script is not installed (pip install -e .)")
    return found


@dataclass
class ActivatorProcess:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    @classmethod
    def start(cls, repository: Path, run_dir: Path) -> ActivatorProcess:
        """Started and answering /v2/health/ready; retried on another port if one was taken."""
        last = ""
        for attempt in range(3):
            http_port, grpc_port = free_port(), free_port()
            log_path = run_dir / f"activator-{attempt}.log"
            argv = [
                ember_executable(), "activator",
                "--model-repository", str(repository),
                "--host", "127.0.0.1",
                "--http_port", str(http_port),
                "--grpc_port", str(grpc_port),
                "--run-dir", str(run_dir / "replicas"),
                # Short ticks and probes: scale-to-zero and wake-up within seconds.
                "--tick-seconds", "0.5",
                "--probe-interval", "0.05",
                "--log-format", "json",
            ]  # fmt: skip
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=run_dir,
                    # Its own group: whatever is left of it can be killed at once.
                    start_new_session=True,
                )
            activator = cls(process, http_port, grpc_port, log_path)
            if activator._wait_ready():
                return activator
            last = activator.log_tail()
            activator.stop()
        raise RuntimeError(f"the activator did not get ready; its log:\n{last}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT_S
        with httpx.Client(base_url=self.url, timeout=2.0) as client:
            while time.monotonic() < deadline and self.process.poll() is None:
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/v2/health/ready").status_code == 200:
                        return True
                time.sleep(0.1)
        return False

    def stop(self) -> int | None:
        """SIGTERM (the activator drains and stops its replicas), then SIGKILL to the group."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(10)
            return None


# --- traffic ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    detail: str  # the status (HTTP code or gRPC code), and on failure why
    # Answered after waiting for a replica to start (the activator's x-ember-cold-start-ms).
    cold: bool = False


class Client:
    """One worker's connections: a keep-alive HTTP client and a gRPC channel."""

    def __init__(self, activator: ActivatorProcess, rng: random.Random, fresh: float) -> None:
        self.url = activator.url
        self.grpc_url = f"127.0.0.1:{activator.grpc_port}"
        self.http = httpx.Client(base_url=self.url, timeout=httpx.Timeout(REQUEST_TIMEOUT_S))
        self.grpc = grpcclient.InferenceServerClient(self.grpc_url)
        self.rng = rng
        self.fresh = fresh

    def close(self) -> None:
        self.http.close()
        self.grpc.close()

    def post(self, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
        if self.rng.random() < self.fresh:
            headers = {**headers, "connection": "close"}
        return self.http.post(path, content=content, headers=headers)

    @contextlib.contextmanager
    def grpc_channel(self) -> Iterator[Any]:
        if self.rng.random() < self.fresh:
            own = grpcclient.InferenceServerClient(self.grpc_url)
            try:
                yield own
            finally:
                own.close()
        else:
            yield self.grpc


def _json(doc: object) -> tuple[bytes, dict[str, str]]:
    return json.dumps(doc).encode(), {"content-type": "application/json"}


def _rows(rng: random.Random) -> int:
    return rng.randint(1, 4)


def _mlp_input(rng: random.Random) -> np.ndarray:
    return np.asarray(
        [[rng.random() for _ in range(MLP_WIDTH)] for _ in range(_rows(rng))], dtype=np.float32
    )


def _identity_input(rng: random.Random) -> np.ndarray:
    width = rng.randint(1, 8)
    return np.asarray(
        [[rng.randint(-1000, 1000) for _ in range(width)] for _ in range(_rows(rng))],
        dtype=np.int32,
    )


# Per model: the input tensor's name and datatype, how to make data, the output's name, and
# whether an output of that shape is right for the input.
@dataclass(frozen=True, slots=True)
class ModelIO:
    input: str
    datatype: str
    output: str
    make: Callable[[random.Random], np.ndarray]
    check: Callable[[np.ndarray, np.ndarray], bool]


def _mlp_check(x: np.ndarray, y: np.ndarray) -> bool:
    return y.shape == (x.shape[0], MLP_CLASSES) and bool(np.isfinite(y).all())


def _identity_check(x: np.ndarray, y: np.ndarray) -> bool:
    return y.shape == x.shape and bool((y == x).all())


IO: dict[str, ModelIO] = {
    WARM: ModelIO("input", "FP32", "output", _mlp_input, _mlp_check),
    BURSTY: ModelIO("INPUT_INT32", "INT32", "OUTPUT_INT32", _identity_input, _identity_check),
}


def _http_outcome(response: httpx.Response, expected: int, good: Callable[[Any], bool]) -> Outcome:
    status = response.status_code
    if status != expected:
        return Outcome(False, f"{status} (expected {expected}): {response.text[:300]}")
    if expected == 200:
        try:
            right = good(response)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            return Outcome(False, f"200 with a wrong answer ({exc!r}): {response.text[:300]}")
        if not right:
            return Outcome(False, f"200 with a wrong answer: {response.text[:300]}")
    elif not response.headers.get("content-type", "").startswith("application/json"):
        return Outcome(False, f"{status} without a JSON error body: {response.text[:300]}")
    return Outcome(True, str(status), cold="x-ember-cold-start-ms" in response.headers)


def _grpc_outcome(call: Callable[[], Any], expected: str, good: Callable[[Any], bool]) -> Outcome:
    try:
        result = call()
    except InferenceServerException as exc:
        code = str(exc.status()).removeprefix("StatusCode.")
        if code == expected:
            return Outcome(True, code)
        return Outcome(False, f"{code} (expected {expected}): {exc.message()}")
    if expected != "OK":
        return Outcome(False, f"OK (expected {expected})")
    if not good(result):
        return Outcome(False, "OK with a wrong answer")
    return Outcome(True, "OK")


def v1_good(c: Client, model: str) -> Outcome:
    io = IO[model]
    x = io.make(c.rng)
    if model == BURSTY:
        # identity has several inputs: V1 instances are objects keyed by input name.
        instances: list[Any] = [{io.input: row} for row in x.tolist()]
    else:
        instances = x.tolist()
    body, headers = _json({"instances": instances})
    response = c.post(f"/v1/models/{model}:predict", body, headers)
    return _http_outcome(
        response,
        200,
        lambda r: io.check(x, np.asarray(r.json()["predictions"], dtype=x.dtype)),
    )


def _v2_doc(io: ModelIO, x: np.ndarray, datatype: str | None = None) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": io.input,
                "datatype": datatype or io.datatype,
                "shape": list(x.shape),
                "data": x.reshape(-1).tolist(),
            }
        ]
    }


def _v2_output(io: ModelIO, response: httpx.Response, dtype: Any) -> np.ndarray:
    out = next(o for o in response.json()["outputs"] if o["name"] == io.output)
    return np.asarray(out["data"], dtype=dtype).reshape(out["shape"])


def v2_json_good(c: Client, model: str) -> Outcome:
    io = IO[model]
    x = io.make(c.rng)
    body, headers = _json(_v2_doc(io, x))
    response = c.post(f"/v2/models/{model}/infer", body, headers)
    return _http_outcome(response, 200, lambda r: io.check(x, _v2_output(io, r, x.dtype)))


def _binary_request(io: ModelIO, x: np.ndarray) -> tuple[bytes, int]:
    tensor = httpclient.InferInput(io.input, list(x.shape), io.datatype)
    tensor.set_data_from_numpy(x, binary_data=True)
    wanted = httpclient.InferRequestedOutput(io.output, binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [tensor], outputs=[wanted]
    )
    return bytes(body), int(json_size)


def v2_binary_good(c: Client, model: str) -> Outcome:
    io = IO[model]
    x = io.make(c.rng)
    body, json_size = _binary_request(io, x)
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(json_size),
    }
    response = c.post(f"/v2/models/{model}/infer", body, headers)

    def good(r: httpx.Response) -> bool:
        length = r.headers.get("inference-header-content-length")
        result = httpclient.InferenceServerClient.parse_response_body(
            r.content, header_length=int(length) if length is not None else None
        )
        return io.check(x, result.as_numpy(io.output))

    return _http_outcome(response, 200, good)


def _grpc_infer(
    c: Client, model: str, x: np.ndarray, datatype: str, name: str | None = None
) -> Callable[[], Any]:
    io = IO.get(model, IO[WARM])
    tensor = grpcclient.InferInput(io.input, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)

    def call() -> Any:
        with c.grpc_channel() as channel:
            return channel.infer(name or model, [tensor], client_timeout=REQUEST_TIMEOUT_S)

    return call


def grpc_good(c: Client, model: str) -> Outcome:
    io = IO[model]
    x = io.make(c.rng)
    return _grpc_outcome(
        _grpc_infer(c, model, x, io.datatype), "OK", lambda r: io.check(x, r.as_numpy(io.output))
    )


def _no_check(_: Any) -> bool:
    return True


def v2_wrong_datatype(c: Client, model: str) -> Outcome:
    io = IO[model]
    x = io.make(c.rng)
    wrong = "INT32" if io.datatype == "FP32" else "FP32"
    body, headers = _json(_v2_doc(io, x.astype(np.int32), wrong))
    return _http_outcome(c.post(f"/v2/models/{model}/infer", body, headers), 400, _no_check)


def v2_bad_shape(c: Client, model: str) -> Outcome:
    io = IO[model]
    x = io.make(c.rng)
    doc = _v2_doc(io, x)
    # One element more declared than sent.
    doc["inputs"][0]["shape"] = [x.shape[0], x.shape[1] + 1]
    body, headers = _json(doc)
    return _http_outcome(c.post(f"/v2/models/{model}/infer", body, headers), 400, _no_check)


def v2_malformed_json(c: Client, model: str) -> Outcome:
    headers = {"content-type": "application/json"}
    response = c.post(f"/v2/models/{model}/infer", b'{"inputs": [{"name": ', headers)
    return _http_outcome(response, 400, _no_check)


def v2_binary_short(c: Client, model: str) -> Outcome:
    io = IO[model]
    body, json_size = _binary_request(io, io.make(c.rng))
    headers = {
        "content-type": "application/octet-stream",
        # The JSON header is said to be longer than the whole body.
        "inference-header-content-length": str(len(body) + json_size),
    }
    return _http_outcome(c.post(f"/v2/models/{model}/infer", body, headers), 400, _no_check)


def v1_malformed_json(c: Client, model: str) -> Outcome:
    headers = {"content-type": "application/json"}
    response = c.post(f"/v1/models/{model}:predict", b'{"instances": [[1, 2', headers)
    return _http_outcome(response, 400, _no_check)


def v1_empty_instances(c: Client, model: str) -> Outcome:
    body, headers = _json({"instances": []})
    return _http_outcome(c.post(f"/v1/models/{model}:predict", body, headers), 400, _no_check)


def grpc_wrong_datatype(c: Client, model: str) -> Outcome:
    io = IO[model]
    x = io.make(c.rng)
    if io.datatype == "FP32":
        call = _grpc_infer(c, model, x.astype(np.int32), "INT32")
    else:
        call = _grpc_infer(c, model, x.astype(np.float32), "FP32")
    return _grpc_outcome(call, "INVALID_ARGUMENT", _no_check)


def grpc_bad_shape(c: Client, model: str) -> Outcome:
    io = IO[model]
    x = io.make(c.rng)
    # mlp: a well-formed tensor of the wrong width; identity: rank 1 where it takes rank 2.
    x = x[:, : MLP_WIDTH - 1] if model == WARM else x.reshape(-1)
    return _grpc_outcome(_grpc_infer(c, model, x, io.datatype), "INVALID_ARGUMENT", _no_check)


# Unknown models and model readiness: answered by the activator itself, never woken.
def v2_unknown_model(c: Client, model: str) -> Outcome:
    body, headers = _json(_v2_doc(IO[WARM], np.zeros((1, 2), np.float32)))
    response = c.post(f"/v2/models/no-such-{model}/infer", body, headers)
    return _http_outcome(response, 404, _no_check)


def v1_unknown_model(c: Client, model: str) -> Outcome:
    body, headers = _json({"instances": [[1.0]]})
    response = c.post(f"/v1/models/no-such-{model}:predict", body, headers)
    return _http_outcome(response, 404, _no_check)


def grpc_unknown_model(c: Client, model: str) -> Outcome:
    x = np.zeros((1, 2), np.float32)
    call = _grpc_infer(c, model, x, "FP32", name=f"no-such-{model}")
    return _grpc_outcome(call, "NOT_FOUND", _no_check)


def model_ready(c: Client, model: str) -> Outcome:
    response = c.http.get(f"/v2/models/{model}/ready")
    return _http_outcome(response, 200, lambda r: r.json().get("ready") is True)


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    good: bool
    send: Callable[[Client, str], Outcome]
    weight: float


# Good requests are three quarters of the traffic, spread evenly over the four protocols.
BUSY_KINDS: tuple[Kind, ...] = (
    Kind("v1", True, v1_good, 18),
    Kind("v2_json", True, v2_json_good, 19),
    Kind("v2_binary", True, v2_binary_good, 19),
    Kind("grpc", True, grpc_good, 19),
    Kind("v2_wrong_datatype", False, v2_wrong_datatype, 3),
    Kind("v2_bad_shape", False, v2_bad_shape, 3),
    Kind("v2_malformed_json", False, v2_malformed_json, 3),
    Kind("v2_binary_short_body", False, v2_binary_short, 2),
    Kind("v1_malformed_json", False, v1_malformed_json, 2),
    Kind("v1_empty_instances", False, v1_empty_instances, 2),
    Kind("grpc_wrong_datatype", False, grpc_wrong_datatype, 3),
    Kind("grpc_bad_shape", False, grpc_bad_shape, 3),
    Kind("v2_unknown_model", False, v2_unknown_model, 1),
    Kind("v1_unknown_model", False, v1_unknown_model, 1),
    Kind("grpc_unknown_model", False, grpc_unknown_model, 1),
    Kind("model_ready", True, model_ready, 1),
)
IDLE_KINDS: tuple[Kind, ...] = (
    Kind("v2_unknown_model", False, v2_unknown_model, 1),
    Kind("v1_unknown_model", False, v1_unknown_model, 1),
    Kind("grpc_unknown_model", False, grpc_unknown_model, 1),
    Kind("model_ready", True, model_ready, 1),
)
IDLE_THINK_S = 0.25


@dataclass
class Tally:
    """Per (model, kind): how many passed and failed, and the first failures in full."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, model: str, kind: Kind, outcome: Outcome, t: float, seconds: float) -> None:
        key = f"{model}/{kind.name}"
        with self.lock:
            row = self.counts.setdefault(
                key, {"ok": 0, "failed": 0, "cold": 0, "good": int(kind.good)}
            )
            row["ok" if outcome.ok else "failed"] += 1
            row["cold"] += int(outcome.cold)
            if not outcome.ok and len(self.failures) < 200:
                self.failures.append(
                    {
                        "t": round(t, 2),
                        "request": key,
                        "good": kind.good,
                        "seconds": round(seconds, 3),
                        "detail": outcome.detail,
                    }
                )

    def summary(self) -> dict[str, int]:
        with self.lock:
            rows = list(self.counts.values())
        good = [r for r in rows if r["good"]]
        bad = [r for r in rows if not r["good"]]
        return {
            "requests": sum(r["ok"] + r["failed"] for r in rows),
            "good_ok": sum(r["ok"] for r in good),
            "good_failed": sum(r["failed"] for r in good),
            "bad_ok": sum(r["ok"] for r in bad),
            "bad_failed": sum(r["failed"] for r in bad),
            "good_after_cold_start": sum(r["cold"] for r in good),
        }


def _pick(rng: random.Random, kinds: tuple[Kind, ...]) -> Kind:
    return rng.choices(kinds, weights=[k.weight for k in kinds])[0]


def worker(
    activator: ActivatorProcess,
    model: str,
    options: Options,
    seed: int,
    started: float,
    stop: threading.Event,
    tally: Tally,
) -> None:
    rng = random.Random(seed)
    client = Client(activator, rng, options.fresh_connection_share)
    period = options.burst_s + options.gap_s
    try:
        while not stop.is_set():
            t = time.monotonic() - started
            bursting = model == WARM or (t % period) < options.burst_s
            kind = _pick(rng, BUSY_KINDS if bursting else IDLE_KINDS)
            begun = time.monotonic()
            try:
                outcome = kind.send(client, model)
            except Exception as exc:  # a transport error is a failed request, not a dead worker
                outcome = Outcome(False, f"raised {exc!r}")
            tally.add(model, kind, outcome, t, time.monotonic() - begun)
            stop.wait(options.think_s if bursting else IDLE_THINK_S)
    finally:
        client.close()


# --- sampling ------------------------------------------------------------------------------------


def _gauges(url: str, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """{gauge: {its model_name label, "" when none: value}} for the gauges named, from /metrics."""
    response = httpx.get(f"{url}/metrics", timeout=5.0)
    response.raise_for_status()
    found: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(response.text):
        if family.name in names:
            for sample in family.samples:
                found.setdefault(family.name, {})[sample.labels.get("model_name", "")] = float(
                    sample.value
                )
    return found


def _flag(cmdline: list[str], flag: str) -> str | None:
    with contextlib.suppress(ValueError, IndexError):
        return cmdline[cmdline.index(flag) + 1]
    return None


@dataclass
class Series:
    """One process's samples: times (seconds since traffic began) and values per metric."""

    role: str  # activator | replica
    model: str | None
    pid: int
    t: list[float] = field(default_factory=list)
    values: dict[str, list[float | None]] = field(default_factory=lambda: {m: [] for m in METRICS})

    @property
    def name(self) -> str:
        return "activator" if self.role == "activator" else f"{self.model} replica"


def _read(proc: psutil.Process, url: str | None) -> dict[str, float | None]:
    with proc.oneshot():
        values: dict[str, float | None] = {
            "rss_mib": proc.memory_info().rss / 2**20,
            "fds": float(proc.num_fds()),
            "threads": float(proc.num_threads()),
        }
    values["tasks"] = None
    if url is not None:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            tasks = _gauges(url, ("ember_asyncio_tasks",)).get("ember_asyncio_tasks")
            if tasks:
                values["tasks"] = next(iter(tasks.values()))
    return values


_READINGS = 3
_READING_GAP_S = 0.05


class Sampler:
    """Samples every process of the run each `interval` seconds on a thread of its own."""

    def __init__(self, activator: ActivatorProcess, interval: float, started: float) -> None:
        self.activator = activator
        self.interval = interval
        self.started = started
        self.series: dict[int, Series] = {}
        # (t, {model: ready replicas}) from the activator's own gauge: the 1 -> 0 -> 1 timeline.
        self.ready: list[tuple[float, dict[str, float]]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="soak-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the last value, after the traffic stopped

    def _loop(self) -> None:
        # On a fixed grid from the start of the traffic, not interval after interval: a late
        # sample must not shift the phase of every one after it.
        k = 0
        while not self._stop.is_set():
            self.sample()
            k = max(k + 1, int((time.monotonic() - self.started) / self.interval) + 1)
            self._stop.wait(max(0.0, self.started + k * self.interval - time.monotonic()))

    def sample(self) -> None:
        t = time.monotonic() - self.started
        try:
            root = psutil.Process(self.activator.pid)
            procs: list[tuple[psutil.Process, str, str | None, str | None]] = [
                (root, "activator", None, self.activator.url)
            ]
            for child in root.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    cmdline = child.cmdline()
                    port = _flag(cmdline, "--http_port")
                    url = f"http://127.0.0.1:{port}" if port else None
                    procs.append((child, "replica", _flag(cmdline, "--model"), url))
        except psutil.Error as exc:
            self.errors.append(f"t={t:.1f}: activator: {exc!r}")
            return
        # Requests in flight hold tasks and descriptors, so any one reading of those is the
        # process's baseline plus however many requests it holds right then; the least of a
        # few quick readings is close to the baseline, which is where a leak shows.
        readings: dict[int, dict[str, float | None]] = {}
        for round_ in range(_READINGS):
            if round_:
                time.sleep(_READING_GAP_S)
            for proc, _, _, url in procs:
                try:
                    values = _read(proc, url)
                except psutil.Error:
                    continue  # a replica that exited between the listing and the read
                seen = readings.setdefault(proc.pid, values)
                for metric in ("fds", "threads", "tasks"):
                    low = [v for v in (seen[metric], values[metric]) if v is not None]
                    seen[metric] = min(low) if low else None
                seen["rss_mib"] = values["rss_mib"]
        for proc, role, model, _ in procs:
            if proc.pid not in readings:
                continue
            values = readings[proc.pid]
            series = self.series.get(proc.pid)
            if series is None:
                series = self.series[proc.pid] = Series(role, model, proc.pid)
            series.t.append(round(t, 2))
            for metric in METRICS:
                value = values[metric]
                series.values[metric].append(None if value is None else round(value, 3))
        with contextlib.suppress(httpx.HTTPError, ValueError):
            ready = _gauges(self.activator.url, ("ember_activator_ready_replicas",))
            self.ready.append((round(t, 2), ready.get("ember_activator_ready_replicas", {})))


# --- the verdict --------------------------------------------------------------------------------


def slope(t: list[float], y: list[float]) -> float:
    """Least-squares slope of y over t, per second."""
    if len(t) < 2:
        return 0.0
    tt = np.asarray(t, dtype=float)
    yy = np.asarray(y, dtype=float)
    dt = tt - tt.mean()
    denominator = float((dt * dt).sum())
    return float((dt * (yy - yy.mean())).sum() / denominator) if denominator else 0.0


def aligned_slope(
    t: list[float], y: list[float], period: float, interval: float
) -> tuple[float, float] | None:
    """Least-squares slope of y over t with one intercept per phase of the burst period, and
    its standard error (both per second).

    The bursty model's replica holds connections and tasks in the activator for each burst:
    a plain fit over a window that starts in a gap and ends in a burst reads that as growth
    (or shrinkage) of tens per minute. Comparing only samples taken at the same phase, one or
    more periods apart, removes anything that repeats with the period and keeps what grows
    from one period to the next. None when no phase was sampled twice in the window."""
    slots: dict[int, list[tuple[float, float]]] = {}
    n = max(1, round(period / interval))
    for ti, yi in zip(t, y, strict=True):
        slots.setdefault(round((ti % period) / interval) % n, []).append((ti, yi))
    groups = [
        (np.asarray([p[0] for p in points]), np.asarray([p[1] for p in points]))
        for points in slots.values()
        if len(points) >= 2
    ]
    dts = [tt - tt.mean() for tt, _ in groups]
    dys = [yy - yy.mean() for _, yy in groups]
    denominator = float(sum((dt * dt).sum() for dt in dts))
    if not denominator:
        return None
    b = float(sum((dt * dy).sum() for dt, dy in zip(dts, dys, strict=True))) / denominator
    residual = float(sum(((dy - b * dt) ** 2).sum() for dt, dy in zip(dts, dys, strict=True)))
    # One intercept per phase and the slope are fitted.
    freedom = sum(len(dt) for dt in dts) - len(dts) - 1
    error = float(np.sqrt(residual / freedom / denominator)) if freedom > 0 else float("inf")
    return b, error


def fit(series: Series, metric: str, since: float, options: Options) -> dict[str, Any] | None:
    """First, last and max over the whole run; `mid`, the first value at or after `since`; the
    phase-aligned slope per minute over t >= since (and the plain one, for the record)."""
    points = [(t, v) for t, v in zip(series.t, series.values[metric], strict=True) if v is not None]
    if not points:
        return None
    half = [(t, v) for t, v in points if t >= since]
    ts, ys = [t for t, _ in half], [v for _, v in half]
    aligned = aligned_slope(ts, ys, options.period_s, options.interval_s)
    slope_s, error_s = aligned if aligned is not None else (None, None)
    window_s = (ts[-1] - ts[0]) if len(ts) > 1 else 0.0
    return {
        "first": points[0][1],
        "mid": ys[0] if ys else None,
        "last": points[-1][1],
        "max": max(v for _, v in points),
        "slope_per_min": None if slope_s is None else round(slope_s * 60.0, 4),
        "stderr_per_min": None if error_s is None else round(error_s * 60.0, 4),
        "plain_slope_per_min": round(slope(ts, ys) * 60.0, 4),
        "window_s": round(window_s, 1),
        "points": len(half),
    }


def _judge(
    name: str, role: str, metric: str, figures: dict[str, Any], long_lived: bool
) -> list[str]:
    limit = LIMITS[metric]
    problems = []
    cap = limit.cap_activator if role == "activator" else limit.cap_replica
    if figures["last"] > cap:
        problems.append(f"{name} {metric}: last value {figures['last']} is above the cap {cap}")
    if long_lived:
        per_min = figures["slope_per_min"]
        if per_min is None:
            problems.append(
                f"{name} {metric}: no phase of the burst period sampled twice in the second "
                f"half ({figures['points']} samples over {figures['window_s']} s)"
            )
            return problems
        rise = per_min * figures["window_s"] / 60.0
        error = figures.get("stderr_per_min") or 0.0
        if per_min > limit.per_min and rise > limit.floor and per_min > SIGNIFICANCE * error:
            problems.append(
                f"{name} {metric}: grows {per_min:.3f} +- {error:.3f} {limit.unit}/min over the "
                f"second half (limit {limit.per_min}), +{rise:.2f} over {figures['window_s']} s "
                f"(floor {limit.floor})"
            )
    return problems


def verdict(sampler: Sampler, tally: Tally, duration: float, options: Options) -> dict[str, Any]:
    since = duration / 2.0
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    activator = sampler.series.get(sampler.activator.pid)
    warm = [s for s in sampler.series.values() if s.role == "replica" and s.model == WARM]
    bursty = [s for s in sampler.series.values() if s.role == "replica" and s.model == BURSTY]
    if activator is None:
        problems.append("the activator was never sampled")
    if len(warm) != 1:
        # The warm model's traffic never pauses: another pid means its replica died or the
        # model scaled to zero under load.
        pids = [s.pid for s in warm]
        problems.append(f"the warm model's replica was not one process: pids {pids}")
    long_lived = [s for s in (activator, *warm[:1]) if s is not None]
    for series in long_lived:
        for metric in METRICS:
            figures = fit(series, metric, since, options)
            if figures is None:
                problems.append(f"{series.name} {metric}: no samples")
                continue
            rows.append({"process": series.name, "pid": series.pid, "metric": metric, **figures})
            problems += _judge(series.name, series.role, metric, figures, long_lived=True)
    # The bursty model's replicas live one burst each: only the caps apply; the row shows the
    # first and last generation's peaks, so growth from one generation to the next is visible.
    for metric in METRICS:
        peaks = [
            max(v for v in s.values[metric] if v is not None)
            for s in sorted(bursty, key=lambda s: s.t[0])
            if any(v is not None for v in s.values[metric])
        ]
        if peaks:
            figures = {
                "first": peaks[0], "mid": None, "last": peaks[-1], "max": max(peaks),
                "slope_per_min": None, "window_s": None, "points": len(peaks),
            }  # fmt: skip
            name = f"{BURSTY} replicas (x{len(bursty)})"
            rows.append({"process": name, "pid": None, "metric": metric, **figures})
            problems += _judge(name, "replica", metric, figures, long_lived=False)
    counts = tally.summary()
    if counts["good_failed"]:
        problems.append(f"{counts['good_failed']} good requests failed")
    if counts["bad_failed"]:
        problems.append(f"{counts['bad_failed']} bad requests got the wrong answer")
    zero_gaps = _zero_gaps(sampler.ready)
    if duration >= 2 * options.period_s and zero_gaps < 1:
        problems.append(f"{BURSTY} never went to zero (ready replicas: {sampler.ready[-20:]})")
    return {
        "passed": not problems,
        "problems": problems,
        "rows": rows,
        "requests": counts,
        "bursty_replicas": len(bursty),
        "bursty_zero_gaps": zero_gaps,
    }


_WORSE_THAN_INFO = ("warning", "error", "critical")


def read_logs(run_dir: Path) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Lines per level in each JSON log of the run (activator and replicas), and what the
    activator logged above info or a replica at error and above: a replica that died unasked,
    a drain that timed out, a start that failed."""
    levels: dict[str, dict[str, int]] = {}
    notable: list[str] = []
    for path in sorted(run_dir.rglob("*.log")):
        counts: dict[str, int] = {}
        worst = _WORSE_THAN_INFO if path.name.startswith("activator") else _WORSE_THAN_INFO[1:]
        for line in path.read_text(errors="replace").splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue  # gRPC's own C-core lines are not JSON
            if not isinstance(doc, dict):
                continue
            level = str(doc.get("level"))
            counts[level] = counts.get(level, 0) + 1
            if level in worst and len(notable) < 20:
                notable.append(f"{path.name}: {line[:400]}")
        levels[path.name] = counts
    return levels, notable


def _zero_gaps(ready: list[tuple[float, dict[str, float]]]) -> int:
    """How many times the bursty model was seen at 0 ready replicas after having had one."""
    gaps, was_up = 0, False
    for _, models in ready:
        value = models.get(BURSTY)
        if value is None:
            continue
        if value >= 1:
            was_up = True
        elif was_up:
            gaps, was_up = gaps + 1, False
    return gaps


def table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    header = ("process", "metric", "first", "mid", "last", "max", "slope/min", "+-")
    lines = [header] + [
        (
            r["process"],
            r["metric"],
            cell(r["first"]),
            cell(r["mid"]),
            cell(r["last"]),
            cell(r["max"]),
            cell(r["slope_per_min"]),
            cell(r.get("stderr_per_min")),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    # Names left-aligned, figures right-aligned.
    out = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


# --- the run ------------------------------------------------------------------------------------


def run(options: Options) -> dict[str, Any]:
    """Start, drive, sample, stop; the report (verdict included) as a JSON-able dict."""
    owned = options.run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="ember-soak-")) if owned else options.run_dir
    assert run_dir is not None
    run_dir.mkdir(parents=True, exist_ok=True)
    repository = write_repository(run_dir / "repository", options)
    activator = ActivatorProcess.start(repository, run_dir)
    stop = threading.Event()
    tally = Tally()
    load_before = os.getloadavg()
    started = time.monotonic()
    sampler = Sampler(activator, options.interval_s, started)
    threads: list[threading.Thread] = []
    exit_code: int | None = None
    try:
        sampler.start()
        for i in range(options.workers):
            model = WARM if i % 2 == 0 else BURSTY
            thread = threading.Thread(
                target=worker,
                args=(activator, model, options, options.seed * 1000 + i, started, stop, tally),
                name=f"soak-{model}-{i}",
                daemon=True,
            )
            thread.start()
            threads.append(thread)
        while time.monotonic() - started < options.seconds:
            if activator.process.poll() is not None:
                break
            time.sleep(0.5)
            if options.verbose:
                elapsed = time.monotonic() - started
                print(f"\r{elapsed:6.0f} s {tally.summary()}", end="", file=sys.stderr)
        duration = time.monotonic() - started
        stop.set()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT_S + 10)
        sampler.stop()
        judged = verdict(sampler, tally, duration, options)
        if activator.process.poll() is not None:
            judged["passed"] = False
            judged["problems"].insert(0, f"the activator exited early ({activator.process.poll()})")
    finally:
        stop.set()
        exit_code = activator.stop()
    if exit_code != 0:
        judged["passed"] = False
        judged["problems"].append(f"the activator did not stop cleanly on SIGTERM ({exit_code})")
    log_levels, notable = read_logs(run_dir)
    if notable:
        judged["passed"] = False
        judged["problems"] += [f"logged: {line}" for line in notable]
    report: dict[str, Any] = {
        "options": {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(options).items()
        },
        "interval_s": options.interval_s,
        "duration_s": round(duration, 1),
        "limits": {k: dataclasses.asdict(v) for k, v in LIMITS.items()},
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_before": load_before,
            "load_avg_after": os.getloadavg(),
        },
        **judged,
        "table": table(judged["rows"]),
        "by_request": tally.counts,
        "failures": tally.failures,
        "sampler_errors": sampler.errors[:50],
        "log_levels": log_levels,
        "ready_replicas": sampler.ready,
        "processes": [
            {"name": s.name, "pid": s.pid, "t": s.t, **s.values} for s in sampler.series.values()
        ],
        "run_dir": str(run_dir),
    }
    if not report["passed"]:
        report["activator_log_tail"] = activator.log_tail()
    elif owned:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    defaults = Options()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--sample-every", dest="sample_every_s", type=float, default=None)
    parser.add_argument("--burst", dest="burst_s", type=float, default=defaults.burst_s)
    parser.add_argument("--gap", dest="gap_s", type=float, default=defaults.gap_s)
    parser.add_argument("--think", dest="think_s", type=float, default=defaults.think_s)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--run-dir", dest="run_dir", type=Path, default=None,
                        help="keep the repository, logs and replicas' logs here")  # fmt: skip
    parser.add_argument("--report", type=Path, default=None, help="write the report here (JSON)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = vars(parser.parse_args(argv))
    report_path = args.pop("report")
    options = Options(**args)
    report = run(options)
    if report_path is not None:
        report_path.write_text(json.dumps(report, indent=1))
    print(
        f"\n{report['duration_s']} s, {report['requests']}, {report['bursty_replicas']} "
        f"{BURSTY} replicas, {report['bursty_zero_gaps']} times at zero"
    )
    print(report["table"])
    print(
        "first: the first sample; mid: the first of the second half; slope: least squares over "
        "the second half, phase-aligned to the burst period; +-: its standard error"
    )
    for problem in report["problems"]:
        print(f"FAIL: {problem}")
    for failure in report["failures"][:20]:
        print(f"  {failure}")
    print("PASS" if report["passed"] else f"FAIL (logs in {report['run_dir']})")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
