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


def _dynamic_batching(config: ModelConfig) -> dict[str, Any]:
    batching = config.batching
    if batching is None:
        return {}
    doc: dict[str, Any] = {
        "preferred_batch_size": sorted(set(batching.preferred_batch_sizes)),
        "max_queue_delay_microseconds": batching.max_queue_delay_us,
        "priority_levels": batching.priority_levels,
        "default_priority_level": batching.default_priority_level,
        "default_queue_policy": {
            "timeout_action": "REJECT",
            "default_timeout_microseconds": batching.default_timeout_us,
            "allow_timeout_override": batching.allow_timeout_override,
            "max_queue_size": batching.max_queue_size,
        },
    }
    return {"dynamic_batching": doc}


def model_config(config: ModelConfig, device_kind: str) -> dict[str, Any]:
    batched = config.max_batch_size > 0
    return {
        **_dynamic_batching(config),
        "name": config.name,
        "platform": platform_of(config),
        "backend": "ember",
        "max_batch_size": config.batch_limit if config.batching else config.max_batch_size,
        "input": [_tensor(s, batched) for s in config.request_inputs],
        "output": [_tensor(s, batched) for s in config.request_outputs],
        "instance_group": [
            {"name": f"{config.name}_0", "count": 1,
             "kind": "KIND_GPU" if device_kind == "cuda" else "KIND_CPU"}
        ],
        "version_policy": {"latest": {"num_versions": 1}},
    }  # fmt: skip
