"""A model whose forward sleeps, so tests can hold a request in flight."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np


class Slow:
    def __init__(self, model_dir: Path, device: Any, seconds: float = 2.0) -> None:
        self.seconds = seconds

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        delay = inputs.get("delay")
        time.sleep(self.seconds if delay is None else float(delay.reshape(-1)[0]))
        return {"y": inputs["x"]}
