"""models/resnet: the generated weights load into ResNet18 as the server loads them, and
DecodeImage -> ResNet18 -> TopK classifies an image."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ember.server.config import load_model_config
from ember.server.imports import import_object
from ember.transformers.chain import Chain
from ember.transformers.classify import TopK
from ember.transformers.image import DecodeImage

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "models" / "resnet"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of models/resnet with freshly generated weights and labels, so the test needs
    no `make models` and leaves the repository's files alone."""
    folder = tmp_path_factory.mktemp("resnet")
    for name in ("model.toml", "resnet.py"):
        shutil.copy(SOURCE / name, folder / name)
    subprocess.run(
        [sys.executable, str(SOURCE / "make_resnet.py"), str(folder)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return folder


@pytest.fixture(scope="module")
def model(model_dir: Path) -> torch.nn.Module:
    # What the server does for format = "safetensors": build on meta, assign the tensors.
    cls = import_object("resnet:ResNet18", model_dir)
    with torch.device("meta"):
        module = cls()
    assert all(p.is_meta for p in module.parameters())
    module.load_state_dict(
        load_file(str(model_dir / "model.safetensors")), strict=True, assign=True
    )
    module.eval()
    assert isinstance(module, torch.nn.Module)
    return module


def _jpeg(width: int, height: int, seed: int) -> bytes:
    # Smooth gradients and a few blocks rather than noise: closer to a photograph.
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))], axis=-1
    ).astype(np.uint8)
    for _ in range(5):
        top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
        pixels[top : top + height // 4, left : left + width // 4] = rng.integers(0, 256, 3)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def test_the_file_holds_every_tensor_and_nothing_stays_on_meta(
    model_dir: Path, model: torch.nn.Module
) -> None:
    state = load_file(str(model_dir / "model.safetensors"))
    assert "bn1.running_mean" in state and "layer4.1.bn2.num_batches_tracked" in state
    assert "layer2.0.downsample.0.weight" in state and "layer1.0.downsample.0.weight" not in state
    assert state["fc.weight"].shape == (1000, 512)
    # The running statistics were measured, not left at their 0 / 1 defaults.
    assert not torch.all(state["layer3.0.bn1.running_var"] == 1)
    assert not torch.all(state["bn1.running_mean"] == 0)
    assert all(not t.is_meta for t in model.state_dict().values())
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # ResNet-18's count
    assert not model.training


def test_a_batch_of_two_gives_finite_logits(model: torch.nn.Module) -> None:
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(pixels)
    assert logits.shape == (2, 1000) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert (logits.std(dim=1) > 0.1).all()
    assert not torch.equal(logits[0], logits[1])


def test_eval_mode_batches_do_not_interact(model: torch.nn.Module) -> None:
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        together = model(pixels)
        alone = model(pixels[1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-4, rtol=1e-4)


def test_an_image_is_classified_end_to_end(model_dir: Path, model: torch.nn.Module) -> None:
    decode = DecodeImage(model_dir=model_dir)
    top = TopK(model_dir=model_dir, k=5)
    images = np.empty(2, dtype=object)
    images[:] = [_jpeg(400, 300, seed=0), _jpeg(256, 512, seed=1)]
    pixels = decode({"image": images})["pixels"]
    with torch.inference_mode():
        logits = model(torch.from_numpy(pixels)).numpy()
    out = top({"logits": logits})
    labels, scores = out["label"], out["score"]
    assert labels.shape == (2, 5) and scores.shape == (2, 5)
    known = set((model_dir / "labels.txt").read_bytes().splitlines())
    assert len(known) == 1000
    for row in labels:
        assert len(set(row)) == 5 and set(row) <= known
    assert np.all(np.diff(scores, axis=1) <= 0)
    assert np.all(scores > 0) and np.all(scores.sum(axis=1) <= 1 + 1e-6)


def test_model_toml_wires_the_steps_to_the_model(model_dir: Path) -> None:
    config = load_model_config(model_dir)
    assert config.pipeline is not None
    chain = Chain.load(config, model_dir)  # checks every step's tensors against the model's
    chain.close()
