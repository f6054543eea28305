"""What the server says about itself, the same on every protocol."""

from __future__ import annotations

from typing import Final

SERVER_NAME: Final = "ember"
SERVER_VERSION: Final = "0.1.0"
# The Open Inference Protocol / Triton extensions actually implemented.
EXTENSIONS: Final = (
    "binary_tensor_data",
    "model_configuration",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
)
