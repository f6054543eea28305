"""Write models/resnet/model.safetensors (ResNet18 with weights fixed by torch.manual_seed(0))
and models/resnet/labels.txt (class_000 .. class_999).

The weights are random, so the predictions mean nothing; the model has a real classifier's
shape and cost. Its BatchNorm running statistics are measured on seeded synthetic images
rather than left at mean 0 / variance 1, so that in eval mode every layer's output is
normalised as it would be in a trained network, instead of growing block after block.

Run by the set-up (`make models`); both files are generated, never committed. Running it
again writes the same bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

# Run as a script, this file's folder is first on sys.path: resnet.py is the model's own file.
from resnet import ResNet18  # isort: skip

NUM_CLASSES = 1000
# Enough images for stable statistics in every channel, few enough to stay well under 10 s.
CALIBRATION_BATCHES = 2
CALIBRATION_BATCH_SIZE = 8
# The classifier's weights are scaled so that logits spread by about this much across
# classes: a softmax that is visibly not uniform, as a trained model's is.
LOGIT_STD = 3.0


def _synthetic_images(generator: torch.Generator, count: int) -> torch.Tensor:
    # Noise at three scales, upsampled and summed: smooth regions, edges and texture, with unit
    # variance like normalised photographs. Statistics taken on smooth blobs alone left
    # finer-grained inputs badly unnormalised in eval mode (logits a dozen times too spread).
    images = torch.zeros(count, 3, 224, 224)
    for side in (7, 28, 112):
        coarse = torch.randn(count, 3, side, side, generator=generator)
        images += nn.functional.interpolate(coarse, size=224, mode="bilinear", align_corners=False)
    return images / 3**0.5


@torch.no_grad()
def build() -> ResNet18:
    torch.manual_seed(0)
    model = ResNet18(num_classes=NUM_CLASSES)
    generator = torch.Generator().manual_seed(0)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for batchnorm in batchnorms:
        batchnorm.reset_running_stats()
        # A cumulative average over the calibration batches, not an exponential one.
        batchnorm.momentum = None
    model.train()
    features: list[torch.Tensor] = []
    hook = model.fc.register_forward_hook(lambda _m, args, _out: features.append(args[0]))
    for _ in range(CALIBRATION_BATCHES):
        model(_synthetic_images(generator, CALIBRATION_BATCH_SIZE))
    for batchnorm in batchnorms:
        batchnorm.momentum = 0.1
    hook.remove()
    pooled = torch.cat(features)
    nn.init.normal_(model.fc.weight, std=LOGIT_STD / float(pooled.norm(dim=1).mean()))
    nn.init.zeros_(model.fc.bias)
    return model.eval()


def write_labels(path: Path) -> None:
    width = len(str(NUM_CLASSES - 1))
    text = "".join(f"class_{i:0{width}d}\n" for i in range(NUM_CLASSES))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in build().state_dict().items()}
    weights = out / "model.safetensors"
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    # safetensors creates the file owner-only; the server may run as another user.
    tmp.chmod(0o644)
    tmp.replace(weights)
    write_labels(out / "labels.txt")
    print(f"wrote {weights} and {out / 'labels.txt'}")


if __name__ == "__main__":
    main()
