"""What the load sends, per wire protocol: the request, prepared once, and a check of one answer.

`--protocol` picks factories from `PROTOCOLS`. A protocol hands the load loop workers
(`OpenWorker`) for inference and for its liveness endpoint (the server's own floor), and
checks one answer before the load, which also tells how many tensor bytes an answer holds.
REST JSON and REST binary tensors are here; gRPC is in `grpc_load` (imported only when asked
for, so an HTTP-only bench does not load grpc).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import numpy as np
import orjson

from ember.server.bench.client import (
    BadAnswer,
    HttpRequest,
    fetch,
    http_retry_worker,
    http_worker,
)
from ember.server.bench.errors import BenchError
from ember.server.bench.load import OpenRetryWorker, OpenWorker
from ember.server.bench.payload import Payload, raw_bytes, tensor_bytes

__all__ = [
    "PROTOCOLS", "BenchError", "LoadProtocol", "RetryingProtocol", "V2Binary", "V2Json",
    "retrying",
]  # fmt: skip

# Triton's binary tensor extension: the JSON part's length, on requests and answers alike.
BINARY_HEADER = "Inference-Header-Content-Length"


class LoadProtocol(Protocol):
    """One wire protocol: workers for inference and for liveness, and a check of one answer.

    `infer`, `live` and `check` take the server's address for `transport`: a base URL for
    "http", `host:port` for "grpc".
    """

    @property
    def name(self) -> str: ...

    @property
    def transport(self) -> str: ...

    @property
    def request_bytes(self) -> int: ...

    def infer(self, address: str) -> OpenWorker: ...

    def live(self, address: str) -> OpenWorker: ...

    async def check(self, address: str) -> int:
        """Send one request; raise BenchError unless the answer is right; return its tensor
        bytes."""
        ...


def _infer_path(model: str) -> str:
    return f"/v2/models/{model}/infer"


async def _fetch_checked(
    base_url: str, request: HttpRequest, model: str, timeout: float
) -> tuple[Mapping[str, str], bytes]:
    """One request before the load; its 200 answer (headers, body) or a BenchError."""
    try:
        status, headers, payload = await fetch(base_url, request, timeout)
    except (OSError, TimeoutError, aiohttp.ClientError) as exc:
        raise BenchError(f"{base_url}: no answer: {type(exc).__name__}: {exc}") from None
    if status != 200:
        text = payload[:300].decode(errors="replace")
        raise BenchError(f"{base_url}: inference on '{model}' answered {status}: {text}")
    return headers, payload


def _require_outputs(doc: Any, wanted: Sequence[str], where: str) -> list[dict[str, Any]]:
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(outputs, list) or not outputs:
        raise BenchError(f"{where}: the answer has no outputs")
    items = [o for o in outputs if isinstance(o, dict)]
    names = {o.get("name") for o in items}
    missing = [n for n in wanted if n not in names]
    if missing:
        raise BenchError(f"{where}: the answer lacks outputs {missing}")
    return items


def _json_tensor_bytes(output: dict[str, Any]) -> int:
    """Tensor bytes of one V2 JSON output: as raw bytes, what the same tensor weighs in binary."""
    size = tensor_bytes(str(output.get("datatype")), output.get("shape") or [])
    if size is not None:
        return size
    # BYTES: each element as the binary extension would carry it (4-byte length + UTF-8).
    return sum(4 + len(str(item).encode()) for item in output.get("data") or [])


def _named_outputs(payload: Payload, parameters: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The request's `outputs` list: each wanted output, with `parameters` when given."""
    if parameters is None:
        return [{"name": name} for name in payload.outputs]
    return [{"name": name, "parameters": parameters} for name in payload.outputs]


