"""`ember serve` with weights or a whole model folder on S3 answers exactly as from disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
Spawn = Callable[[list[str], dict[str, str]], "subprocess.Popen[str]"]

ARCH = """
import torch


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)
"""

TOML = """
name = "tiny"
format = "safetensors"
architecture = "arch:Tiny"
storage_uri = "{uri}"
device = "cpu"

[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 4]

[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1, 3]
"""

BODY = json.dumps(
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": list(range(8))}]}
).encode()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def serve(spawn_ember: Spawn) -> Iterator[Callable[..., tuple[str, subprocess.Popen[str]]]]:
    started: list[subprocess.Popen[str]] = []

    def start(args: list[str], env: dict[str, str], wait: bool = True) -> tuple[str, Any]:
        port = free_port()
        argv = ["serve", *args, "--host", "127.0.0.1", "--http_port", str(port),
                "--grpc_port", str(free_port())]  # fmt: skip
        process = spawn_ember(argv, env)
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while wait:
            if process.poll() is not None:
                pytest.fail(f"ember serve exited {process.returncode}: {process.stderr.read()}")
            try:
                with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("ember serve did not become ready")
            time.sleep(0.1)
        return url, process

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def infer(url: str, model: str, body: bytes) -> Any:
    request = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=body)
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())["outputs"]


def cold_start(url: str, model: str) -> dict[str, float]:
    """The model's `ember_cold_start_seconds` by phase, from /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    phases = {}
    prefix = f'ember_cold_start_seconds{{model_name="{model}",phase="'
    for line in text.splitlines():
        if line.startswith(prefix):
            phase, _, value = line[len(prefix) :].partition('"} ')
            phases[phase] = float(value)
    assert set(phases) == {"imports", "config", "download", "load", "warmup", "total"}, text
    parts = sum(v for k, v in phases.items() if k != "total")
    assert 0 < parts <= phases["total"] + 0.02, phases
    return phases


def tiny_folder(root: Path, uri: str) -> Path:
    folder = root / "tiny"
    folder.mkdir(parents=True)
    (folder / "arch.py").write_text(ARCH)
    (folder / "model.toml").write_text(TOML.format(uri=uri))
    return folder


