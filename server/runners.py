"""What runs a forward pass: a torch module or a user's Python class, behind one call.

`Runner.predict` takes and returns named numpy arrays; it runs on a worker thread, never on
the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import torch

from ember.server.config import ModelConfig
from ember.server.datatypes import TORCH_DTYPES, numpy_to_torch, torch_to_numpy
from ember.server.errors import ModelFailed


class Runner(Protocol):
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class _PinnedBuffers:
    """Reusable page-locked host buffers, one per tensor name, grown when a batch needs more.

    Pinning is slow (a syscall and page locking): done per request it costs more than the copy
    it speeds up, so each instance allocates once and reuses.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        count = shape.numel()
        buffer = self._buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < count:
            buffer = torch.empty(count, dtype=dtype, pin_memory=True)
            self._buffers[name] = buffer
        return buffer[:count].view(shape)


class TorchRunner:
    """A torch callable: inputs are passed positionally in declared order, on `device`.

    On CUDA each runner (one per instance) has its own stream and pinned staging buffers:
    host-to-device copies are issued `non_blocking` from pinned memory, outputs come back the
    same way, and one stream synchronisation ends the batch.
    """

    def __init__(self, module: Callable[..., Any], config: ModelConfig, device: torch.device):
        self._module = module
        self._config = config
        self._device = device
        self._input_names = [s.name for s in config.inputs]
        self._outputs = config.outputs
        self._float_dtype = getattr(torch, config.dtype)
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._cuda else None  # type: ignore[no-untyped-call]
        self._pinned_in = _PinnedBuffers()
        self._pinned_out = _PinnedBuffers()

    def _to_device(self, name: str, array: np.ndarray) -> torch.Tensor:
        tensor = numpy_to_torch(array)
        if self._cuda:
            staged = self._pinned_in.get(name, tensor.shape, tensor.dtype)
            staged.copy_(tensor)
            tensor = staged.to(self._device, non_blocking=True)
        if tensor.is_floating_point() and tensor.dtype != self._float_dtype:
            tensor = tensor.to(self._float_dtype)
        return tensor

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._stream is None:
            return self._predict(inputs)
        with torch.cuda.stream(self._stream):
            return self._predict(inputs)

    def _predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [self._to_device(n, inputs[n]) for n in self._input_names if n in inputs]
        with torch.inference_mode():
            result = self._module(*args)
        return self._name_outputs(result)

    def _name_outputs(self, result: Any) -> dict[str, np.ndarray]:
        return self._to_host(self._named(result))

    def _named(self, result: Any) -> dict[str, torch.Tensor]:
        """The module's result as the declared outputs, in their declared dtypes."""
        if isinstance(result, torch.Tensor):
            tensors: Mapping[str, torch.Tensor] = {self._outputs[0].name: result}
        elif isinstance(result, list | tuple):
            if len(result) != len(self._outputs):
                raise ModelFailed(
                    f"model returned {len(result)} tensors, model.toml declares "
                    f"{len(self._outputs)} outputs"
                )
            tensors = {s.name: t for s, t in zip(self._outputs, result, strict=True)}
        elif isinstance(result, Mapping):
            tensors = result
        else:
            raise ModelFailed(f"model returned {type(result).__name__}, expected tensor(s)")
        named: dict[str, torch.Tensor] = {}
        for spec in self._outputs:
            tensor = tensors.get(spec.name)
            if tensor is None:
                raise ModelFailed(f"model did not return output '{spec.name}'")
            want = TORCH_DTYPES[spec.datatype]
            named[spec.name] = tensor if tensor.dtype == want else tensor.to(want)
        return named

    def _to_host(self, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        if not self._cuda:
            return {name: torch_to_numpy(t) for name, t in tensors.items()}
        host = {}
        for name, tensor in tensors.items():
            staged = self._pinned_out.get(name, tensor.shape, tensor.dtype)
            staged.copy_(tensor, non_blocking=True)
            host[name] = staged
        if self._stream is not None:
            self._stream.synchronize()
        # The pinned buffers are reused by the next batch: hand out copies.
        return {name: torch_to_numpy(t).copy() for name, t in host.items()}


class PythonRunner:
    """A user's class with `predict(dict[str, ndarray]) -> dict[str, ndarray]`."""

    def __init__(self, instance: Any):
        predict = getattr(instance, "predict", None)
        if not callable(predict):
            raise TypeError(f"{type(instance).__name__} has no predict() method")
        self._predict: Callable[[dict[str, np.ndarray]], Any] = predict

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self._predict(inputs)
        if not isinstance(result, Mapping):
            raise ModelFailed(f"predict() returned {type(result).__name__}, expected a dict")
        return {name: np.asarray(value) for name, value in result.items()}
