"""The big byte fields of ModelInfer, written and read by hand around protobuf.

protobuf copies a 16 MiB `bytes` field several times on the way in and out (parse, append,
serialize with a growing buffer): most of a large gRPC request's server time (py-spy,
docs/benchmarks.md). Protobuf's wire format is a flat sequence of (tag, value) fields in any
order, so `raw_input_contents` (field 7 of ModelInferRequest) can be sliced out of the
received bytes as memoryviews, and `raw_output_contents` (field 6 of ModelInferResponse)
appended after the serialized rest of the message, each tensor copied exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

Buffer = bytes | memoryview

_RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
_RAW_OUTPUT_TAG = b"\x32"  # ModelInferResponse.raw_output_contents: field 6, length-delimited
_STREAM_ERROR_TAG = b"\x0a"  # ModelStreamInferResponse.error_message: field 1
_STREAM_RESPONSE_TAG = b"\x12"  # ModelStreamInferResponse.infer_response: field 2


@dataclass(slots=True)
class ParsedInferRequest:
    """A ModelInferRequest whose raw_input_contents stay views over the received bytes."""

    message: pb.ModelInferRequest
    raw: list[memoryview] = field(default_factory=list)


@dataclass(slots=True)
class RawInferResponse:
    """A ModelInferResponse without raw_output_contents, and those contents beside it."""

    message: pb.ModelInferResponse
    raw: list[Buffer] = field(default_factory=list)


@dataclass(slots=True)
class RawStreamResponse:
    response: RawInferResponse
    error_message: str = ""


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(view) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = view[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def parse_infer_request(data: bytes) -> ParsedInferRequest:
    """Parse everything but raw_input_contents with protobuf; slice those out as views."""
    try:
        return _parse_infer_request(data)
    except DecodeError as exc:
        # Name the type as protobuf's own parser does, so clients see what was expected.
        raise DecodeError(
            f"Error parsing message with type 'inference.ModelInferRequest': {exc}"
        ) from None


def _parse_infer_request(data: bytes) -> ParsedInferRequest:
    view = memoryview(data)
    raw: list[memoryview] = []
    rest: list[memoryview] = []
    pos = 0
    end = len(view)
    while pos < end:
        key, value_at = _read_varint(view, pos)
        number, wire = key >> 3, key & 7
        if wire == 2:
            length, start = _read_varint(view, value_at)
            stop = start + length
        elif wire == 0:
            _, stop = _read_varint(view, value_at)
            start = value_at
        elif wire == 1:
            start, stop = value_at, value_at + 8
        elif wire == 5:
            start, stop = value_at, value_at + 4
        else:
            raise DecodeError(f"unsupported wire type {wire} for field {number}")
        if stop > end or number == 0:
            raise DecodeError("field runs past the end of the message")
        if number == _RAW_INPUT_FIELD:
            if wire != 2:
                raise DecodeError("raw_input_contents must be length-delimited")
            raw.append(view[start:stop])
        else:
            rest.append(view[pos:stop])
        pos = stop
    message = pb.ModelInferRequest.FromString(b"".join(rest))
    return ParsedInferRequest(message, raw)


def serialize_infer_response(value: Any) -> bytes:
    if isinstance(value, RawInferResponse):
        parts: list[Buffer] = [value.message.SerializeToString()]
        for chunk in value.raw:
            parts += [_RAW_OUTPUT_TAG, varint(len(chunk)), chunk]
        return b"".join(parts)
    return bytes(value.SerializeToString())


def serialize_stream_response(value: Any) -> bytes:
    if isinstance(value, RawStreamResponse):
        inner = serialize_infer_response(value.response)
        parts: list[Buffer] = []
        if value.error_message:
            text = value.error_message.encode("utf-8")
            parts += [_STREAM_ERROR_TAG, varint(len(text)), text]
        parts += [_STREAM_RESPONSE_TAG, varint(len(inner)), inner]
        return b"".join(parts)
    return bytes(value.SerializeToString())
