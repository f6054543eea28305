"""The installed distribution: one import root `ember`, no top-level `server`, `activator` or
`transformers`, and the `ember` console script.

Checked in a fresh interpreter started in an empty folder, so neither the repository root nor
pytest's own sys.path changes can make a name importable that an installed user would not see.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

_PROBE = r"""
import importlib
import importlib.metadata
import importlib.util
import json

report = {"top_level": {}, "imported": {}, "console_scripts": []}
for name in ("server", "activator", "transformers"):
    spec = importlib.util.find_spec(name)
    report["top_level"][name] = None if spec is None else (spec.origin or str(spec))
for name in ("ember.server", "ember.activator", "ember.transformers"):
    try:
        module = importlib.import_module(name)
        report["imported"][name] = getattr(module, "__file__", None) or "namespace"
    except Exception as exc:
        report["imported"][name] = "FAILED: " + type(exc).__name__ + ": " + str(exc)
dist = importlib.metadata.distribution("ember")
report["console_scripts"] = [
    [ep.name, ep.value] for ep in dist.entry_points if ep.group == "console_scripts"
]
print(json.dumps(report))
"""


def _probe(cwd: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-I", "-c", _PROBE],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def test_no_top_level_packages_and_ember_imports(tmp_path: Path) -> None:
    report = _probe(tmp_path)
    assert report["top_level"] == {"server": None, "activator": None, "transformers": None}, (
        "a top-level module of these names is importable (it would shadow, e.g., Hugging "
        f"Face's transformers): {report['top_level']}"
    )
    for name, where in report["imported"].items():
        assert not where.startswith("FAILED"), (name, where)


def test_console_script_ember(tmp_path: Path) -> None:
    report = _probe(tmp_path)
    scripts = dict(report["console_scripts"])
    assert "ember" in scripts, report["console_scripts"]
    assert scripts["ember"].startswith("ember.server."), scripts["ember"]
    assert Path(sys.executable).with_name("ember").exists()


def test_ember_help_runs_outside_the_repository(tmp_path: Path) -> None:
    ember = Path(sys.executable).with_name("ember")
    result = subprocess.run(
        [str(ember), "serve", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "--model-repository" in result.stdout
    assert "Traceback" not in result.stderr
