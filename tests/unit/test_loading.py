"""Every model format through the safe loaders, and refusal of what is not safe."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ember.server.config import load_model_config
from ember.server.imports import LoadError
from ember.server.loading import dummy_inputs, load

ARCH = """
import torch


class Tiny(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 2
"""

TOML = """
format = "{format}"
{extra}
[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 4]
[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1, 3]
"""


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * 2


def model_dir(tmp_path: Path, fmt: str, extra: str = "") -> Path:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "model.toml").write_text(TOML.format(format=fmt, extra=extra))
    return folder


def check(folder: Path, reference: torch.nn.Module) -> None:
    runner, device = load(load_model_config(folder), folder)
    assert device.type == "cpu"
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    got = runner.predict({"x": x})["y"]
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_torchscript(tmp_path: Path) -> None:
    folder = model_dir(tmp_path, "torchscript", 'device = "cpu"')
    reference = Tiny().eval()
    torch.jit.script(reference).save(str(folder / "model.pt"))
    check(folder, reference)


def test_torch_export(tmp_path: Path) -> None:
    folder = model_dir(tmp_path, "torch_export", 'device = "cpu"')
    reference = Tiny().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(reference, (torch.zeros(2, 4),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(folder / "model.pt2"))
    check(folder, reference)


@pytest.mark.parametrize("stream", ["auto", "always", "never"])
@pytest.mark.parametrize("weights", ["model.safetensors", "weights.pt"])
def test_safetensors_architecture_adopts_weights(
    tmp_path: Path, weights: str, stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `always` places the safetensors file's tensors through Ember's own placement; the others
    # (and .pt files) load it with the safetensors package or torch.load.
    monkeypatch.setenv("EMBER_STREAM_WEIGHTS", stream)
    extra = (
        f'storage_uri = "{weights}"\narchitecture = "arch:Tiny"\ndevice = "cpu"\n'
        "[architecture_kwargs]\nwidth = 3"
    )
    folder = model_dir(tmp_path, "safetensors", extra)
    (folder / "arch.py").write_text(ARCH)
    reference = Tiny().eval()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if weights.endswith(".safetensors"):
        save_file(state, str(folder / weights))
    else:
        torch.save(state, folder / weights)
    check(folder, reference)


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickled_objects_are_refused(tmp_path: Path, writer: str) -> None:
    extra = 'storage_uri = "evil.pt"\narchitecture = "arch:Tiny"\n[architecture_kwargs]\nwidth = 3'
    folder = model_dir(tmp_path, "safetensors", extra)
    (folder / "arch.py").write_text(ARCH)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (marker.write_text, ("yes",))

    # A bare pickle, and the zip archive torch.save writes (what a real .pt file is).
    state = {"linear.weight": Evil(), "linear.bias": torch.zeros(3)}
    if writer == "pickle":
        (folder / "evil.pt").write_bytes(pickle.dumps(state))
    else:
        torch.save(state, folder / "evil.pt")
    with pytest.raises(LoadError, match="pickled objects other than tensors") as caught:
        load(load_model_config(folder), folder)
    assert "evil.pt" in str(caught.value) and "weights_only=False" not in str(caught.value)
    assert not marker.exists()


def test_missing_weights_and_cuda_are_clear(tmp_path: Path) -> None:
    folder = model_dir(tmp_path, "torchscript", 'device = "cpu"')
    with pytest.raises(LoadError, match="does not exist"):
        load(load_model_config(folder), folder)
    if not torch.cuda.is_available():
        (folder / "model.toml").write_text(
            TOML.format(format="torchscript", extra='device = "cuda:1"')
        )
        torch.jit.script(Tiny()).save(str(folder / "model.pt"))
        with pytest.raises(LoadError, match="CUDA is not available"):
            load(load_model_config(folder), folder)


def test_wrong_architecture_keys_fail_to_load(tmp_path: Path) -> None:
    extra = 'architecture = "arch:Tiny"\ndevice = "cpu"\n[architecture_kwargs]\nwidth = 5'
    folder = model_dir(tmp_path, "safetensors", extra)
    (folder / "arch.py").write_text(ARCH)
    save_file(
        {k: v.contiguous() for k, v in Tiny().state_dict().items()},
        str(folder / "model.safetensors"),
    )
    with pytest.raises(LoadError, match="size mismatch"):
        load(load_model_config(folder), folder)


def test_dummy_inputs_follow_declared_specs(tmp_path: Path) -> None:
    folder = model_dir(tmp_path, "torchscript")
    inputs = dummy_inputs(load_model_config(folder).inputs, batch=3)
    assert inputs["x"].shape == (3, 4) and inputs["x"].dtype == np.float32


def test_compile_matches_eager_and_is_refused_for_torchscript(tmp_path: Path) -> None:
    extra = (
        'architecture = "arch:Tiny"\ndevice = "cpu"\ncompile = true\n'
        "[architecture_kwargs]\nwidth = 3"
    )
    folder = model_dir(tmp_path, "safetensors", extra)
    (folder / "arch.py").write_text(ARCH)
    reference = Tiny().eval()
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    check(folder, reference)  # compiled at the warm-up, then batches of another size
    (folder / "model.toml").write_text(TOML.format(format="torchscript", extra="compile = true"))
    from ember.server.errors import ConfigError

    with pytest.raises(ConfigError, match="compile = true needs format"):
        load_model_config(folder)
