"""A model with a required input `a` and an optional input `b`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class Add:
    def __init__(self, model_dir: Path, device: Any) -> None:
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a = inputs["a"]
        b = inputs.get("b")
        return {"sum": a if b is None else a + b}