@dataclass(frozen=True, slots=True)
class V2Json:
    """Open Inference Protocol REST with JSON tensor data; the body is encoded once.

    Each answer is read to the end but not parsed in the loop: what the load measures is the
    server's JSON work (and the transfer), not the client's, which flatters JSON a little.
    """

    model: str
    infer_request: HttpRequest
    outputs: tuple[str, ...]
    request_bytes: int
    timeout: float
    name: str = "v2-json"
    transport: str = "http"

    # JSON numbers cannot carry these in Ember (see ember.server.codecs.json_tensors).
    UNSUPPORTED = ("FP16", "BF16", "BYTES")

    @classmethod
    def create(cls, payload: Payload, timeout: float) -> V2Json:
        tensors = []
        for spec in payload.specs:
            if spec.datatype in cls.UNSUPPORTED:
                raise BenchError(f"input '{spec.name}': {spec.datatype} cannot be sent as JSON")
            array = payload.inputs[spec.name]
            tensors.append({
                "name": spec.name, "datatype": spec.datatype, "shape": list(array.shape),
                # Flat row-major data; orjson writes numpy arrays directly, float32 as
                # its shortest round-tripping decimal, so the server decodes the same values.
                "data": np.ascontiguousarray(array).reshape(-1),
            })  # fmt: skip
        doc: dict[str, Any] = {"inputs": tensors}
        if payload.name_outputs:
            doc["outputs"] = _named_outputs(payload, None)
        body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        request = HttpRequest(
            "POST", _infer_path(payload.model), body, {"Content-Type": "application/json"}
        )
        return cls(
            model=payload.model, infer_request=request, outputs=payload.outputs,
            request_bytes=payload.request_bytes, timeout=timeout,
        )  # fmt: skip

    def infer(self, address: str) -> OpenWorker:
        return lambda: http_worker(address, self.infer_request, self.timeout)

    def live(self, address: str) -> OpenWorker:
        return lambda: http_worker(address, HttpRequest("GET", "/v2/health/live"), self.timeout)

    def overload(self, address: str) -> OpenRetryWorker:
        """Workers for the overload level: a 429 is answered with its Retry-After."""
        return lambda: http_retry_worker(address, self.infer_request, self.timeout)

    async def check(self, address: str) -> int:
        """One request before the load: the model answers 200 with its declared outputs."""
        _, body = await _fetch_checked(address, self.infer_request, self.model, self.timeout)
        try:
            doc: Any = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BenchError(
                f"{address}: the answer from '{self.model}' is not JSON: {exc}"
            ) from None
        outputs = _require_outputs(doc, self.outputs, f"{address}: '{self.model}'")
        return sum(_json_tensor_bytes(o) for o in outputs)


def binary_request_body(payload: Payload) -> tuple[bytes, int]:
    """A request in Triton's binary tensor extension: (body, length of its JSON part).

    Every input travels as raw bytes (`binary_data_size`), every output is asked for as raw
    bytes: named ones with `binary_data: true`, else all with `binary_data_output: true`.
    """
    blobs = [raw_bytes(payload.inputs[spec.name]) for spec in payload.specs]
    inputs = [
        {"name": spec.name, "datatype": spec.datatype,
         "shape": list(payload.inputs[spec.name].shape),
         "parameters": {"binary_data_size": len(blob)}}
        for spec, blob in zip(payload.specs, blobs, strict=True)
    ]  # fmt: skip
    doc: dict[str, Any] = {"inputs": inputs}
    if payload.name_outputs:
        doc["outputs"] = _named_outputs(payload, {"binary_data": True})
    else:
        doc["parameters"] = {"binary_data_output": True}
    header = orjson.dumps(doc)
    return b"".join([header, *blobs]), len(header)


