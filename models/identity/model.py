"""A custom Python model: each INPUT_<DATATYPE> it is given comes back as OUTPUT_<DATATYPE>."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class Identity:
    def __init__(self, model_dir: Path, device: Any, **kwargs: Any) -> None:
        self.model_dir = model_dir

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUTPUT_" + name.removeprefix("INPUT_"): array for name, array in inputs.items()}
