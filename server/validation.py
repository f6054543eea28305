"""Checking a decoded request against the model's declared inputs and outputs.

Runs at the door, before any model work: a request that passes is well-formed for its model.
"""

from __future__ import annotations

import numpy as np

from ember.server.config import ModelConfig
from ember.server.errors import InvalidInput, ModelFailed
from ember.server.request import InferRequest


def _fits(shape: tuple[int, ...], declared: list[int]) -> bool:
    return len(shape) == len(declared) and all(
        d in (-1, s) for s, d in zip(shape, declared, strict=True)
    )


def validate(request: InferRequest, config: ModelConfig) -> dict[str, np.ndarray]:
    """The request's inputs by name, or InvalidInput saying which tensor and what was expected.
    A model with a pipeline is checked against the pipeline's inputs: those are what clients
    send."""
    specs = config.request_input_specs
    inputs: dict[str, np.ndarray] = {}
    for tensor in request.inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidInput(
                f"unknown input '{tensor.name}' for model '{config.name}', "
                f"expected one of {list(specs)}"
            )
        if tensor.name in inputs:
            raise InvalidInput(f"input '{tensor.name}' is given more than once")
        if tensor.datatype != spec.datatype:
            raise InvalidInput(
                f"input '{tensor.name}': datatype {tensor.datatype} does not match the model's "
                f"{spec.datatype}"
            )
        if not _fits(tensor.shape, spec.shape):
            raise InvalidInput(
                f"input '{tensor.name}': shape {list(tensor.shape)} does not match the model's "
                f"{spec.shape} (-1 = any size)"
            )
        if config.max_batch_size and tensor.shape and tensor.shape[0] > config.max_batch_size:
            raise InvalidInput(
                f"input '{tensor.name}': batch of {tensor.shape[0]} exceeds the model's "
                f"max_batch_size {config.max_batch_size}"
            )
        inputs[tensor.name] = tensor.data
    missing = [name for name in config.required_inputs if name not in inputs]
    if missing:
        raise InvalidInput(f"missing required input(s) {missing} for model '{config.name}'")
    if request.outputs is not None:
        declared = config.request_output_specs
        for out in request.outputs:
            if out.name not in declared:
                raise InvalidInput(
                    f"unknown output '{out.name}' requested from model '{config.name}', "
                    f"expected one of {sorted(declared)}"
                )
    return inputs


def model_inputs(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """The model's own inputs out of what a preprocess chain produced. A chain that produced a
    shape the model does not take is a bug in a step (ModelFailed), not the client's error."""
    inputs: dict[str, np.ndarray] = {}
    for spec in config.inputs:
        array = tensors.get(spec.name)
        if array is None:
            if spec.optional:
                continue
            raise ModelFailed(f"model '{config.name}': preprocess did not produce '{spec.name}'")
        if not _fits(array.shape, spec.shape):
            raise ModelFailed(
                f"model '{config.name}': preprocess produced '{spec.name}' of shape "
                f"{list(array.shape)}, the model takes {spec.shape}"
            )
        inputs[spec.name] = array
    return inputs
