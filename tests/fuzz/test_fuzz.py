"""The fuzz harnesses in CI: each atheris harness for a few seconds in its own process, and each
`fuzz_one` on its seeds and a fixed set of mutations in this one (no atheris needed, so a
failure reproduces anywhere). Longer runs: README.md.
"""

from __future__ import annotations

import base64
import importlib.util
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

HERE = Path(__file__).resolve().parent
HARNESSES = [
    "v2_json", "binary_body", "raw_tensors", "v1", "grpc_request", "safetensors", "model_toml",
]  # fmt: skip
# Seconds of fuzzing per harness in CI; startup (torch, the models' configs) comes on top.
SECONDS = int(os.environ.get("EMBER_FUZZ_SECONDS", "3"))
MUTATIONS = 300


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def harness(target: str) -> ModuleType:
    """The harness module; its sibling helpers are registered under the names it imports
    them by (pytest's importlib mode puts no test folder on sys.path)."""
    for helper in ("fuzzkit", "fuzzmodels"):
        if helper not in sys.modules:
            _load(HERE / f"{helper}.py", helper)
    name = f"fuzz_{target}"
    return sys.modules.get(name) or _load(HERE / f"{name}.py", name)


def _reproducer(data: bytes) -> str:
    return f"input (repr): {data!r}\ninput (base64): {base64.b64encode(data).decode()}"


@pytest.mark.parametrize("target", HARNESSES)
def test_seeds_and_mutations(target: str) -> None:
    module = harness(target)
    fuzzkit = sys.modules["fuzzkit"]
    fuzz_one: Callable[[bytes], None] = module.fuzz_one
    seeds: list[bytes] = module.SEEDS
    assert seeds, "a harness needs seed inputs"
    for data in [*seeds, *fuzzkit.mutations(seeds, MUTATIONS, seed=0)]:
        try:
            fuzz_one(data)
        except Exception:
            pytest.fail(f"fuzz_{target}.fuzz_one failed\n{_reproducer(data)}\n"
                        f"{traceback.format_exc()}")  # fmt: skip


@pytest.mark.parametrize("target", HARNESSES)
def test_atheris(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    command = [
        sys.executable, str(HERE / f"fuzz_{target}.py"), str(corpus),
        f"-max_total_time={SECONDS}", "-timeout=10", "-rss_limit_mb=4096",
        f"-artifact_prefix={tmp_path}/", "-print_final_stats=1",
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=SECONDS + 120
    )
    output = result.stdout + result.stderr
    if result.returncode == 0:
        assert "Done" in output or "DONE" in output, output[-3000:]
        return
    found = sorted(
        p for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))
    )
    reproducers = "\n".join(f"{p.name}:\n{_reproducer(p.read_bytes())}" for p in found)
    pytest.fail(
        f"fuzz_{target} exited {result.returncode} after {time.monotonic() - started:.1f} s\n"
        f"{reproducers or '(no artifact written)'}\n"
        f"replay: {sys.executable} tests/fuzz/fuzz_{target}.py ARTIFACT\n"
        f"--- output (tail) ---\n{output[-6000:]}"
    )
