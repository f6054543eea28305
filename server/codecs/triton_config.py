"""A Triton `ModelConfig` document built from model.toml, for tools that read Triton's config."""

from __future__ import annotations

from typing import Any

from ember.server.codecs.v2 import platform_of
from ember.server.config import ModelConfig, TensorSpec


def triton_type(datatype: str) -> str:
    # Triton calls BYTES "STRING" in model configs.
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _tensor(spec: TensorSpec, batched: bool) -> dict[str, Any]:
    # With max_batch_size > 0 Triton's dims leave out the batch dimension.
    dims = spec.shape[1:] if batched and spec.shape else spec.shape
    doc: dict[str, Any] = {"name": spec.name, "data_type": triton_type(spec.datatype), "dims": dims}
    if spec.optional:
        doc["optional"] = True
    return doc


def model_config(config: ModelConfig, device_kind: str) -> dict[str, Any]:
    batched = config.max_batch_size > 0
    return {
        "name": config.name,
        "platform": platform_of(config),
        "backend": "ember",
        "max_batch_size": config.max_batch_size,
        "input": [_tensor(s, batched) for s in config.inputs],
        "output": [_tensor(s, batched) for s in config.outputs],
        "instance_group": [
            {"name": f"{config.name}_0", "count": 1,
             "kind": "KIND_GPU" if device_kind == "cuda" else "KIND_CPU"}
        ],
        "version_policy": {"latest": {"num_versions": 1}},
    }  # fmt: skip
