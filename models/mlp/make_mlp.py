"""Write models/mlp/model.pt: a TorchScript MLP with weights fixed by torch.manual_seed(0).

Run by the set-up (`make models`); the file is generated, never committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def build() -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(784, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    ).eval()
    return torch.jit.script(model)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("model.pt")
    tmp = out.with_suffix(".tmp")
    build().save(str(tmp))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
