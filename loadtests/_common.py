"""What every locustfile here shares: the command-line options, the request data, the bodies of
each wire protocol and the checks on their answers.

The leading underscore keeps locust from taking this file for a locustfile when it is given
the whole folder. Locust puts the locustfile's folder on `sys.path`, so the locustfiles import
it as `_common`.

Request data comes, in this order of preference, from `--payload FILE` (a V2 JSON request
body), from the table below for the example models (so that a scenario never has to ask the
server first: through the activator that would wake a model at zero), or from the model's
V2 metadata (`GET /v2/models/{m}`), optionally narrowed with `--inputs`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from locust import FastHttpUser, constant, events, task
from locust.argument_parser import LocustArgumentParser
from locust.contrib.fasthttp import FastHttpSession, FastResponse
from locust.env import Environment

DEFAULT_HOST = "http://127.0.0.1:8080"
DEFAULT_GRPC_PORT = 8081

NUMPY_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}

SENTENCES = (
    "A GPU model server that scales to zero and wakes up warm.",
    "The quick brown fox jumps over the lazy dog.",
    "Dynamic batching merges requests that arrive while a forward pass runs.",
    "Cold starts are measured from the first request to its answer.",
)


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 = variable


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    data: np.ndarray  # BYTES: an object array of bytes

    @property
    def shape(self) -> list[int]:
        return [int(d) for d in self.data.shape]


# The example models' inputs as their model.toml (or [pipeline]) declares them. identity takes
# any INPUT_<DATATYPE>; two that JSON can carry are enough to exercise it.
KNOWN_INPUTS: dict[str, tuple[InputSpec, ...]] = {
    "mlp": (InputSpec("input", "FP32", (-1, 784)),),
    "identity": (
        InputSpec("INPUT_FP32", "FP32", (-1, -1)),
        InputSpec("INPUT_INT32", "INT32", (-1, -1)),
    ),
    "minilm": (InputSpec("text", "BYTES", (-1,)),),
}


Handler = TypeVar("Handler", bound=Callable[..., None])


def listen(hook: Any, handler: Handler) -> Handler:
    """`hook.add_listener(handler)`, keeping the handler's type (locust's hooks are untyped)."""
    hook.add_listener(handler)
    return handler


def fire_request(
    environment: Environment,
    request_type: str,
    name: str,
    ms: float,
    length: int = 0,
    error: Exception | None = None,
) -> None:
    """Report one request that did not go through locust's HTTP clients."""
    hook: Any = environment.events.request
    hook.fire(
        request_type=request_type,
        name=name,
        response_time=ms,
        response_length=length,
        exception=error,
        context={},
    )


def header(response: FastResponse, name: str) -> str | None:
    headers = response.headers
    value = headers.get(name) if headers is not None else None
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _add_arguments(parser: LocustArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--model",
        default=env("EMBER_MODEL", "mlp"),
        help="model to send requests to (default mlp, or $EMBER_MODEL)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=int(env("EMBER_BATCH", "1")),
        help="rows per request: the size of each input's first variable dimension (default 1)",
    )
    parser.add_argument(
        "--length",
        type=int,
        default=int(env("EMBER_LENGTH", "16")),
        help="size of every other variable dimension (default 16)",
    )
    parser.add_argument(
        "--inputs",
        default=env("EMBER_INPUTS", ""),
        help="comma-separated inputs to send, taken from the model's V2 metadata "
        "(default: the example models' own inputs, else every declared input)",
    )
    parser.add_argument(
        "--payload",
        default=env("EMBER_PAYLOAD", ""),
        help="a V2 JSON request body to send (converted for V1, binary and gRPC)",
    )
    parser.add_argument(
        "--grpc-host",
        default=env("EMBER_GRPC_HOST", ""),
        help=f"gRPC HOST:PORT (default: --host's host, port {DEFAULT_GRPC_PORT})",
    )
    parser.add_argument(
        "--mix",
        default=env("EMBER_MIX", "mlp=3,identity=1"),
        help="mixed.py: MODEL=WEIGHT,... (default mlp=3,identity=1)",
    )
    parser.add_argument(
        "--protocol",
        choices=("v1", "v2-json", "v2-binary"),
        default=env("EMBER_PROTOCOL", "v2-binary"),
        help="mixed.py and cold_start.py: the wire protocol of every request (default v2-binary)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=float(env("EMBER_REQUEST_TIMEOUT", "60")),
        help="seconds one request may take (default 60)",
    )


