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


class TorchRunner:
    """A torch callable: inputs are passed positionally in declared order, on `device`."""

    def __init__(self, module: Callable[..., Any], config: ModelConfig, device: torch.device):
        self._module = module
        self._config = config
        self._device = device
        self._input_names = [s.name for s in config.inputs]
        self._outputs = config.outputs
        self._float_dtype = getattr(torch, config.dtype)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = numpy_to_torch(array)
        if tensor.is_floating_point():
            tensor = tensor.to(self._float_dtype)
        return tensor.to(self._device, non_blocking=True)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [self._to_device(inputs[n]) for n in self._input_names if n in inputs]
        with torch.inference_mode():
            result = self._module(*args)
        return self._name_outputs(result)

    def _name_outputs(self, result: Any) -> dict[str, np.ndarray]:
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
        named = {}
        for spec in self._outputs:
            tensor = tensors.get(spec.name)
            if tensor is None:
                raise ModelFailed(f"model did not return output '{spec.name}'")
            want = TORCH_DTYPES[spec.datatype]
            if tensor.dtype != want:
                tensor = tensor.to(want)
            named[spec.name] = torch_to_numpy(tensor)
        return named


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