def read_binary_answer(headers: Mapping[str, str], body: bytes) -> tuple[list[dict[str, Any]], int]:
    """An answer in the binary extension: (its outputs, their raw tensor bytes).

    Raises BadAnswer unless the JSON part's length is in the header and every byte after it
    is claimed by exactly one output's `binary_data_size`. Runs on every answer of the load:
    it reads the small JSON part only, never the tensor bytes.
    """
    length = headers.get(BINARY_HEADER)
    if length is None or not length.isdigit() or int(length) > len(body):
        raise BadAnswer(f"{BINARY_HEADER} is {length!r} for a body of {len(body)} bytes")
    split = int(length)
    try:
        doc = orjson.loads(memoryview(body)[:split])
    except orjson.JSONDecodeError as exc:
        raise BadAnswer(f"the JSON part of the answer does not parse: {exc}") from None
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not isinstance(outputs, list) or not outputs:
        raise BadAnswer("the answer has no outputs")
    claimed = 0
    for output in outputs:
        size = (output.get("parameters") or {}).get("binary_data_size")
        if type(size) is not int or size < 0:
            raise BadAnswer(f"output {output.get('name')!r} did not come as binary data")
        expected = tensor_bytes(str(output.get("datatype")), output.get("shape") or [])
        if expected is not None and size != expected:
            raise BadAnswer(
                f"output {output.get('name')!r}: {output.get('datatype')} "
                f"{output.get('shape')} needs {expected} bytes, binary_data_size says {size}"
            )
        claimed += size
    if claimed != len(body) - split:
        raise BadAnswer(
            f"the outputs claim {claimed} bytes, the body holds {len(body) - split} after the JSON"
        )
    return outputs, claimed


def _verify_binary(headers: Mapping[str, str], body: bytes) -> None:
    read_binary_answer(headers, body)


@dataclass(frozen=True, slots=True)
class V2Binary:
    """Open Inference Protocol REST with Triton's binary tensor extension: a JSON header and
    the raw tensor bytes, both ways; the body is built once, every answer's framing checked."""

    model: str
    infer_request: HttpRequest
    outputs: tuple[str, ...]
    request_bytes: int
    timeout: float
    name: str = "v2-binary"
    transport: str = "http"

    @classmethod
    def create(cls, payload: Payload, timeout: float) -> V2Binary:
        body, header_length = binary_request_body(payload)
        # The server knows a binary body by the length header only (tritonclient sends no
        # Content-Type); aiohttp would label a bytes body octet-stream anyway.
        headers = {BINARY_HEADER: str(header_length), "Content-Type": "application/octet-stream"}
        request = HttpRequest("POST", _infer_path(payload.model), body, headers)
        return cls(
            model=payload.model, infer_request=request, outputs=payload.outputs,
            request_bytes=payload.request_bytes, timeout=timeout,
        )  # fmt: skip

    def infer(self, address: str) -> OpenWorker:
        return lambda: http_worker(address, self.infer_request, self.timeout, _verify_binary)

    def live(self, address: str) -> OpenWorker:
        return lambda: http_worker(address, HttpRequest("GET", "/v2/health/live"), self.timeout)

    def overload(self, address: str) -> OpenRetryWorker:
        return lambda: http_retry_worker(address, self.infer_request, self.timeout, _verify_binary)

    async def check(self, address: str) -> int:
        headers, body = await _fetch_checked(address, self.infer_request, self.model, self.timeout)
        try:
            outputs, size = read_binary_answer(headers, body)
        except BadAnswer as exc:
            raise BenchError(f"{address}: binary answer from '{self.model}': {exc}") from None
        _require_outputs({"outputs": outputs}, self.outputs, f"{address}: '{self.model}'")
        return size


def _grpc(payload: Payload, timeout: float) -> LoadProtocol:
    # Imported here: grpc and the Triton stubs load only for a bench that asks for gRPC.
    from ember.server.bench.grpc_load import GrpcInfer

    return GrpcInfer.create(payload, timeout)


class RetryingProtocol(LoadProtocol, Protocol):
    """A protocol the overload level can use: one whose refusals carry a Retry-After (HTTP;
    gRPC's RESOURCE_EXHAUSTED carries no wait, so it is not one)."""

    def overload(self, address: str) -> OpenRetryWorker: ...


def retrying(protocol: LoadProtocol) -> RetryingProtocol | None:
    return protocol if isinstance(protocol, V2Json | V2Binary) else None


ProtocolFactory = Callable[[Payload, float], LoadProtocol]


PROTOCOLS: dict[str, ProtocolFactory] = {
    "v2-json": V2Json.create,
    "v2-binary": V2Binary.create,
    "grpc": _grpc,
}
