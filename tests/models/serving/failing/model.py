"""A model with a bug: predict raises for any non-zero input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class Failing:
    def __init__(self, model_dir: Path, device: Any) -> None:
        pass

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if np.any(x != 0):
            raise RuntimeError("failing model exploded on purpose")
        return {"y": x}