listen(events.init_command_line_parser, _add_arguments)


def option(environment: Environment, name: str) -> Any:
    """A parsed option; in a locust started from Python without them, the option's default."""
    parsed = environment.parsed_options
    if parsed is not None and hasattr(parsed, name):
        return getattr(parsed, name)
    parser = LocustArgumentParser()
    _add_arguments(parser)
    return parser.get_default(name)


def base_url(environment: Environment, fallback: str | None) -> str:
    return (environment.host or fallback or DEFAULT_HOST).rstrip("/")


def grpc_target(environment: Environment, fallback: str | None = None) -> str:
    """HOST:PORT of the V2 gRPC door: --grpc-host, else --host's host on port 8081."""
    explicit = str(option(environment, "grpc_host") or "")
    if explicit:
        return explicit.removeprefix("grpc://")
    host = urllib.parse.urlsplit(base_url(environment, fallback)).hostname or "127.0.0.1"
    return f"{host}:{DEFAULT_GRPC_PORT}"


def parse_mix(text: str) -> list[tuple[str, float]]:
    """`mlp=3,identity=1` -> [("mlp", 3.0), ("identity", 1.0)]; a bare name weighs 1."""
    mix = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition("=")
        value = float(weight) if weight else 1.0
        if not name or value <= 0:
            raise ValueError(f"--mix: expected MODEL=WEIGHT with a positive weight, got {item!r}")
        mix.append((name.strip(), value))
    if not mix:
        raise ValueError("--mix: no models given")
    return mix


# --- request data ---------------------------------------------------------------------------


def _jpeg(side: int) -> bytes:
    from PIL import Image  # only models that take images need Pillow

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _looks_like_image(name: str) -> bool:
    return any(word in name.lower() for word in ("image", "img", "jpeg", "png", "picture"))


def make_tensor(spec: InputSpec, batch: int, length: int, seed: int = 0) -> Tensor:
    """Data for one declared input: -1 dimensions become `batch` (the first) or `length`."""
    shape: list[int] = []
    for i, dim in enumerate(spec.shape):
        shape.append(dim if dim >= 0 else (batch if i == 0 else length))
    count = int(np.prod(shape)) if shape else 1
    rng = np.random.default_rng(seed)
    if spec.datatype == "BYTES":
        if _looks_like_image(spec.name):
            items = [_jpeg(224)] * count
        else:
            items = [SENTENCES[i % len(SENTENCES)].encode() for i in range(count)]
        data = np.empty(count, dtype=np.object_)
        data[:] = items
        return Tensor(spec.name, spec.datatype, data.reshape(shape))
    if spec.datatype not in NUMPY_DTYPES:
        raise ValueError(f"input '{spec.name}': datatype {spec.datatype} is not supported here")
    dtype = NUMPY_DTYPES[spec.datatype]
    if spec.datatype == "BOOL":
        array = rng.integers(0, 2, shape).astype(np.bool_)
    elif np.issubdtype(dtype, np.integer):
        array = rng.integers(0, 100, shape).astype(dtype)
    else:
        array = rng.random(shape).astype(dtype)
    return Tensor(spec.name, spec.datatype, array)


