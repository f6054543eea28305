"""CUDA graph settings and bucketing: the parts that do not need a GPU. The capture and the
replay themselves are checked against eager results by `loadtests/gpu_check.py` on a GPU."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.server.config import load_model_config
from ember.server.errors import ConfigError
from ember.server.graphs import bucket
from ember.server.loading import load
from ember.server.runners import TorchRunner

TOML = """
format = "torchscript"
max_batch_size = {mbs}
{extra}
[[inputs]]
name = "x"
datatype = "FP32"
shape = {shape}
[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1, 3]
"""


def folder(tmp_path: Path, extra: str, mbs: int = 16, shape: str = "[-1, 4]") -> Path:
    where = tmp_path / "g"
    where.mkdir(exist_ok=True)
    (where / "model.toml").write_text(TOML.format(mbs=mbs, extra=extra, shape=shape))
    return where


@pytest.mark.parametrize(
    ("rows", "want"), [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 12), (12, 12), (13, None)]
)
def test_a_batch_runs_in_the_smallest_graph_that_holds_it(rows: int, want: int | None) -> None:
    assert bucket(rows, (1, 2, 4, 8, 12)) == want


@pytest.mark.parametrize(
    ("mbs", "extra", "sizes"),
    [
        (16, "cuda_graphs = true", (1, 2, 4, 8, 16)),
        (12, "cuda_graphs = true", (1, 2, 4, 8, 12)),
        (1, "cuda_graphs = true", (1,)),
        (64, "cuda_graphs = true\n[batching]\nmax_batch_size = 24", (1, 2, 4, 8, 16, 24)),
        (16, "cuda_graphs = true\ncuda_graph_batch_sizes = [16, 4, 4]", (4, 16)),
        (0, "cuda_graphs = true", ()),
    ],
)
def test_captured_sizes(tmp_path: Path, mbs: int, extra: str, sizes: tuple[int, ...]) -> None:
    shape = "[-1, 4]" if mbs else "[2, 4]"
    config = load_model_config(folder(tmp_path, extra, mbs, shape))
    assert config.graph_batch_sizes == sizes


@pytest.mark.parametrize(
    ("extra", "shape", "fragment"),
    [
        ("cuda_graphs = true", "[-1, -1]", "needs fixed input shapes apart from the batch"),
        ("cuda_graph_batch_sizes = [4]", "[-1, 4]", "needs cuda_graphs = true"),
        ("cuda_graphs = true\ncuda_graph_batch_sizes = [32]", "[-1, 4]", "exceed the batch"),
        ("cuda_graphs = true\ncuda_graph_batch_sizes = [0]", "[-1, 4]", "greater than or equal"),
    ],
)
def test_bad_graph_settings_are_refused(
    tmp_path: Path, extra: str, shape: str, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_model_config(folder(tmp_path, extra, shape=shape))


def test_graphs_are_refused_for_python_models_and_with_compile(tmp_path: Path) -> None:
    text = TOML.format(mbs=4, extra="cuda_graphs = true", shape="[-1, 4]")
    python = folder(tmp_path, "")
    (python / "model.toml").write_text(
        text.replace('format = "torchscript"', 'format = "python"\nclass = "m:M"')
    )
    with pytest.raises(ConfigError, match="needs a torch format"):
        load_model_config(python)
    (python / "model.toml").write_text(
        text.replace('format = "torchscript"', 'format = "torch_export"\ncompile = true')
    )
    with pytest.raises(ConfigError, match="cannot be combined"):
        load_model_config(python)


def test_on_the_cpu_graphs_are_ignored_with_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    where = folder(tmp_path, 'cuda_graphs = true\ndevice = "cpu"')
    torch.manual_seed(0)
    module = torch.jit.script(torch.nn.Linear(4, 3).eval())
    module.save(str(where / "model.pt"))
    with caplog.at_level(logging.INFO, logger="ember.server.loading"):
        runner, device = load(load_model_config(where), where)
    assert device.type == "cpu" and type(runner) is TorchRunner
    assert [r.getMessage() for r in caplog.records] == [
        "cuda_graphs ignored: the model runs on the CPU"
    ]
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner.predict({"x": x})["y"], want, rtol=1e-6)


def test_the_graph_runner_refuses_a_cpu_device(tmp_path: Path) -> None:
    from ember.server.graphs import CudaGraphRunner

    config = load_model_config(folder(tmp_path, "cuda_graphs = true"))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, not cpu"):
        CudaGraphRunner(torch.nn.Linear(4, 3), config, torch.device("cpu"))
