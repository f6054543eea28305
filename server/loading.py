"""Turning a model.toml into a warmed-up runner, through safe loaders only.

Weights are read with safetensors, `torch.load(weights_only=True)`, TorchScript or
torch.export archives: nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import logging
import pickle
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ember.server.coldstart import LoadPhases
from ember.server.config import ModelConfig, TensorSpec
from ember.server.datatypes import numpy_dtype
from ember.server.errors import ConfigError
from ember.server.graphs import CudaGraphRunner
from ember.server.imports import LoadError, import_object
from ember.server.runners import PythonRunner, Runner, TorchRunner
from ember.server.storage import fetch
from ember.server.storage.errors import StorageError

log = logging.getLogger("ember.server.loading")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LoadError(f"device '{spec}' requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LoadError(
                f"device '{spec}' requested but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return device


def _weights(config: ModelConfig, model_dir: Path) -> tuple[Path, str]:
    """The local weights file and the name that tells its format (remote: via the node cache)."""
    uri = config.storage_uri
    if uri is not None and fetch.is_remote(uri):
        try:
            return fetch.fetch_file(uri)
        except (StorageError, ValueError) as exc:
            raise LoadError(str(exc)) from None
    path = config.weights_path(model_dir)
    if path is None or not path.is_file():
        raise LoadError(f"weights file {path} does not exist")
    return path, path.name


def _load_state_dict(path: Path, name: str, device: torch.device) -> dict[str, torch.Tensor]:
    if name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path), device=str(device))
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise  # not a refusal: a damaged file, reported as it is
        # torch's own message suggests weights_only=False: never, and there is no such setting.
        raise LoadError(
            f"{path} holds pickled objects other than tensors, which Ember never unpickles "
            "(it could run code): save a plain state dict of tensors, or safetensors"
        ) from None
    if not isinstance(state, dict):
        raise LoadError(f"{path} does not hold a state dict")
    return state


def build_runner(
    config: ModelConfig, model_dir: Path, device: torch.device, phases: LoadPhases | None = None
) -> Runner:
    dtype = getattr(torch, config.dtype)
    if config.format == "python":
        assert config.class_ is not None  # checked by the schema
        cls = import_object(config.class_, model_dir)
        instance = cls(model_dir=model_dir, device=device, **config.kwargs)
        return PythonRunner(instance)
    fetching = time.monotonic()
    path, name = _weights(config, model_dir)
    if phases is not None and config.storage_uri and fetch.is_remote(config.storage_uri):
        phases.download += time.monotonic() - fetching
    module: Any
    if config.format == "torchscript":
        with warnings.catch_warnings():
            # torch 2.9+ deprecates TorchScript in favour of torch.export; it still loads, and
            # users still ship it, so the warning is noise in every server log.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
        module.eval()
    elif config.format == "torch_export":
        module = torch.export.load(str(path)).module().to(device)
    else:
        assert config.architecture is not None  # checked by the schema
        cls = import_object(config.architecture, model_dir)
        # Built on the meta device and given the loaded tensors: no second copy of the weights.
        with torch.device("meta"):
            module = cls(**config.architecture_kwargs)
        state = _load_state_dict(path, name, device)
        module.load_state_dict(state, strict=True, assign=True)
        module.eval()
    if config.dtype != "float32" and isinstance(module, torch.nn.Module):
        module = module.to(dtype)
    if config.compile:
        module = torch.compile(module, dynamic=True)
    if config.cuda_graphs and device.type == "cuda":
        return CudaGraphRunner(module, config, device)
    return TorchRunner(module, config, device)


def dummy_inputs(specs: list[TensorSpec], batch: int = 1) -> dict[str, np.ndarray]:
    """Zeros of the declared datatypes, with every variable dimension set to `batch`/1."""
    inputs = {}
    for spec in specs:
        shape = tuple(batch if i == 0 and d == -1 else max(d, 1) for i, d in enumerate(spec.shape))
        if spec.datatype == "BYTES":
            array = np.full(shape, b"", dtype=object)
        else:
            array = np.zeros(shape, dtype=numpy_dtype(spec.datatype))
        inputs[spec.name] = array
    return inputs


def load(
    config: ModelConfig,
    model_dir: Path,
    device_spec: str | None = None,
    phases: LoadPhases | None = None,
) -> tuple[Runner, torch.device]:
    """Load one instance (on `device_spec`, default the first configured device) and warm it
    up: one forward on a dummy batch, so the first real request is fast.

    Each instance holds its own copy of the weights, as Triton's instances do: no state is
    shared between threads.
    """
    try:
        device = resolve_device(device_spec or config.devices[0])
        started = time.monotonic()
        measured = LoadPhases()
        runner = build_runner(config, model_dir, device, measured)
        loaded = time.monotonic()
        runner.predict(dummy_inputs(config.inputs))
        if isinstance(runner, CudaGraphRunner):
            runner.capture()
        elif config.cuda_graphs:
            log.info(
                "cuda_graphs ignored: the model runs on the CPU",
                extra={"model": config.name, "device": str(device)},
            )
        if phases is not None:
            phases.download += measured.download
            phases.load += loaded - started - measured.download
            phases.warmup += time.monotonic() - loaded
    except (LoadError, ConfigError):
        raise
    except Exception as exc:
        # One log line: torch's multi-line messages are folded, and very long ones cut.
        detail = " ".join(str(exc).split())
        if len(detail) > 400:
            detail = detail[:400] + " ..."
        raise LoadError(f"{type(exc).__name__}: {detail}") from exc
    return runner, device