def tiny_on_s3(rclone: Any, root: Path, seed: int) -> tuple[Path, Path]:
    """The tiny model twice: with its weights on disk, and with the same weights on S3."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(4, 3)
    state = {f"linear.{k}": v.contiguous() for k, v in linear.state_dict().items()}
    local = tiny_folder(root / "local", "weights.safetensors")
    save_file(state, str(local / "weights.safetensors"))
    bucket = rclone.new_bucket()
    rclone.put(bucket, "w/tiny.safetensors", (local / "weights.safetensors").read_bytes())
    return local, tiny_folder(root / "remote", f"s3://{bucket}/w/tiny.safetensors")


@pytest.mark.parametrize("stream", ["auto", "always"])
def test_weights_from_s3_answer_as_from_disk(
    rclone: Any, serve: Any, tmp_path: Path, stream: str
) -> None:
    local, remote = tiny_on_s3(rclone, tmp_path, seed=3)
    env = rclone.env(EMBER_CACHE_DIR=str(tmp_path / "cache"), EMBER_STREAM_WEIGHTS=stream)

    local_url, _ = serve(["--model-repository", str(local.parent)], env)
    remote_url, process = serve(["--model-repository", str(remote.parent)], env)
    assert infer(remote_url, "tiny", BODY) == infer(local_url, "tiny", BODY)
    # The cold start names where its time went: no download from disk, one from S3.
    assert cold_start(local_url, "tiny")["download"] == 0.0
    assert cold_start(remote_url, "tiny")["download"] > 0.0
    process.terminate()
    process.wait(15)
    placed = [line for line in process.stderr.read().splitlines() if "weights placed" in line]
    # On the CPU, `auto` maps the cached file; `always` places the tensors on the way in
    # (from the prefetch's download, as it downloaded, or from the cached file: by timing).
    assert len(placed) == (1 if stream == "always" else 0), placed


def test_kserve_storage_uri_prefix_serves_the_folder(
    rclone: Any, serve: Any, tmp_path: Path
) -> None:
    bucket = rclone.new_bucket()
    mlp = ROOT / "models" / "mlp"
    for name in ("model.toml", "model.pt"):
        rclone.put(bucket, f"isvc/mlp/{name}", (mlp / name).read_bytes())
    env = rclone.env(
        EMBER_CACHE_DIR=str(tmp_path / "cache"), STORAGE_URI=f"s3://{bucket}/isvc/mlp/"
    )
    remote_url, _ = serve(["--model_name", "mlp"], env)
    assert cold_start(remote_url, "mlp")["download"] > 0.0  # the folder, before the config
    local_url, _ = serve(["--model-repository", str(ROOT / "models"), "--model", "mlp"], env)
    body = json.dumps(
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784],
                     "data": [0.01 * (i % 7) for i in range(784)]}]}
    ).encode()  # fmt: skip
    assert infer(remote_url, "mlp", body) == infer(local_url, "mlp", body)


def test_missing_weights_object_is_one_clear_line(rclone: Any, serve: Any, tmp_path: Path) -> None:
    bucket = rclone.new_bucket()
    remote = tiny_folder(tmp_path / "remote", f"s3://{bucket}/nope.safetensors")
    cache = tmp_path / "cache"
    _, process = serve(
        ["--model-repository", str(remote.parent)], rclone.env(EMBER_CACHE_DIR=str(cache)),
        wait=False,
    )  # fmt: skip
    assert process.wait(60) != 0
    errors = [line for line in process.stderr.read().splitlines() if '"level":"error"' in line]
    assert len(errors) == 1, errors
    assert bucket in errors[0] and "nope.safetensors" in errors[0]
    assert "Traceback" not in errors[0]
    assert not [p for p in cache.rglob("*") if p.is_file() and p.suffix == ".data"]


def test_storage_uri_may_not_leave_the_model_folder(serve: Any, tmp_path: Path) -> None:
    folder = tiny_folder(tmp_path / "repo", "../../etc/passwd")
    shutil.copy(ROOT / "models" / "mlp" / "make_mlp.py", folder / "unused.py")
    _, process = serve(["--model-repository", str(folder.parent)], {}, wait=False)
    assert process.wait(60) != 0
    assert "leaves the model folder" in process.stderr.read()


def test_weights_prefetched_during_imports_are_downloaded_once(
    rclone: Any, proxy: Any, serve: Any, tmp_path: Path
) -> None:
    # The CLI starts pulling while torch imports and the loader asks again: one download,
    # however the two meet (the loader waits on the cache's lock, then finds the file).
    local, remote = tiny_on_s3(rclone, tmp_path, seed=5)
    # Each GET is held about as long as torch takes to import, so the loader usually asks
    # while the prefetch's GET is still in flight; either way only one may reach S3.
    front = proxy(rclone, delay=3.0)
    env = rclone.env(front.endpoint, EMBER_CACHE_DIR=str(tmp_path / "cache"))
    remote_url, _ = serve(["--model-repository", str(remote.parent)], env)
    local_url, _ = serve(["--model-repository", str(local.parent)], env)
    assert infer(remote_url, "tiny", BODY) == infer(local_url, "tiny", BODY)
    assert len(front.gets("tiny.safetensors")) == 1  # one small object: one ranged GET


def test_s3_endpoint_down_at_start_is_one_clear_line_after_retries(
    serve: Any, tmp_path: Path
) -> None:
    """What the user sees: `ember serve` whose weights sit on an S3 endpoint that does not
    answer exits non-zero within seconds with one error line naming the endpoint, the object
    and the attempts made (no traceback); the cache keeps no file."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    remote = tiny_folder(tmp_path / "remote", "s3://bucket/w/tiny.safetensors")
    cache = tmp_path / "cache"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "AKIAEMBERTESTKEY0001",
        "AWS_SECRET_ACCESS_KEY": "x" * 30,
        "S3_CONNECT_TIMEOUT": "2",
        "EMBER_CACHE_DIR": str(cache),
    }
    started = time.monotonic()
    _, process = serve(["--model-repository", str(remote.parent)], env, wait=False)
    assert process.wait(90) != 0
    assert time.monotonic() - started < 60
    stderr = process.stderr.read()
    errors = [line for line in stderr.splitlines() if '"level":"error"' in line]
    assert len(errors) == 1, errors
    message = json.loads(errors[0])
    text = f"{message['message']} {message.get('error', '')}"
    assert f"cannot reach S3 endpoint {endpoint}" in text and "after 3 attempts" in text, text
    assert "s3://bucket/w/tiny.safetensors" in text
    assert "Traceback" not in stderr
    assert not [p for p in cache.rglob("*") if p.is_file()]


LEAK_KEY_ID = "AKIAEMBERLEAKCHECK07"
LEAK_SECRET = "sk-EMBER-SECRET-4f1d9c0b7e2a6d3f8c5b1a0e9d7c6b5a4f3e2d1c"
LEAK_TOKEN = "st-EMBER-TOKEN-0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b"


