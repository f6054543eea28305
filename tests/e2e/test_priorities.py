"""Model instance threads run at a lower priority than the event loop (`--instance-nice`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def _nice_values(pid: int) -> dict[int, int]:
    """Each thread's nice value, by thread id."""
    values = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        # Field 19 is the nice value; the command name before it may hold spaces.
        fields = stat.read_text().rsplit(")", 1)[1].split()
        values[int(stat.parent.name)] = int(fields[16])
    return values


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize(("flag", "expected"), [(None, 5), ("0", 0), ("12", 12)])
def test_instance_threads_are_niced_and_the_loop_is_not(
    ember: Any, flag: str | None, expected: int
) -> None:
    args = ["--model-repository", "models", "--model", "mlp"]
    server = ember(*args, *(["--instance-nice", flag] if flag else []))
    server.assert_serves("mlp")
    values = _nice_values(server.pid)
    assert values[server.pid] == 0, values  # the event loop's thread (the main thread)
    # mlp's one instance thread; the OpenMP workers it starts for its forwards (how many
    # depends on the CPU's math library) inherit its value, and nothing else is niced.
    assert expected in values.values(), values
    assert set(values.values()) <= {0, expected}, values


@pytest.mark.parametrize("value", ["-1", "20", "high"])
def test_a_bad_nice_value_is_refused_with_one_line(ember: Any, value: str) -> None:
    server = ember("--model-repository", "models", "--instance-nice", value, wait=None)
    assert server.wait_exit(30.0) == 2
    stderr = server.stderr()
    assert "--instance-nice" in stderr and "expected an integer from 0 to 19" in stderr
    assert "Traceback" not in stderr
