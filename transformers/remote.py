"""`ember transformer`'s side of KServe's transformer contract: each model's tensors, after its
preprocess steps, go to a predictor over V1, V2 REST or V2 gRPC, with tritonclient's asyncio
clients for V2 (the same clients users point at Ember), and the answer comes back for the
postprocess steps.

The predictor serves the same model.toml with `--no-pipeline`, so the tensors sent here are
exactly the model's declared inputs and outputs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import numpy as np
import orjson

from ember.server.batching.batcher import Result
from ember.server.codecs.json_tensors import array_from_json
from ember.server.config import ModelConfig
from ember.server.datatypes import NUMPY_DTYPES
from ember.server.errors import (
    DeadlineExceeded,
    EmberError,
    InvalidInput,
    ModelFailed,
    ModelNotFound,
    Overloaded,
    PredictorUnavailable,
)
from ember.transformers.settings import PredictorSettings

# The predictor's answer, by the status it came with, as this process's own error: the client
# sees what it would have seen talking to the predictor directly.
_BY_HTTP: dict[str, type[EmberError]] = {
    "400": InvalidInput, "404": ModelNotFound, "429": Overloaded, "503": PredictorUnavailable,
    "504": DeadlineExceeded,
}  # fmt: skip
_BY_GRPC: dict[str, type[EmberError]] = {
    "StatusCode.INVALID_ARGUMENT": InvalidInput, "StatusCode.NOT_FOUND": ModelNotFound,
    "StatusCode.RESOURCE_EXHAUSTED": Overloaded, "StatusCode.UNAVAILABLE": PredictorUnavailable,
    "StatusCode.DEADLINE_EXCEEDED": DeadlineExceeded,
}  # fmt: skip


def _error(status: str | None, message: str, where: str) -> EmberError:
    kind = _BY_HTTP.get(status or "") or _BY_GRPC.get(status or "")
    # A model the predictor does not know is this server's failure (ours exists): a 500.
    if kind is None or kind is ModelNotFound:
        return ModelFailed(f"{where}: {message}")
    return kind(message)


Call = Callable[[dict[str, np.ndarray], float | None], Awaitable[dict[str, np.ndarray]]]


class RemoteModel:
    """One model's requests, sent to the predictor one by one (the predictor batches them)."""

    def __init__(self, config: ModelConfig, call: Call, close: Callable[[], Awaitable[None]]):
        self._config = config
        self._call = call
        self._close = close
        self._inflight = 0

    def __len__(self) -> int:
        return self._inflight

    def check_room(self) -> None:
        """The predictor's own queue limit answers 429; nothing is queued here."""

    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        deadline: float | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> Result:
        started = time.monotonic()
        if deadline is not None and started >= deadline:
            raise DeadlineExceeded(f"request to '{self._config.name}' expired before it was sent")
        self._inflight += 1
        try:
            outputs = await self._call(inputs, deadline)
        finally:
            self._inflight -= 1
        first = next(iter(inputs.values()), None)
        rows = int(first.shape[0]) if first is not None and first.ndim else 1
        return Result(outputs, 0.0, started, time.monotonic(), rows)

    async def close(self) -> None:
        await self._close()