def test_credentials_never_reach_logs_errors_or_metrics(
    rclone: Any, rclone_auth: Any, rclone_http: Any, serve: Any, ember_cli: Any, tmp_path: Path
) -> None:
    """What the user sees: whatever happens (weights served, bad and unknown requests, a
    missing object, credentials refused), the secret key, the session token and the access
    key id appear in no log line at debug level, no error answer and no metric; neither do
    the ones a presigned HTTPS URL carries in its query string."""
    secret_env = {
        "AWS_ACCESS_KEY_ID": LEAK_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": LEAK_SECRET,
        "AWS_SESSION_TOKEN": LEAK_TOKEN,
    }
    seen: dict[str, str] = {}

    def stderr_of(process: Any) -> str:
        if process.poll() is None:
            process.terminate()
        return str(process.communicate(timeout=30)[1])

    # Served from S3 (rclone takes any credentials), then asked good, bad and unknown things.
    local, remote = tiny_on_s3(rclone, tmp_path, seed=7)
    env = rclone.env(EMBER_CACHE_DIR=str(tmp_path / "cache"), **secret_env)
    url, process = serve(["--model-repository", str(remote.parent), "--log-level", "debug"], env)
    assert infer(url, "tiny", BODY)
    bad = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 5],
                                   "data": [0] * 5}]}).encode()  # fmt: skip
    for path, data in [("/v2/models/tiny/infer", bad), ("/v2/models/nope/infer", BODY)]:
        request = urllib.request.Request(url + path, data=data)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        seen[path] = f"{caught.value.headers}\n{caught.value.read().decode()}"
    with urllib.request.urlopen(url + "/metrics", timeout=10) as answer:
        seen["metrics"] = answer.read().decode()
    seen["served"] = stderr_of(process)
    assert '"level":"debug"' in seen["served"]  # the most talkative level really ran

    # A missing object, and credentials the server refuses: serve and pull both fail.
    bucket = rclone_auth.new_bucket()
    rclone_auth.put(bucket, "w/tiny.safetensors", b"never read")
    failing = [
        ("missing", rclone.env(**secret_env), f"s3://{rclone.new_bucket()}/nope.safetensors"),
        ("refused", rclone_auth.env(**secret_env), f"s3://{bucket}/w/tiny.safetensors"),
    ]
    for name, base, uri in failing:
        folder = tiny_folder(tmp_path / name, uri)
        env = {**base, "EMBER_CACHE_DIR": str(tmp_path / "cache")}
        args = ["--model-repository", str(folder.parent), "--log-level", "debug"]
        _, process = serve(args, env, wait=False)
        assert process.wait(60) != 0
        seen[f"serve {name}"] = stderr_of(process)
        run = ember_cli(["pull", uri, "--log-level", "debug"], env)
        assert run.returncode == 1
        seen[f"pull {name}"] = run.stderr
    assert "no such key" in seen["serve missing"] and "access denied" in seen["pull refused"]

    # A presigned URL: its credentials are in the query string, served or missing.
    query = (
        f"X-Amz-Credential={LEAK_KEY_ID}%2F20260101%2Fus-east-1%2Fs3%2Faws4_request"
        f"&X-Amz-Security-Token={LEAK_TOKEN}&X-Amz-Signature={LEAK_SECRET[16:]}"
    )
    (rclone_http.root / "tiny.safetensors").write_bytes(
        (local / "weights.safetensors").read_bytes()
    )
    for name in ("tiny", "nope"):
        uri = f"{rclone_http.url}/{name}.safetensors?{query}"
        folder = tiny_folder(tmp_path / f"presigned-{name}", uri)
        env = {"EMBER_CACHE_DIR": str(tmp_path / "cache")}
        args = ["--model-repository", str(folder.parent), "--log-level", "debug"]
        if name == "tiny":
            url, process = serve(args, env)
            assert infer(url, "tiny", BODY)
        else:
            _, process = serve(args, env, wait=False)
            assert process.wait(60) != 0
        seen[f"serve presigned {name}"] = stderr_of(process)
        run = ember_cli(["pull", uri, "--log-level", "debug"], env)
        seen[f"pull presigned {name}"] = run.stderr
    assert "X-Amz-Security-Token=***" in seen["pull presigned nope"]

    for where, text in seen.items():
        for secret in (LEAK_SECRET, LEAK_SECRET[16:], LEAK_TOKEN, LEAK_KEY_ID):
            assert secret not in text, f"{secret[:12]}... in {where}"


def test_the_loader_takes_over_a_download_the_prefetch_started(
    rclone: Any, proxy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In process: the prefetch's download is held at the proxy while the loader claims its
    # handoff, takes what reached the cache file and the rest as it arrives.
    from safetensors.torch import load_file

    from ember.server import loading
    from ember.server.config import load_model_config
    from ember.server.prefetch import Prefetch

    local, remote = tiny_on_s3(rclone, tmp_path, seed=7)
    want = load_file(str(local / "weights.safetensors"))
    front = proxy(rclone, delay=1.0)
    for name, value in rclone.env(front.endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBER_STREAM_WEIGHTS", "always")
    config = load_model_config(remote)
    assert config.storage_uri is not None
    prefetch = Prefetch([("file", config.storage_uri)])
    prefetch.thread.start()
    deadline = time.monotonic() + 20
    while len(front.gets()) < 2:  # the header's GET, then the data's
        assert time.monotonic() < deadline, front.seen
        time.sleep(0.01)
    cpu = torch.device("cpu")
    placed = loading._weights(config, remote, cpu, prefetch)
    assert placed.state is not None and placed.state.keys() == want.keys()
    assert all(torch.equal(placed.state[k], v) for k, v in want.items())
    prefetch.thread.join(20)
    # One download in all: the loader asked S3 for nothing itself.
    assert len(front.gets()) == 2 and [s.method for s in front.seen].count("HEAD") == 1
    # The prefetch still published the file: a second instance places it from the cache.
    again = loading._weights(config, remote, cpu, prefetch)
    assert again.state is not None and again.path is not None
    assert all(torch.equal(again.state[k], v) for k, v in want.items())
    assert len(front.gets()) == 2
