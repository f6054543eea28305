"""Fuzz target: the bytes of a gRPC ModelInferRequest, as the ModelInfer method receives them.

bytes -> rpc.wire.parse_infer_request (raw_input_contents sliced out by hand; the rest parsed
by protobuf) -> rpc.codec.decode_request -> validation -> identity's echo through
rpc.codec.encode_response and wire.serialize_infer_response. Whatever the hand-written parser
accepts, protobuf's own parser must read the same way. Only EmberError (InvalidInput) and
protobuf's DecodeError (answered INVALID_ARGUMENT by rpc/server.py) may escape.
"""

from __future__ import annotations

import struct
import sys
import warnings

import atheris
from fuzzkit import corpus_args
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

with atheris.instrument_imports(include=["ember", "fuzzmodels"]):
    from fuzzmodels import accepting, echo

    from ember.server.errors import EmberError
    from ember.server.rpc import codec, wire


def _raw_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="identity", id="a")
    request.inputs.add(name="INPUT_FP32", datatype="FP32", shape=[1, 2])
    request.inputs.add(name="INPUT_BYTES", datatype="BYTES", shape=[1, 1])
    request.raw_input_contents.extend([struct.pack("<2f", 1.0, 2.0), struct.pack("<I", 3) + b"abc"])
    request.outputs.add(name="OUTPUT_BYTES")
    return request


def _typed_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="identity")
    tensor = request.inputs.add(name="INPUT_INT8", datatype="INT8", shape=[1, 3])
    tensor.contents.int_contents.extend([-128, 0, 127])
    tensor = request.inputs.add(name="INPUT_UINT64", datatype="UINT64", shape=[1, 1])
    tensor.contents.uint64_contents.append(2**64 - 1)
    tensor = request.inputs.add(name="INPUT_BOOL", datatype="BOOL", shape=[1, 2])
    tensor.contents.bool_contents.extend([True, False])
    tensor = request.inputs.add(name="INPUT_BYTES", datatype="BYTES", shape=[1, 1])
    tensor.contents.bytes_contents.append(b"\xff")
    request.parameters["timeout"].int64_param = 5_000_000
    return request


def _mlp_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 784])
    request.raw_input_contents.append(b"\x00" * 4 * 784)
    return request


SEEDS = [
    _raw_request().SerializeToString(),
    _typed_request().SerializeToString(),
    _mlp_request().SerializeToString(),
    pb.ModelInferRequest(model_name="identity").SerializeToString(),
]


def _check_against_protobuf(data: bytes, parsed: wire.ParsedInferRequest) -> None:
    whole = pb.ModelInferRequest.FromString(data)
    assert list(whole.raw_input_contents) == [bytes(r) for r in parsed.raw], "raw contents"
    whole.ClearField("raw_input_contents")
    assert whole == parsed.message, "the hand-written parser read another message"


def fuzz_one(data: bytes) -> None:
    try:
        parsed = wire.parse_infer_request(data)
    except DecodeError:
        return
    _check_against_protobuf(data, parsed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            request = codec.decode_request(parsed, None)
            if any(config.name == "identity" for config in accepting(request)):
                response = codec.encode_response(echo(request))
                pb.ModelInferResponse.FromString(wire.serialize_infer_response(response))
        except EmberError:
            pass


def main() -> None:
    atheris.Setup(corpus_args(sys.argv, "grpc_request", SEEDS), fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
