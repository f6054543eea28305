"""`inference.ModelInferRequest` / `ModelInferResponse` <-> InferRequest / InferResponse."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from ember.server.codecs.raw import array_from_raw, element_count, raw_view
from ember.server.codecs.shown import shown
from ember.server.codecs.v2 import deadline_from
from ember.server.datatypes import NUMPY_DTYPES
from ember.server.errors import InvalidInput
from ember.server.request import InferRequest, InferResponse, RequestedOutput, Tensor
from ember.server.rpc.wire import ParsedInferRequest, RawInferResponse

# Which typed-contents field carries each datatype (FP16 and BF16 have none: raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(param: pb.InferParameter) -> Any:
    which = param.WhichOneof("parameter_choice")
    return None if which is None else getattr(param, which)


def parameters_from(params: Any) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in params.items()}


def set_parameter(param: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = str(value)


def _typed(
    tensor: pb.ModelInferRequest.InferInputTensor, shape: tuple[int, ...], where: str
) -> np.ndarray:
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidInput(
            f"{where}: {tensor.datatype} has no typed contents; send raw_input_contents"
        )
    values = getattr(tensor.contents, field)
    count = element_count(shape, where)
    if len(values) != count:
        raise InvalidInput(
            f"{where}: shape {list(shape)} needs {count} elements, {field} has {len(values)}"
        )
    dtype = NUMPY_DTYPES[tensor.datatype]
    if tensor.datatype == "BYTES":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    wide = np.array(values)
    if tensor.datatype.startswith(("INT", "UINT")) and wide.size:
        info = np.iinfo(dtype)  # type: ignore[type-var]
        if wide.min() < info.min or wide.max() > info.max:
            raise InvalidInput(f"{where}: values out of range for {tensor.datatype}")
    return wide.astype(dtype).reshape(shape)


def decode_request(
    parsed: ParsedInferRequest | pb.ModelInferRequest, time_remaining: float | None
) -> InferRequest:
    """`time_remaining` is the client's gRPC deadline, in seconds from now."""
    if isinstance(parsed, pb.ModelInferRequest):
        parsed = ParsedInferRequest(parsed, [memoryview(r) for r in parsed.raw_input_contents])
    request, raw = parsed.message, parsed.raw
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    if not request.inputs:
        raise InvalidInput("request has no inputs")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        where = f"input '{tensor.name}'"
        if not tensor.name:
            raise InvalidInput(f"inputs[{i}]: 'name' is empty")
        if tensor.datatype not in NUMPY_DTYPES:
            raise InvalidInput(
                f"{where}: unknown datatype {shown(tensor.datatype)}, "
                f"expected one of {list(NUMPY_DTYPES)}"
            )
        shape = tuple(tensor.shape)
        element_count(shape, where)
        if raw:
            # As Triton: with raw contents a tensor's typed contents are not quietly ignored.
            if tensor.contents.ListFields():
                raise InvalidInput(
                    f"{where}: has both 'contents' and raw_input_contents; send one or the other"
                )
            array = array_from_raw(raw[i], tensor.datatype, shape, where)
        else:
            array = _typed(tensor, shape, where)
        inputs.append(
            Tensor(tensor.name, tensor.datatype, array, parameters_from(tensor.parameters))
        )
    params = parameters_from(request.parameters)
    deadline = deadline_from(params)
    if time_remaining is not None:
        grpc_deadline = time.monotonic() + time_remaining
        deadline = grpc_deadline if deadline is None else min(deadline, grpc_deadline)
    outputs = None
    if request.outputs:
        outputs = [RequestedOutput(o.name, parameters_from(o.parameters)) for o in request.outputs]
    return InferRequest(
        model_name=request.model_name,
        model_version=request.model_version or None,
        id=request.id or None,
        inputs=inputs,
        parameters=params,
        outputs=outputs,
        deadline=deadline,
    )


def encode_response(response: InferResponse) -> RawInferResponse:
    """Outputs always in raw_output_contents, in output order: tritonclient reads only those.
    The contents stay beside the message until `wire.serialize_infer_response` writes them."""
    message = pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version or "",
        id=response.id or "",
    )
    for key, value in response.parameters.items():
        set_parameter(message.parameters[key], value)
    raw = []
    for tensor in response.outputs:
        out = message.outputs.add()
        out.name = tensor.name
        out.datatype = tensor.datatype
        out.shape.extend(tensor.data.shape)
        raw.append(raw_view(tensor.data, tensor.datatype))
    return RawInferResponse(message, raw)
