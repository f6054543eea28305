"""What a pre- or post-processing step is. Steps depend on this module and nothing else of Ember.

A step is a class named in model.toml `[pipeline]` as `module:Class`. It is constructed once
per model with `model_dir=` (the model's folder, for files such as tokenizer.json) and the
keyword arguments written in model.toml, and then called once per request:

    step(tensors) -> {name: array, ...}

`tensors` holds every tensor known at that point of the chain, by name: the request's inputs
and what earlier steps (and, for postprocess steps, the model) produced, each with the
request's rows as the first dimension. The step returns at least the tensors it declares in
`produces`; they replace tensors of the same name for the steps after it.

`__call__` may be a plain method (run on the model's worker pool, off the event loop: the
right choice for tokenizing, decoding, numpy work) or `async def` (awaited on the event loop:
for steps that only wait, such as calling another service). Which one is decided once, when
the step is loaded.

BYTES tensors are numpy object arrays of `bytes`. A step that cannot process the request's
data raises `BadInput` with a message naming the tensor and what was expected: the client
gets a 400 with that message. Any other exception is a bug in the step: a 500, logged once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class Spec:
    """A tensor a step reads or writes: its name, V2 datatype and shape (-1 = any size; the
    first dimension is the request's rows)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class BadInput(ValueError):
    """The request's data cannot be processed; the message says which tensor and why."""


@runtime_checkable
class Step(Protocol):
    @property
    def consumes(self) -> Sequence[Spec]: ...

    @property
    def produces(self) -> Sequence[Spec]: ...

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> Tensors | Awaitable[Tensors]: ...