def _infer_inputs(kind: Any, config: ModelConfig, inputs: dict[str, np.ndarray]) -> list[Any]:
    """tritonclient InferInputs (HTTP's send binary data by default), in declared order."""
    tensors = []
    for spec in config.inputs:
        if spec.name in inputs:
            array = inputs[spec.name]
            tensor = kind(spec.name, list(array.shape), spec.datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
    return tensors


def _remaining(deadline: float | None, timeout: float) -> float:
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded("the request's deadline passed before the predictor answered")
    return min(left, timeout)


class RemotePredictor:
    """`RemoteModels` for the repository: every model attached goes to one predictor host."""

    def __init__(self, settings: PredictorSettings) -> None:
        self.settings = settings

    async def attach(self, config: ModelConfig) -> RemoteModel:
        attach = {"v1": self._v1, "v2": self._v2, "grpc-v2": self._grpc}[self.settings.protocol]
        return await attach(config)

    def _where(self, config: ModelConfig) -> str:
        s = self.settings
        return f"predictor {s.host} ({s.protocol}) for model '{config.name}'"

    async def _v2(self, config: ModelConfig) -> RemoteModel:
        import tritonclient.http as http
        import tritonclient.http.aio as aio
        from tritonclient.utils import InferenceServerException

        s = self.settings
        client = aio.InferenceServerClient(s.host, ssl=s.use_ssl, conn_timeout=s.timeout_s)
        where = self._where(config)
        requested = [http.InferRequestedOutput(o.name, binary_data=True) for o in config.outputs]

        async def call(inputs: dict[str, np.ndarray], deadline: float | None) -> dict[str, Any]:
            tensors = _infer_inputs(http.InferInput, config, inputs)
            try:
                result = await asyncio.wait_for(
                    client.infer(config.name, tensors, outputs=requested),
                    _remaining(deadline, s.timeout_s),
                )
            except InferenceServerException as exc:
                raise _error(exc.status(), exc.message(), where) from None
            except TimeoutError:
                raise DeadlineExceeded(f"{where} did not answer in time") from None
            except aiohttp.ClientError as exc:
                raise PredictorUnavailable(f"{where} unreachable: {exc}") from None
            return {o.name: result.as_numpy(o.name) for o in config.outputs}

        return RemoteModel(config, call, client.close)

    async def _grpc(self, config: ModelConfig) -> RemoteModel:
        import tritonclient.grpc as grpc
        import tritonclient.grpc.aio as aio
        from tritonclient.utils import InferenceServerException

        s = self.settings
        client = aio.InferenceServerClient(s.host, ssl=s.use_ssl)
        where = self._where(config)
        requested = [grpc.InferRequestedOutput(o.name) for o in config.outputs]

        async def call(inputs: dict[str, np.ndarray], deadline: float | None) -> dict[str, Any]:
            tensors = _infer_inputs(grpc.InferInput, config, inputs)
            try:
                result = await client.infer(
                    config.name, tensors, outputs=requested,
                    client_timeout=_remaining(deadline, s.timeout_s),
                )  # fmt: skip
            except InferenceServerException as exc:
                if exc.status() == "StatusCode.UNAVAILABLE":
                    raise PredictorUnavailable(f"{where} unavailable: {exc.message()}") from None
                raise _error(exc.status(), exc.message() or "", where) from None
            return {o.name: result.as_numpy(o.name) for o in config.outputs}

        return RemoteModel(config, call, client.close)

    async def _v1(self, config: ModelConfig) -> RemoteModel:
        s = self.settings
        scheme = "https" if s.use_ssl else "http"
        url = f"{scheme}://{s.host}/v1/models/{config.name}:predict"
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=s.timeout_s))
        where = self._where(config)

        async def call(inputs: dict[str, np.ndarray], deadline: float | None) -> dict[str, Any]:
            body = orjson.dumps(_v1_body(inputs), option=orjson.OPT_SERIALIZE_NUMPY)
            headers = {"Content-Type": "application/json"}
            try:
                async with asyncio.timeout(_remaining(deadline, s.timeout_s)):
                    async with session.post(url, data=body, headers=headers) as response:
                        raw = await response.read()
                        status = response.status
            except TimeoutError:
                raise DeadlineExceeded(f"{where} did not answer in time") from None
            except aiohttp.ClientError as exc:
                raise PredictorUnavailable(f"{where} unreachable: {exc}") from None
            try:
                document = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise ModelFailed(f"{where} answered {status}, not JSON") from None
            if status != 200:
                message = document.get("error") if isinstance(document, dict) else None
                raise _error(str(status), str(message or f"status {status}"), where)
            return _v1_outputs(document, config, where)

        return RemoteModel(config, call, session.close)


def _v1_body(inputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """One input: its rows as `instances`. Several: one object per row, keyed by name (V1
    carries no datatypes; the predictor reads them from its model.toml)."""
    if len(inputs) == 1:
        return {"instances": next(iter(inputs.values()))}
    rows = next(iter(inputs.values())).shape[0]
    return {"instances": [{name: a[i] for name, a in inputs.items()} for i in range(rows)]}


def _v1_outputs(document: Any, config: ModelConfig, where: str) -> dict[str, np.ndarray]:
    predictions = document.get("predictions") if isinstance(document, dict) else None
    if not isinstance(predictions, list):
        raise ModelFailed(f"{where} answered without 'predictions'")
    try:
        if len(config.outputs) == 1:
            spec = config.outputs[0]
            return {spec.name: _as(spec.datatype, predictions, where)}
        return {
            s.name: _as(s.datatype, [row[s.name] for row in predictions], where)
            for s in config.outputs
        }
    except (KeyError, TypeError) as exc:
        raise ModelFailed(f"{where} answered predictions of another shape: {exc}") from None


def _as(datatype: str, data: Any, where: str) -> np.ndarray:
    try:
        carrier = "FP32" if datatype in ("FP16", "BF16") else datatype
        return array_from_json(data, carrier, None, where).astype(NUMPY_DTYPES[datatype])
    except InvalidInput as exc:
        raise ModelFailed(str(exc)) from None
