"""EMBER_STREAM_WEIGHTS: whether safetensors weights are placed into their tensors as they
arrive, or loaded from the file by the safetensors package."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ember.server.imports import LoadError

STREAM_MODES = ("auto", "always", "never")


def stream_mode(env: Mapping[str, str]) -> str:
    """`auto` (default) places safetensors weights onto CUDA devices as they arrive; `always`
    does it onto the CPU too (anonymous memory instead of the cache file mapped); `never`
    loads every file with the safetensors package."""
    mode = env.get("EMBER_STREAM_WEIGHTS", "auto").strip().lower() or "auto"
    if mode not in STREAM_MODES:
        choices = ", ".join(STREAM_MODES)
        raise LoadError(f"EMBER_STREAM_WEIGHTS must be one of {choices}, got {mode!r}")
    return mode


def streams(mode: str, device_type: str) -> bool:
    return mode == "always" or (mode == "auto" and device_type == "cuda")


def may_stream(mode: str, devices: Sequence[str]) -> bool:
    """Before torch is imported: whether a model on `devices` may stream ("auto" may be
    CUDA; only an explicit "cpu" is known not to be)."""
    return mode == "always" or (mode == "auto" and any(d != "cpu" for d in devices))
