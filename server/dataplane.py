"""The transport-neutral core: every protocol adapter calls these methods and nothing else."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ember.server.codecs import triton_config
from ember.server.config import ModelConfig
from ember.server.datatypes import NUMPY_DTYPES
from ember.server.errors import EmberError, ErrorCode, ModelFailed
from ember.server.metrics import ModelMetrics, PredictorMetrics
from ember.server.repository import ModelHandle, ModelRepository
from ember.server.request import InferRequest, InferResponse, Tensor
from ember.server.validation import model_inputs, validate

log = logging.getLogger("ember.server.dataplane")


def _as_declared(array: np.ndarray, datatype: str) -> np.ndarray:
    want = NUMPY_DTYPES[datatype]
    if array.dtype == want:
        return array
    if datatype == "BYTES":
        return np.array([x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1)],
                        dtype=object).reshape(array.shape)  # fmt: skip
    return array.astype(want)


# Triton's `reason` label on nv_inference_request_failure.
_FAILURE_REASON = {
    ErrorCode.OVERLOADED.value: "REJECTED",
    ErrorCode.DEADLINE_EXCEEDED.value: "REJECTED",
    ErrorCode.MODEL_FAILED.value: "BACKEND",
}


def _batch_size(inputs: dict[str, np.ndarray], max_batch_size: int) -> int:
    """Rows in this request when the model batches (first dimension), else 1, as Triton counts."""
    if max_batch_size == 0:
        return 1
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        metrics: PredictorMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.repository = repository
        self.metrics = metrics
        self._clock = clock
        self.draining = False
        # Requests inside infer(); graceful shutdown waits for this to reach zero.
        self.inflight = 0

    # Health: live while the process runs; ready when every model is, and not draining.
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return not self.draining and self.repository.all_ready()

    def model(self, name: str, version: str | None = None) -> ModelConfig:
        return self.repository.get(name, version).config

    def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        handle = self.repository.get(name, version)
        kind = handle.device.type if handle.device is not None else "cpu"
        return triton_config.model_config(handle.config, kind)

    def statistics(
        self, name: str | None = None, version: str | None = None
    ) -> list[dict[str, Any]]:
        handles = (
            self.repository.handles() if name is None else [self.repository.get(name, version)]
        )
        return [h.stats.doc(h.name, h.config.version) for h in handles]

    def admit(self, name: str, version: str | None = None) -> ModelConfig:
        """The model's config if a request to it could be queued now; raises ModelNotFound,
        ModelNotReady or Overloaded before anything is read or decoded."""
        handle = self.repository.ready_handle(name, version)
        if handle.batcher is not None:
            handle.batcher.check_room()
        return handle.config

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self.repository.get(name, version).is_ready()

    def reject(self, model_name: str, protocol: str, error: EmberError) -> None:
        """Count a request its adapter could not decode."""
        label = model_name if self.repository.has(model_name) else "unknown"
        self.metrics.model(label).request(protocol, error.code.value)

    async def infer(self, request: InferRequest, protocol: str) -> InferResponse:
        """Run one request through its model. Raises EmberError subclasses only."""
        # Unknown names share one label, so a scan of made-up names cannot grow the registry.
        name = request.model_name if self.repository.has(request.model_name) else "unknown"
        metrics = self.metrics.model(name)
        outcome = "success"
        started = self._clock()
        metrics.inflight += 1
        self.inflight += 1
        try:
            return await self._infer(request, started, metrics)
        except EmberError as exc:
            outcome = exc.code.value
            raise
        except Exception as exc:
            # A bug in model code: logged here once, shown to the client without a traceback.
            outcome = ModelFailed.code.value
            log.exception("inference failed", extra={"model": name})
            raise ModelFailed(f"model '{name}' failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.inflight -= 1
            metrics.inflight -= 1
            metrics.request(protocol, outcome)
            if outcome != "success" and name != "unknown":
                stats = self.repository.get(name).stats
                stats.record_failure(self._clock() - started, _FAILURE_REASON.get(outcome, "OTHER"))

    async def _infer(
        self, request: InferRequest, started: float, metrics: ModelMetrics
    ) -> InferResponse:
        handle = self.repository.ready_handle(request.model_name, request.model_version)
        config = handle.config
        inputs = validate(request, config)
        chain = handle.chain
        tensors: dict[str, np.ndarray] = {}
        if chain is not None:
            tensors = await chain.preprocess(inputs)
            inputs = model_inputs(tensors, config)
        submitted = self._clock()
        metrics.preprocess.observe(submitted - started)
        result = await handle.predict(inputs, request.deadline, request.parameters)
        returned = self._clock()
        metrics.predict.observe(returned - submitted)
        metrics.queue_wait.observe(result.queued)
        outputs = result.outputs
        if chain is not None:
            outputs = await chain.postprocess({**tensors, **outputs})
        response = self._response(request, handle, outputs)
        done = self._clock()
        metrics.postprocess.observe(done - returned)
        handle.stats.record_success(
            rows=_batch_size(inputs, config.max_batch_size),
            total=done - started,
            queue=result.queued,
            inputs=submitted - started,
            infer=result.ended - result.started,
            outputs=done - returned,
        )
        return response

    def _response(
        self, request: InferRequest, handle: ModelHandle, outputs: dict[str, np.ndarray]
    ) -> InferResponse:
        config = handle.config
        declared = config.request_output_specs
        wanted = (
            [o.name for o in request.outputs]
            if request.outputs
            else [name for name in declared if name in outputs]
        )
        tensors = []
        for name in wanted:
            array = outputs.get(name)
            if array is None:
                raise ModelFailed(f"model '{config.name}' did not produce output '{name}'")
            datatype = declared[name].datatype
            tensors.append(Tensor(name=name, datatype=datatype, data=_as_declared(array, datatype)))
        return InferResponse(
            model_name=config.name,
            model_version=config.version,
            id=request.id,
            outputs=tensors,
        )
