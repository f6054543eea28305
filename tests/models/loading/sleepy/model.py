"""A model that takes a while to load."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np


class Sleepy:
    def __init__(self, model_dir: Path, device: Any, load_seconds: float = 5.0) -> None:
        time.sleep(load_seconds)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"]}
