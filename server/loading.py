"""Turning a model.toml into a warmed-up runner, through safe loaders only.

Weights are read with safetensors, `torch.load(weights_only=True)`, TorchScript or
torch.export archives: nothing here unpickles arbitrary objects.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

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
from ember.server.storage.download import ByteRange
from ember.server.storage.errors import StorageError
from ember.server.storage.pull import ReadRange
from ember.server.storage.sinks import FileSink
from ember.server.weights.handoff import Handoff
from ember.server.weights.header import HeaderError, read_header
from ember.server.weights.mode import stream_mode, streams
from ember.server.weights.placement import TensorPlacement

if TYPE_CHECKING:
    from ember.server.prefetch import Prefetch

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


@dataclass(frozen=True, slots=True)
class Weights:
    path: Path | None
    # The name that tells the format (a cached file's own name does not).
    name: str
    # Already on the device (streamed, or taken from a prefetch's handoff).
    state: dict[str, torch.Tensor] | None = None


def _not_streamed(where: object, exc: HeaderError) -> None:
    # A dtype this parser does not know (the safetensors package knows more), or a damaged
    # file: the package loads the file instead, or reports what is wrong with it.
    log.info(f"{where}: weights loaded by the safetensors package, not streamed: {exc}")


def _placer(device: torch.device, uri: str) -> Any:
    """A storage `PlaceFactory`: safetensors objects go onto `device` as they download."""

    def place(
        relative: PurePosixPath, size: int, read: ReadRange, file: FileSink
    ) -> TensorPlacement | None:
        if relative.suffix != ".safetensors":
            return None
        try:
            header = read_header(size, lambda start, end: read(ByteRange(start, end)))
        except HeaderError as exc:
            _not_streamed(uri, exc)
            return None
        return TensorPlacement(header, device)

    return place


def _from_handoff(
    handoff: Handoff, device: torch.device, uri: str
) -> dict[str, torch.Tensor] | None:
    placement: TensorPlacement | None = None
    try:
        placement = TensorPlacement(handoff.header, device)
        handoff.attach(placement)
        placement.finish()
    except Exception as exc:
        if placement is None:
            handoff.release()
        else:
            placement.abort()
        # The prefetch's download failed: the loader fetches again and reports that error.
        log.info("prefetched download of %s not used: %s", uri, exc)
        return None
    return placement.tensors


def _place_file(path: Path, device: torch.device) -> dict[str, torch.Tensor] | None:
    """A local safetensors file onto `device` through the same placement (the staging ring on
    CUDA), read in pieces: host memory stays the ring's, not the model's. None when the header
    is not one this parser takes."""
    with path.open("rb") as file:
        fd = file.fileno()
        size = os.fstat(fd).st_size
        try:
            header = read_header(size, lambda start, end: os.pread(fd, end - start, start))
        except HeaderError as exc:
            _not_streamed(path, exc)
            return None
        placement = TensorPlacement(header, device)
        try:
            placement.read_file(fd, [(header.data_start, size)])
            placement.finish()
        except BaseException:
            placement.abort()
            raise
    return placement.tensors


def _weights(
    config: ModelConfig,
    model_dir: Path,
    device: torch.device,
    prefetch: Prefetch | None = None,
) -> Weights:
    """The weights file and the name that tells its format (remote: via the node cache), or
    the tensors themselves when they were placed onto the device on the way."""
    mode = stream_mode(os.environ)
    streaming = config.format == "safetensors" and streams(mode, device.type)
    uri = config.storage_uri if config.storage_uri and fetch.is_remote(config.storage_uri) else None
    if uri is not None:
        handoff = prefetch.claim(uri) if prefetch is not None else None
        if handoff is not None:
            if streaming and (state := _from_handoff(handoff, device, uri)) is not None:
                _placed(config, device, "from the download started before the imports")
                return Weights(None, PurePosixPath(uri).name, state)
            handoff.release()
        try:
            path, name, placement = fetch.fetch_file(
                uri, place=_placer(device, uri) if streaming else None
            )
        except (StorageError, ValueError) as exc:
            raise LoadError(str(exc)) from None
        if placement is not None:
            assert isinstance(placement, TensorPlacement)
            _placed(config, device, "as they downloaded")
            return Weights(path, name, placement.tensors)
    else:
        local = config.weights_path(model_dir)
        if local is None or not local.is_file():
            raise LoadError(f"weights file {local} does not exist")
        path, name = local, local.name
    if streaming and name.endswith(".safetensors"):
        state = _place_file(path, device)
        if state is not None:
            _placed(config, device, "from the cached file" if uri else "from the file")
            return Weights(path, name, state)
    return Weights(path, name)


def _placed(config: ModelConfig, device: torch.device, how: str) -> None:
    log.info(
        f"weights placed onto {device} {how}", extra={"model": config.name, "device": str(device)}
    )


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
    config: ModelConfig,
    model_dir: Path,
    device: torch.device,
    phases: LoadPhases | None = None,
    prefetch: Prefetch | None = None,
) -> Runner:
    dtype = getattr(torch, config.dtype)
    if config.format == "python":
        assert config.class_ is not None  # checked by the schema
        cls = import_object(config.class_, model_dir)
        instance = cls(model_dir=model_dir, device=device, **config.kwargs)
        return PythonRunner(instance)
    fetching = time.monotonic()
    weights = _weights(config, model_dir, device, prefetch)
    path, name = weights.path, weights.name
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
        if weights.state is not None:
            state = weights.state
        else:
            assert path is not None
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
    prefetch: Prefetch | None = None,
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
        runner = build_runner(config, model_dir, device, measured, prefetch)
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