def _fetch_json(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return json.loads(answer.read())


def metadata_inputs(url: str, model: str, timeout: float = 30.0) -> tuple[InputSpec, ...]:
    doc = _fetch_json(f"{url}/v2/models/{urllib.parse.quote(model)}", timeout)
    return tuple(
        InputSpec(str(item["name"]), str(item["datatype"]), tuple(int(d) for d in item["shape"]))
        for item in doc["inputs"]
    )


def tensors_from_payload(path: str) -> list[Tensor]:
    with open(path, encoding="utf-8") as file:
        doc = json.load(file)
    tensors = []
    for item in doc["inputs"]:
        datatype = str(item["datatype"])
        shape = [int(d) for d in item["shape"]]
        if datatype == "BYTES":
            flat = np.empty(int(np.prod(shape)) if shape else 1, dtype=np.object_)
            flat[:] = [str(x).encode() for x in np.array(item["data"], dtype=object).reshape(-1)]
            array = flat.reshape(shape)
        else:
            array = np.array(item["data"], dtype=NUMPY_DTYPES[datatype]).reshape(shape)
        tensors.append(Tensor(str(item["name"]), datatype, array))
    return tensors


_TENSORS: dict[tuple[str, str], list[Tensor]] = {}


def request_tensors(environment: Environment, model: str, url: str) -> list[Tensor]:
    """The tensors every request to `model` carries, built once per model and process."""
    payload = str(option(environment, "payload") or "")
    wanted = [n.strip() for n in str(option(environment, "inputs") or "").split(",") if n.strip()]
    key = (model, url)
    if key not in _TENSORS:
        if payload:
            tensors = tensors_from_payload(payload)
        else:
            batch, length = int(option(environment, "batch")), int(option(environment, "length"))
            specs = KNOWN_INPUTS.get(model) if not wanted else None
            if specs is None:
                timeout = float(option(environment, "request_timeout"))
                declared = metadata_inputs(url, model, timeout)
                specs = tuple(s for s in declared if not wanted or s.name in wanted)
                missing = sorted(set(wanted) - {s.name for s in specs})
                if missing:
                    raise ValueError(f"model '{model}' declares no input(s) {missing}")
            tensors = [make_tensor(s, batch, length, seed=i) for i, s in enumerate(specs)]
        _TENSORS[key] = tensors
    return _TENSORS[key]


# --- bodies ---------------------------------------------------------------------------------


def _json_data(tensor: Tensor) -> list[Any]:
    flat = tensor.data.reshape(-1)
    if tensor.datatype == "BYTES":
        try:
            return [x.decode("utf-8") for x in flat]
        except UnicodeDecodeError:
            # V2 JSON carries BYTES as strings only; V1 has {"b64": ...}.
            raise ValueError(
                f"input '{tensor.name}': binary BYTES (such as images) cannot travel as V2 "
                "JSON; use v2_binary.py, grpc_v2.py or v1_json.py"
            ) from None
    if tensor.datatype in ("FP16", "BF16"):
        raise ValueError(f"input '{tensor.name}': {tensor.datatype} cannot travel as JSON")
    data: list[Any] = flat.tolist()
    return data


def v2_json_body(tensors: Sequence[Tensor]) -> bytes:
    inputs = [
        {"name": t.name, "datatype": t.datatype, "shape": t.shape, "data": _json_data(t)}
        for t in tensors
    ]
    return json.dumps({"inputs": inputs}).encode()


def raw_bytes(tensor: Tensor) -> bytes:
    """Triton's binary layout: little-endian, row-major; BYTES elements as uint32 length +
    bytes."""
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(x)) + x for x in tensor.data.reshape(-1))
    array = np.ascontiguousarray(tensor.data)
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def v2_binary_body(tensors: Sequence[Tensor]) -> tuple[bytes, dict[str, str]]:
    """The body and headers of a V2 request with every input and output as binary data."""
    blobs = [raw_bytes(t) for t in tensors]
    header = {
        "inputs": [
            {
                "name": t.name,
                "datatype": t.datatype,
                "shape": t.shape,
                "parameters": {"binary_data_size": len(blob)},
            }
            for t, blob in zip(tensors, blobs, strict=True)
        ],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(header).encode()
    # tritonclient sends no Content-Type either: the length header alone marks the format.
    headers = {"Inference-Header-Content-Length": str(len(head))}
    return head + b"".join(blobs), headers


def _v1_bytes(value: Any, image: bool) -> Any:
    if isinstance(value, np.ndarray):
        return [_v1_bytes(v, image) for v in value]
    if image:
        return {"b64": base64.b64encode(value).decode()}
    return value.decode("utf-8")


def _v1_value(tensor: Tensor, row: int) -> Any:
    value = tensor.data[row]
    if tensor.datatype == "BYTES":
        # Images travel as {"b64": ...}, KServe's V1 convention for binary data.
        return _v1_bytes(value, _looks_like_image(tensor.name))
    return value.tolist()


def v1_json_body(tensors: Sequence[Tensor]) -> bytes:
    """`{"instances": [...]}`: plain rows for one input, else one object per row keyed by
    input name (KServe V1's two forms)."""
    rows = min(int(t.data.shape[0]) for t in tensors)
    if len(tensors) == 1:
        instances = [_v1_value(tensors[0], i) for i in range(rows)]
    else:
        instances = [{t.name: _v1_value(t, i) for t in tensors} for i in range(rows)]
    return json.dumps({"instances": instances}).encode()


# --- checks on answers ----------------------------------------------------------------------


def v2_json_problem(body: bytes) -> str | None:
    """None when `body` is a V2 response with outputs, else what is wrong with it."""
    try:
        doc = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:200]!r}"
    if not isinstance(doc, dict) or not doc.get("outputs"):
        return f"no outputs in {str(doc)[:200]}"
    return None


