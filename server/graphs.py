"""CUDA graphs: the forward captured once per batch size and replayed.

A captured graph launches every kernel of the forward with one call, which removes the
per-kernel launch cost that dominates small batches on a GPU. A graph is fixed in its shapes,
so a batch runs in the graph of the smallest captured size that holds it: its rows are
copied into the graph's static input buffers, the rest of the buffer is zeroed, the graph
replays, and the first rows of the static outputs are copied back. Rows are independent in
the models this serves (the batcher already relies on it), so the padding never changes a
real row's result. Batches larger than the largest size, or requests without an optional
input, run eagerly.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ember.server.config import ModelConfig
from ember.server.datatypes import TORCH_DTYPES, numpy_to_torch
from ember.server.runners import TorchRunner

WARMUP_REPLAYS = 3


def bucket(rows: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest of `sizes` (ascending) that holds `rows`, or None when none does."""
    i = bisect.bisect_left(sizes, rows)
    return sizes[i] if i < len(sizes) else None


@dataclass(slots=True)
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


class CudaGraphRunner(TorchRunner):
    """A TorchRunner on CUDA whose forwards replay captured graphs where one fits."""

    def __init__(self, module: Callable[..., Any], config: ModelConfig, device: torch.device):
        super().__init__(module, config, device)
        if self._stream is None:
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self._graph_stream: torch.cuda.Stream = self._stream
        self._batching = config.max_batch_size > 0
        self._sizes = config.graph_batch_sizes
        self._specs = config.inputs
        self._graphs: dict[int | None, _Graph] = {}

    def _static_inputs(self, size: int | None) -> dict[str, torch.Tensor]:
        tensors = {}
        for spec in self._specs:
            shape = [size, *spec.shape[1:]] if size is not None else list(spec.shape)
            dtype = TORCH_DTYPES[spec.datatype]
            if dtype.is_floating_point:
                dtype = self._float_dtype
            tensors[spec.name] = torch.zeros(shape, dtype=dtype, device=self._device)
        return tensors

    def capture(self) -> None:
        """Warm up and capture each size, the largest first, so that the smaller ones reuse
        its memory from the shared pool."""
        pool = torch.cuda.graph_pool_handle()
        sizes: list[int | None] = list(reversed(self._sizes)) if self._batching else [None]
        with torch.inference_mode():
            for size in sizes:
                static = self._static_inputs(size)
                args = [static[n] for n in self._input_names]
                with torch.cuda.stream(self._graph_stream):
                    for _ in range(WARMUP_REPLAYS):
                        self._module(*args)
                self._graph_stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                # thread_local: other models' instance threads may keep using the GPU while
                # this one captures (a load through the repository API at run time).
                with torch.cuda.graph(
                    graph, pool=pool, stream=self._graph_stream, capture_error_mode="thread_local"
                ):
                    outputs = self._named(self._module(*args))
                self._graphs[size] = _Graph(graph, static, outputs)
        torch.cuda.synchronize(self._device)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        found = self._graph_for(inputs)
        if found is None:
            return super().predict(inputs)
        graph, rows = found
        # The static buffers were made under inference mode: writing them needs it too,
        # whoever calls (the instance thread enters it; a direct caller may not).
        with torch.inference_mode(), torch.cuda.stream(self._graph_stream):
            for name, static in graph.inputs.items():
                tensor = numpy_to_torch(inputs[name])
                staged = self._pinned_in.get(name, tensor.shape, tensor.dtype)
                staged.copy_(tensor)
                if rows is None:
                    static.copy_(staged, non_blocking=True)
                    continue
                static[:rows].copy_(staged, non_blocking=True)
                if rows < static.shape[0]:
                    static[rows:].zero_()
            graph.graph.replay()
            outputs = graph.outputs
            if rows is not None:
                outputs = {name: t[:rows] for name, t in outputs.items()}
            return self._to_host(outputs)

    def _graph_for(self, inputs: dict[str, np.ndarray]) -> tuple[_Graph, int | None] | None:
        if len(inputs) != len(self._input_names) or not self._graphs:
            return None
        if not self._batching:
            graph = self._graphs.get(None)
            fits = graph is not None and all(
                tuple(graph.inputs[n].shape) == inputs[n].shape for n in self._input_names
            )
            return (graph, None) if fits and graph is not None else None
        rows = int(inputs[self._input_names[0]].shape[0])
        size = bucket(rows, self._sizes)
        graph = self._graphs.get(size) if size is not None else None
        return (graph, rows) if graph is not None else None
