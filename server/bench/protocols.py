"""What the load sends, per wire protocol: the request, prepared once, and a check of one answer.

`--protocol` picks a factory from `PROTOCOLS`. A protocol hands the load loop workers
(`OpenWorker`) for inference and for its liveness endpoint (the server's own floor); V2 binary
tensors or gRPC become new classes here with the same three methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import numpy as np
import orjson

from ember.server.bench.client import HttpRequest, fetch, http_worker
from ember.server.bench.load import OpenWorker
from ember.server.config import TensorSpec
from ember.server.datatypes import numpy_dtype


class BenchError(Exception):
    """A bench that cannot run as asked; the message is one line for the user."""


def build_inputs(specs: Sequence[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic inputs for the declared specs: every -1 dimension becomes 1 (batch 1)."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        shape = tuple(1 if d == -1 else d for d in spec.shape)
        if spec.datatype == "BYTES":
            raise BenchError(f"input '{spec.name}': BYTES inputs are not generated yet")
        dtype = numpy_dtype(spec.datatype)
        if spec.datatype == "BOOL":
            array = rng.random(shape) < 0.5
        elif dtype.kind in "iu":
            array = rng.integers(0, 10, size=shape).astype(dtype)
        else:
            array = rng.standard_normal(shape).astype(dtype)
        inputs[spec.name] = array
    return inputs


class LoadProtocol(Protocol):
    """One wire protocol: workers for inference and for liveness, and a check of one answer."""

    @property
    def name(self) -> str: ...

    def infer(self, base_url: str) -> OpenWorker: ...

    def live(self, base_url: str) -> OpenWorker: ...

    async def check(self, base_url: str) -> None: ...


@dataclass(frozen=True, slots=True)
class V2Json:
    """Open Inference Protocol REST with JSON tensor data; the body is encoded once."""

    model: str
    infer_request: HttpRequest
    outputs: tuple[str, ...]
    timeout: float
    name: str = "v2-json"

    # JSON numbers cannot carry these in Ember (see ember.server.codecs.json_tensors).
    UNSUPPORTED = ("FP16", "BF16", "BYTES")

    @classmethod
    def create(
        cls,
        model: str,
        specs: Sequence[TensorSpec],
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str],
        timeout: float,
    ) -> V2Json:
        tensors = []
        for spec in specs:
            if spec.datatype in cls.UNSUPPORTED:
                raise BenchError(f"input '{spec.name}': {spec.datatype} cannot be sent as JSON")
            array = inputs[spec.name]
            tensors.append({
                "name": spec.name, "datatype": spec.datatype, "shape": list(array.shape),
                # Flat row-major data; orjson writes numpy arrays directly, float32 as
                # its shortest round-tripping decimal, so the server decodes the same values.
                "data": np.ascontiguousarray(array).reshape(-1),
            })  # fmt: skip
        body = orjson.dumps({"inputs": tensors}, option=orjson.OPT_SERIALIZE_NUMPY)
        request = HttpRequest(
            "POST", f"/v2/models/{model}/infer", body, {"Content-Type": "application/json"}
        )
        return cls(model=model, infer_request=request, outputs=tuple(outputs), timeout=timeout)

    def infer(self, base_url: str) -> OpenWorker:
        return lambda: http_worker(base_url, self.infer_request, self.timeout)

    def live(self, base_url: str) -> OpenWorker:
        return lambda: http_worker(base_url, HttpRequest("GET", "/v2/health/live"), self.timeout)

    async def check(self, base_url: str) -> None:
        """One request before the load: the model answers 200 with its declared outputs."""
        try:
            status, payload = await fetch(base_url, self.infer_request, self.timeout)
        except (OSError, TimeoutError, aiohttp.ClientError) as exc:
            raise BenchError(f"{base_url}: no answer: {type(exc).__name__}: {exc}") from None
        if status != 200:
            text = payload[:300].decode(errors="replace")
            raise BenchError(f"{base_url}: inference on '{self.model}' answered {status}: {text}")
        doc: Any = orjson.loads(payload)
        names = {o.get("name") for o in doc.get("outputs", []) if isinstance(o, dict)}
        missing = [n for n in self.outputs if n not in names]
        if missing:
            raise BenchError(f"{base_url}: answer from '{self.model}' lacks outputs {missing}")


ProtocolFactory = Callable[
    [str, Sequence[TensorSpec], dict[str, np.ndarray], Sequence[str], float], LoadProtocol
]


PROTOCOLS: dict[str, ProtocolFactory] = {"v2-json": V2Json.create}
