"""A model's `[pipeline]`: its steps loaded and checked once, then run around each request.

Preprocess turns the request's tensors (the pipeline's declared inputs) into the model's
inputs; postprocess turns the model's outputs for that request into the pipeline's declared
outputs. Every step sees every tensor known so far, so a postprocess step can read what a
preprocess step made (mean pooling reads the attention mask the tokenizer produced).

Where each step runs is decided when it loads: a run of consecutive synchronous steps is one
trip to the model's worker pool (tokenizers and image decoders hold no event loop), an
`async def` step is awaited on the loop.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from ember.server.config import ModelConfig, StepConfig, TensorSpec
from ember.server.datatypes import NUMPY_DTYPES
from ember.server.errors import InvalidInput, ModelFailed
from ember.server.imports import LoadError, import_object
from ember.transformers.step import BadInput, Spec, Step, Tensors

DEFAULT_WORKERS = 4


class ChainError(LoadError):
    """A pipeline that cannot run: a step that does not load or does not connect."""


@dataclass(frozen=True, slots=True)
class _Loaded:
    step: Step
    label: str  # "preprocess[0] module:Class", for messages
    is_async: bool


def _spec(spec: TensorSpec) -> Spec:
    return Spec(spec.name, spec.datatype, tuple(spec.shape))


def _fits(have: Spec, want: Spec) -> bool:
    return (
        have.datatype == want.datatype
        and len(have.shape) == len(want.shape)
        and all(a == b or -1 in (a, b) for a, b in zip(have.shape, want.shape, strict=True))
    )


def _describe(spec: Spec) -> str:
    return f"{spec.datatype} {list(spec.shape)}"


def _specs(step: object, attribute: str, label: str) -> list[Spec]:
    value = getattr(step, attribute, None)
    if not isinstance(value, Sequence) or not all(isinstance(s, Spec) for s in value):
        raise ChainError(f"{label}: '{attribute}' must be a sequence of step.Spec")
    return list(value)


def _is_async(step: object) -> bool:
    call = getattr(type(step), "__call__", None)  # noqa: B004 - the class's, not the instance's
    return inspect.iscoroutinefunction(call)


def _load_step(config: StepConfig, model_dir: Path, label: str) -> _Loaded:
    cls = import_object(config.class_, model_dir)
    try:
        step = cls(model_dir=model_dir, **config.kwargs)
    except (TypeError, ValueError, OSError) as exc:
        raise ChainError(f"{label}: {type(exc).__name__}: {exc}") from None
    if not callable(step):
        raise ChainError(f"{label}: {type(step).__name__} instances are not callable")
    _specs(step, "consumes", label)
    _specs(step, "produces", label)
    return _Loaded(cast(Step, step), label, _is_async(step))


def check(config: ModelConfig, pre: Sequence[_Loaded], post: Sequence[_Loaded]) -> None:
    """Walk the chain as a request would: every tensor a step consumes (and every model input,
    and every declared pipeline output) must exist by then with a compatible datatype and shape."""
    assert config.pipeline is not None
    known: dict[str, Spec] = {s.name: _spec(s) for s in config.pipeline.inputs}

    def need(want: Spec, who: str) -> None:
        have = known.get(want.name)
        if have is None:
            raise ChainError(
                f"model '{config.name}': {who} needs '{want.name}' ({_describe(want)}), which "
                f"nothing before it produces (available: {sorted(known)})"
            )
        if not _fits(have, want):
            raise ChainError(
                f"model '{config.name}': {who} needs '{want.name}' as {_describe(want)}, but "
                f"it is {_describe(have)} there"
            )

    def walk(steps: Sequence[_Loaded]) -> None:
        for loaded in steps:
            for want in loaded.step.consumes:
                need(want, loaded.label)
            known.update({s.name: s for s in loaded.step.produces})

    walk(pre)
    for spec in config.inputs:
        if spec.name in known or not spec.optional:
            need(_spec(spec), "the model's input")
    known.update({s.name: _spec(s) for s in config.outputs})
    walk(post)
    for spec in config.pipeline.outputs:
        need(_spec(spec), "the pipeline's output")


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(DEFAULT_WORKERS, cpus))


class Chain:
    """The loaded steps of one model and the threads that run its synchronous ones."""

    def __init__(
        self, model: str, pre: Sequence[_Loaded], post: Sequence[_Loaded], workers: int
    ) -> None:
        self.model = model
        self._pre = _stages(pre)
        self._post = _stages(post)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=f"pipeline-{model}")

    @classmethod
    def load(cls, config: ModelConfig, model_dir: Path) -> Chain:
        """Import, construct and check the steps of `config.pipeline`; raises ChainError (or
        LoadError for an import that fails) with one line naming the model and the step."""
        pipeline = config.pipeline
        assert pipeline is not None
        pre = [
            _load_step(s, model_dir, f"model '{config.name}' preprocess[{i}] {s.class_}")
            for i, s in enumerate(pipeline.preprocess)
        ]
        post = [
            _load_step(s, model_dir, f"model '{config.name}' postprocess[{i}] {s.class_}")
            for i, s in enumerate(pipeline.postprocess)
        ]
        check(config, pre, post)
        return cls(config.name, pre, post, pipeline.workers or _default_workers())

    async def preprocess(self, tensors: Mapping[str, np.ndarray]) -> Tensors:
        return await self._run(self._pre, dict(tensors))

    async def postprocess(self, tensors: Mapping[str, np.ndarray]) -> Tensors:
        return await self._run(self._post, dict(tensors))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, stages: Sequence[_Stage], tensors: Tensors) -> Tensors:
        loop = asyncio.get_running_loop()
        for stage in stages:
            if stage.is_async:
                tensors = await stage.run_async(tensors)
            else:
                tensors = await loop.run_in_executor(self._pool, stage.run, tensors)
        return tensors


@dataclass(frozen=True, slots=True)
class _Stage:
    steps: tuple[_Loaded, ...]
    is_async: bool

    def run(self, tensors: Tensors) -> Tensors:
        for loaded in self.steps:
            try:
                produced = loaded.step(tensors)
            except BadInput as exc:
                raise InvalidInput(str(exc)) from None
            tensors = _merge(loaded, tensors, produced)
        return tensors

    async def run_async(self, tensors: Tensors) -> Tensors:
        for loaded in self.steps:
            step = cast(Callable[[Tensors], Awaitable[Tensors]], loaded.step)
            try:
                produced = await step(tensors)
            except BadInput as exc:
                raise InvalidInput(str(exc)) from None
            tensors = _merge(loaded, tensors, produced)
        return tensors


def _stages(steps: Sequence[_Loaded]) -> list[_Stage]:
    stages: list[_Stage] = []
    for loaded in steps:
        if stages and not loaded.is_async and not stages[-1].is_async:
            last = stages.pop()
            stages.append(_Stage((*last.steps, loaded), False))
        else:
            stages.append(_Stage((loaded,), loaded.is_async))
    return stages


def _merge(loaded: _Loaded, tensors: Tensors, produced: Any) -> Tensors:
    """The step's results over what came before, after checking it kept its declaration: a
    step that does not is a bug in the step (a 500), never the client's fault."""
    if not isinstance(produced, Mapping):
        raise ModelFailed(f"{loaded.label} returned {type(produced).__name__}, expected a dict")
    rows = _rows(tensors)
    merged = dict(tensors)
    for spec in loaded.step.produces:
        array = produced.get(spec.name)
        if not isinstance(array, np.ndarray):
            raise ModelFailed(f"{loaded.label} did not produce '{spec.name}' as an array")
        if array.dtype != NUMPY_DTYPES[spec.datatype] or array.ndim != len(spec.shape):
            raise ModelFailed(
                f"{loaded.label} produced '{spec.name}' as {array.dtype} {list(array.shape)}, "
                f"declared {_describe(spec)}"
            )
        if rows is not None and array.ndim and array.shape[0] != rows:
            raise ModelFailed(
                f"{loaded.label} produced {array.shape[0]} rows of '{spec.name}' for a request "
                f"of {rows}"
            )
        merged[spec.name] = array
    return merged


def _rows(tensors: Tensors) -> int | None:
    first = next(iter(tensors.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else None
