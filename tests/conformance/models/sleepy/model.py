"""A python model for deadline tests: sleeps as long as its SECONDS input says."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np


class Sleepy:
    def __init__(self, model_dir: Path, device: Any, **kwargs: Any) -> None:
        self.model_dir = model_dir

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(float(inputs["SECONDS"][0]))
        return {"OUTPUT": inputs["INPUT"]}