def v2_binary_problem(header_length: str | None, body: bytes) -> str | None:
    """None when `body` is a binary V2 response whose declared sizes add up."""
    if header_length is None:
        return "no Inference-Header-Content-Length: the answer was not binary"
    size = int(header_length)
    problem = v2_json_problem(body[:size])
    if problem is not None:
        return problem
    outputs = json.loads(body[:size])["outputs"]
    sizes = [int(o.get("parameters", {}).get("binary_data_size", -1)) for o in outputs]
    if any(s < 0 for s in sizes):
        return f"an output came back without binary_data_size: {outputs}"
    if sum(sizes) != len(body) - size:
        rest = len(body) - size
        return f"binary sizes {sizes} do not add up to the {rest} bytes after the header"
    return None


def v1_problem(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:200]!r}"
    if not isinstance(doc, dict) or not doc.get("predictions"):
        return f"no predictions in {str(doc)[:200]}"
    return None


# --- one HTTP inference request -------------------------------------------------------------

HTTP_PROTOCOLS = ("v1", "v2-json", "v2-binary")


@dataclass(frozen=True)
class HttpInfer:
    """One prepared request: the same bytes are sent every time."""

    path: str
    body: bytes
    headers: dict[str, str]
    problem: Callable[[FastResponse], str | None]
    # The row in locust's stats: the path, marked for binary tensors so that V2 JSON and V2
    # binary requests to one model stay apart when several locustfiles run together.
    name: str


def _binary_problem(response: FastResponse) -> str | None:
    length = header(response, "Inference-Header-Content-Length")
    return v2_binary_problem(length, response.content or b"")


def http_infer(environment: Environment, url: str, model: str, protocol: str) -> HttpInfer:
    tensors = request_tensors(environment, model, url)
    quoted = urllib.parse.quote(model)
    if protocol == "v1":
        return HttpInfer(
            f"/v1/models/{quoted}:predict",
            v1_json_body(tensors),
            {"Content-Type": "application/json"},
            lambda r: v1_problem(r.content or b""),
            f"/v1/models/{quoted}:predict",
        )
    if protocol == "v2-json":
        return HttpInfer(
            f"/v2/models/{quoted}/infer",
            v2_json_body(tensors),
            {"Content-Type": "application/json"},
            lambda r: v2_json_problem(r.content or b""),
            f"/v2/models/{quoted}/infer",
        )
    if protocol == "v2-binary":
        body, headers = v2_binary_body(tensors)
        path = f"/v2/models/{quoted}/infer"
        return HttpInfer(path, body, headers, _binary_problem, f"{path} [binary]")
    raise ValueError(f"unknown protocol {protocol!r}, expected one of {HTTP_PROTOCOLS}")


def send(client: FastHttpSession, request: HttpInfer, name: str | None = None) -> FastResponse:
    """POST it; anything but a 200 with a well-formed answer counts as a failure."""
    with client.post(
        request.path,
        data=request.body,  # type: ignore[arg-type]  # bytes are sent as they are
        headers=request.headers,
        name=name or request.name,
        catch_response=True,
    ) as response:
        if response.status_code != 200:
            text = (response.content or b"")[:300].decode("utf-8", "replace")
            response.failure(f"HTTP {response.status_code}: {text}")
        else:
            problem = request.problem(response)
            if problem is None:
                response.success()
            else:
                response.failure(problem)
    result: FastResponse = response
    return result


class InferUser(FastHttpUser):
    """Closed loop: each user sends its next request as soon as the last one is answered.
    Subclasses name the wire protocol."""

    abstract = True
    host = DEFAULT_HOST
    wait_time = constant(0)
    protocol = "v2-json"

    def __init__(self, environment: Environment) -> None:
        # FastHttpUser builds its session from these attributes in its own __init__.
        self.network_timeout = float(option(environment, "request_timeout"))
        super().__init__(environment)

    def on_start(self) -> None:
        model = str(option(self.environment, "model"))
        self.request = http_infer(self.environment, base_url(self.environment, self.host), model,
                                  self.protocol)  # fmt: skip

    def next_request(self) -> HttpInfer:
        return self.request

    @task
    def infer(self) -> None:
        # Locust calls the function it collected from this class, so subclasses change what
        # one iteration does by overriding the methods below, not this one.
        self.one_request()

    def one_request(self) -> None:
        send(self.client, self.next_request())
