"""`ember bench`: its pure parts (percentiles, the closed-loop window, the tables, arguments,
the requests each protocol builds and the checks of their answers)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import io
import math
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2

from ember.server.bench import (
    cli,
    grpc_load,
    memcopy,
    modelcopy,
    observe,
    plot,
    rawhttp,
    report,
    run,
    targets,
)
from ember.server.bench import cpus as bench_cpus
from ember.server.bench.client import (
    BadAnswer,
    BadStatus,
    HttpRequest,
    http_retry_worker,
    http_worker,
    retry_after_seconds,
)
from ember.server.bench.load import (
    Call,
    Observed,
    OpenRetryWorker,
    OpenWorker,
    OverloadStats,
    RawRate,
    RetryCall,
    Stats,
    percentiles,
    raw_rate,
    run_level,
    run_overload_level,
    summarize,
)
from ember.server.bench.options import (
    TRANSPORTS,
    BenchOptions,
    grpc_target,
    problems,
    torch_threads,
)
from ember.server.bench.payload import (
    Payload,
    build_inputs,
    raw_bytes,
    select_inputs,
    select_outputs,
    tensor_bytes,
)
from ember.server.bench.protocols import (
    BINARY_HEADER,
    PROTOCOLS,
    BenchError,
    V2Binary,
    V2Json,
    binary_request_body,
    read_binary_answer,
)
from ember.server.codecs import v2
from ember.server.config import ModelConfig, TensorSpec, discover
from ember.server.request import InferResponse, Tensor
from ember.server.rest.body import split_binary_body
from ember.server.rpc import codec, wire

# --- percentiles and summaries -------------------------------------------------------------


def test_percentiles_interpolate_between_ranks() -> None:
    samples = [4.0, 1.0, 3.0, 2.0, 5.0]  # unsorted on purpose
    assert percentiles(samples, [0, 50, 100]) == [1.0, 3.0, 5.0]
    assert percentiles(samples, [25, 90]) == pytest.approx([2.0, 4.6])
    assert percentiles([7.0], [50, 99]) == [7.0, 7.0]


def test_percentiles_match_numpy_linear() -> None:
    rng = np.random.default_rng(1)
    samples = rng.exponential(size=1001).tolist()
    qs = [1, 50, 90, 99, 99.9]
    assert percentiles(samples, qs) == pytest.approx(np.percentile(samples, qs).tolist())


@pytest.mark.parametrize("samples, q", [([], 50.0), ([1.0], -1.0), ([1.0], 100.5)])
def test_percentiles_reject_bad_input(samples: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        percentiles(samples, [q])


def test_summarize_converts_to_ms_and_rate() -> None:
    stats = summarize("infer", 4, 2.0, [0.001, 0.002, 0.003], errors=1, first_error="boom")
    assert (stats.requests, stats.errors, stats.rps) == (3, 1, 1.5)
    assert (stats.p50_ms, stats.mean_ms) == pytest.approx((2.0, 2.0))
    assert stats.first_error == "boom"


def test_summarize_without_successes_has_no_latency() -> None:
    stats = summarize("infer", 1, 1.0, [], errors=5)
    assert stats.p50_ms is None and stats.p99_ms is None and stats.rps == 0.0


# --- the closed loop, on a fake clock ------------------------------------------------------


class FakeTime:
    """A clock that moves only when a fake request takes its (whole-unit) time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def opener(self, fail_every: int = 0) -> OpenWorker:
        @asynccontextmanager
        async def open_worker() -> AsyncIterator[Call]:
            async def call() -> None:
                self.calls += 1
                self.now += 1.0
                await asyncio.sleep(0)
                if fail_every and self.calls % fail_every == 0:
                    raise ConnectionError("reset")

            yield call

        return open_worker


async def test_run_level_counts_only_the_window() -> None:
    fake = FakeTime()
    stats = await run_level(
        "infer", fake.opener(),
        concurrency=1, duration=10.0, warmup=5.0, clock=fake.clock,
    )  # fmt: skip
    # Sent at 0..14, one unit each: 0-4 are warm-up; 5..14 end by 15, inside the window.
    assert fake.calls == 15
    assert (stats.requests, stats.errors, stats.rps) == (10, 0, 1.0)
    assert stats.p50_ms == stats.p99_ms == 1000.0


async def test_run_level_counts_errors_apart() -> None:
    fake = FakeTime()
    stats = await run_level(
        "infer", fake.opener(fail_every=2),
        concurrency=1, duration=10.0, warmup=0.0, clock=fake.clock,
    )  # fmt: skip
    assert (stats.requests, stats.errors) == (5, 5)
    assert stats.first_error == "ConnectionError: reset"


async def test_run_level_rejects_zero_workers() -> None:
    with pytest.raises(ValueError):
        await run_level("infer", FakeTime().opener(), concurrency=0, duration=1, warmup=0)


# --- the table and the JSON document -------------------------------------------------------


def row(
    target: str, concurrency: int, p50: float | None, errors: int = 0, protocol: str = ""
) -> Stats:
    return Stats(target, concurrency, 1.0, 100, errors, 100.0, p50, p50, p50, p50,
                 protocol=protocol)  # fmt: skip


RAW = row(report.RAW, 1, 0.2)
ROWS = [
    row(report.CLIENT_FLOOR, 1, 0.1),
    row(report.LIVE_FLOOR, 1, 0.3),
    row(report.INFER, 1, 0.9),
    row(report.INFER, 4, 3.2, errors=2),
]


def test_table_puts_raw_first_and_overhead_on_infer_rows() -> None:
    lines = report.format_table(ROWS, RAW).splitlines()
    assert lines[0].split() == [
        "target", "conc", "requests", "rps", "p50", "ms", "p90", "ms", "p99", "ms", "errors",
        "p50-raw", "ms",
    ]  # fmt: skip
    assert lines[1].split() == ["raw-forward", "1", "100", "100.0", "0.200", "0.200", "0.200",
                                "-", "-"]  # fmt: skip
    assert lines[2].split()[-1] == "-"  # a floor has no overhead
    assert lines[4].split()[-2:] == ["0", "0.700"]
    assert lines[5].split()[-2:] == ["2", "3.000"]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned columns


def test_table_without_raw_or_latency_shows_dashes() -> None:
    lines = report.format_table([row(report.INFER, 1, None, errors=3)]).splitlines()
    assert lines[1].split() == ["infer", "1", "100", "100.0", "-", "-", "-", "3", "-"]


def test_breakdown_splits_the_p50() -> None:
    parts = report.breakdown(ROWS, RAW)
    assert parts == pytest.approx({
        "served_p50_ms": 0.9, "client_and_tcp_ms": 0.1, "server_http_ms": 0.2,
        "server_infer_path_ms": 0.4, "forward_ms": 0.2,
    })  # fmt: skip
    assert report.breakdown(ROWS, None) == {}
    assert "client+TCP 0.100" in report.format_breakdown(parts)


def test_document_holds_every_number_and_the_machine() -> None:
    now = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    doc = report.document(
        config={"model": "mlp"}, machine=report.machine_info(1), rows=ROWS, raw=RAW, now=now
    )
    assert doc["date"] == "2025-01-02T03:04:05+00:00"
    assert doc["raw"]["p50_ms"] == 0.2
    assert [r["overhead_p50_ms"] for r in doc["results"]] == pytest.approx([None, None, 0.7, 3.0])
    for key in ("cpu_count", "platform", "python", "torch"):
        assert doc["machine"][key]
    orjson.dumps(doc)  # serializable as is


def test_cpu_model_reads_proc_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n")
    assert report.cpu_model(info) == "AMD EPYC 7B13"
    assert report.cpu_model(tmp_path / "missing") is None


# --- arguments -----------------------------------------------------------------------------


def parse(*argv: str) -> BenchOptions:
    parser = argparse.ArgumentParser(prog="ember bench", exit_on_error=False)
    cli.add_bench_arguments(parser)
    return cli.options_from(parser.parse_args(argv))


def test_defaults() -> None:
    options = parse("--model", "mlp")
    assert options == BenchOptions(model="mlp", floor_seconds=3.0)


def test_issue_command_line() -> None:
    options = parse(
        "--url", "http://127.0.0.1:9000", "--model", "mlp", "--concurrency", "1,4,16",
        "--duration", "2", "--warmup", "0.5", "--protocol", "v2-json", "--json", "out.json",
        "--serve", "--model-repository", "repo", "--torch-threads", "2",
    )  # fmt: skip
    assert options.concurrency == (1, 4, 16)
    assert (options.duration, options.warmup, options.floor_seconds) == (2.0, 0.5, 2.0)
    assert (options.serve, options.torch_threads) == (True, 2)
    assert options.json == Path("out.json") and options.model_repository == Path("repo")


@pytest.mark.parametrize("text", ["0", "1,,4", "a", "4,4", "-1", ""])
def test_bad_concurrency(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cli.concurrency_list(text)


@pytest.mark.parametrize(
    "argv",
    [
        ["--duration", "0"], ["--duration", "nan"], ["--warmup", "-1"],
        ["--torch-threads", "0"], ["--protocol", "http3"], ["--protocol", "grpc,grpc"],
        ["--protocol", ""], ["--shape", "1,0"], ["--shape", "1,x"], ["--input", "a,,b"],
        ["--grpc-url", "http://h:1"], ["--grpc-url", "h"], ["--copy-seconds", "-1"],
    ],
)  # fmt: skip
def test_bad_arguments_exit(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="ember bench")
    cli.add_bench_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "mlp", *argv])


def test_repeat_passes() -> None:
    assert parse("--model", "m").repeat == 1
    assert parse("--model", "m", "--repeat", "5").repeat == 5
    parser = argparse.ArgumentParser(prog="ember bench")
    cli.add_bench_arguments(parser)
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--model", "m", "--repeat", bad])


def test_floors_can_be_skipped() -> None:
    assert parse("--model", "m", "--floor-duration", "0").floor_seconds == 0.0


def test_protocol_choices_are_the_registry() -> None:
    assert set(cli.PROTOCOL_NAMES) == set(PROTOCOLS) == set(TRANSPORTS)


def test_the_issue_throughput_command_line() -> None:
    options = parse(
        "--serve", "--model", "identity", "--input", "INPUT_FP32", "--shape", "1,4194304",
        "--protocol", "v2-json,v2-binary,grpc", "--concurrency", "1", "--duration", "10",
    )  # fmt: skip
    assert options.protocols == ("v2-json", "v2-binary", "grpc")
    assert options.inputs == ("INPUT_FP32",) and options.outputs == ()
    assert options.shape == (1, 4194304)
    # Comparing protocols turns the copy floor (and the throughput table) on.
    assert options.copy_seconds == 2.0


@pytest.mark.parametrize(
    "argv, copy",
    [
        ([], 0.0), (["--protocol", "v2-json"], 0.0), (["--protocol", "grpc"], 2.0),
        (["--shape", "4,784"], 2.0), (["--input", "x"], 2.0), (["--output", "y"], 2.0),
        (["--protocol", "v2-json,v2-binary", "--copy-seconds", "0"], 0.0),
        (["--copy-seconds", "0.5"], 0.5),
    ],
)  # fmt: skip
def test_copy_floor_runs_when_the_run_compares(argv: list[str], copy: float) -> None:
    assert parse("--model", "m", *argv).copy_seconds == copy


def test_list_arguments_keep_their_order() -> None:
    options = parse("--model", "m", "--protocol", "grpc,v2-json", "--input", "b, a",
                    "--output", "y", "--grpc-url", "10.0.0.1:9001")  # fmt: skip
    assert options.protocols == ("grpc", "v2-json")
    assert options.inputs == ("b", "a") and options.outputs == ("y",)
    assert options.grpc_url == "10.0.0.1:9001"


def test_grpc_target_defaults_to_the_url_host_on_8081() -> None:
    assert grpc_target("http://10.1.2.3:8080", None) == "10.1.2.3:8081"
    assert grpc_target("http://[::1]:8080", None) == "[::1]:8081"
    assert grpc_target("http://h:8080", "other:9000") == "other:9000"


def test_torch_threads_leave_the_client_cores_when_serving() -> None:
    assert torch_threads(3, serve=True, cpus=2) == 3
    assert torch_threads(None, serve=True, cpus=2) == 1
    assert torch_threads(None, serve=True, cpus=16) == 8
    assert torch_threads(None, serve=True, cpus=None) == 1
    assert torch_threads(None, serve=False, cpus=2) is None


# --- the request ---------------------------------------------------------------------------

SPECS = [
    TensorSpec(name="x", datatype="FP32", shape=[-1, 784]),
    TensorSpec(name="n", datatype="INT64", shape=[-1]),
    TensorSpec(name="b", datatype="BOOL", shape=[2, 3]),
]


def test_inputs_are_deterministic_batch_one() -> None:
    first, second = build_inputs(SPECS, seed=0), build_inputs(SPECS, seed=0)
    assert {k: (v.shape, v.dtype.name) for k, v in first.items()} == {
        "x": ((1, 784), "float32"), "n": ((1,), "int64"), "b": ((2, 3), "bool"),
    }  # fmt: skip
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    assert not np.array_equal(first["x"], build_inputs(SPECS, seed=1)["x"])


def payload(
    specs: list[TensorSpec] = SPECS, outputs: tuple[str, ...] = ("y",), name_outputs: bool = False
) -> Payload:
    return Payload("mlp", tuple(specs), build_inputs(specs), outputs, name_outputs)


def test_v2_json_body_decodes_to_the_same_arrays() -> None:
    inputs = build_inputs(SPECS)
    protocol = V2Json.create(payload(), timeout=1.0)
    assert protocol.request_bytes == sum(a.nbytes for a in inputs.values())
    request = protocol.infer_request
    assert (request.method, request.path) == ("POST", "/v2/models/mlp/infer")
    assert request.body is not None
    # The server's own decoder gets exactly the arrays the raw forward is timed with.
    decoded = v2.decode_request(orjson.loads(request.body), "mlp", None)
    for tensor in decoded.inputs:
        want = inputs[tensor.name]
        got = tensor.data.astype(want.dtype).reshape(want.shape)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("datatype", ["FP16", "BYTES"])
def test_v2_json_refuses_what_json_cannot_carry(datatype: str) -> None:
    specs = [TensorSpec(name="x", datatype=datatype, shape=[-1])]  # type: ignore[arg-type]
    with pytest.raises(BenchError, match=datatype):
        inputs = build_inputs(specs) if datatype != "BYTES" else {}
        V2Json.create(Payload("m", tuple(specs), inputs, ("y",)), timeout=1.0)


def test_v2_json_names_outputs_only_when_asked() -> None:
    plain = orjson.loads(V2Json.create(payload(), timeout=1.0).infer_request.body or b"")
    assert "outputs" not in plain  # the body the mlp bench always sent
    named = V2Json.create(payload(outputs=("y",), name_outputs=True), timeout=1.0)
    assert orjson.loads(named.infer_request.body or b"")["outputs"] == [{"name": "y"}]


# --- choosing what to send ----------------------------------------------------------------

IDENTITY_INPUTS = [
    TensorSpec(name=f"INPUT_{t}", datatype=t, shape=[-1, -1], optional=True)
    for t in ("FP32", "INT64", "FP16")
]  # fmt: skip
IDENTITY_OUTPUTS = [f"OUTPUT_{t}" for t in ("FP32", "INT64", "FP16")]


def test_select_inputs_by_name_with_a_shape() -> None:
    (spec,) = select_inputs(IDENTITY_INPUTS, ["INPUT_FP32"], (1, 4194304))
    assert (spec.name, spec.datatype, spec.shape) == ("INPUT_FP32", "FP32", [1, 4194304])
    assert IDENTITY_INPUTS[0].shape == [-1, -1]  # the declaration is left as it was
    arrays = build_inputs([spec])
    assert arrays["INPUT_FP32"].shape == (1, 4194304)
    assert Payload("identity", (spec,), arrays, ()).request_bytes == 16 * 1024 * 1024


def test_select_inputs_defaults_to_every_declared_input_batch_one() -> None:
    specs = select_inputs(SPECS)
    assert [(s.name, s.shape) for s in specs] == [("x", [1, 784]), ("n", [1]), ("b", [2, 3])]
    # A shape fills the variable dimensions of a fixed declaration.
    assert select_inputs(SPECS[:1], (), (8, 784))[0].shape == [8, 784]


@pytest.mark.parametrize(
    "names, shape, message",
    [
        (["nope"], None, "unknown input"),
        (["x"], (1, 783), "does not fit"),
        (["x"], (784,), "does not fit"),
    ],
)
def test_select_inputs_rejects(
    names: list[str], shape: tuple[int, ...] | None, message: str
) -> None:
    with pytest.raises(BenchError, match=message):
        select_inputs(SPECS, names, shape)


def test_select_outputs() -> None:
    all_in = [s.name for s in IDENTITY_INPUTS]
    # Every input sent: the model gives every output, none is named (the mlp case).
    assert select_outputs(["y"], ["x"], ["x"]) == (("y",), False)
    # Optional inputs left out: the outputs named like the inputs sent.
    assert select_outputs(IDENTITY_OUTPUTS, all_in, ["INPUT_FP32"]) == (("OUTPUT_FP32",), True)
    # No such pairs: none named, any output accepted.
    assert select_outputs(["logits"], ["a", "b"], ["a"]) == ((), False)
    # --output wins, and must be declared.
    assert select_outputs(IDENTITY_OUTPUTS, all_in, all_in, ["OUTPUT_FP16"]) == (
        ("OUTPUT_FP16",), True,
    )  # fmt: skip
    with pytest.raises(BenchError, match="unknown output"):
        select_outputs(IDENTITY_OUTPUTS, all_in, all_in, ["OUTPUT_X"])


def test_tensor_bytes_and_raw_bytes() -> None:
    assert tensor_bytes("FP32", [1, 4194304]) == 16 * 1024 * 1024
    assert tensor_bytes("BOOL", [2, 3]) == 6 and tensor_bytes("FP16", []) == 2
    assert tensor_bytes("BYTES", [4]) is None and tensor_bytes("FP8", [4]) is None
    big_endian = np.arange(3, dtype=">i4")
    assert raw_bytes(big_endian) == np.arange(3, dtype="<i4").tobytes()
    assert (
        raw_bytes(np.arange(6, dtype=np.int16).reshape(2, 3).T)
        == np.array([0, 3, 1, 4, 2, 5], dtype="<i2").tobytes()
    )  # row-major, whatever the strides


# --- the binary tensor extension -----------------------------------------------------------

BINARY_SPECS = [
    TensorSpec(name="INPUT_FP32", datatype="FP32", shape=[1, 5]),
    TensorSpec(name="INPUT_FP16", datatype="FP16", shape=[2, 2]),
    TensorSpec(name="INPUT_BOOL", datatype="BOOL", shape=[3]),
]


@pytest.mark.parametrize("name_outputs", [True, False])
def test_binary_body_decodes_with_the_servers_own_decoder(name_outputs: bool) -> None:
    request = payload(BINARY_SPECS, ("OUTPUT_FP32", "OUTPUT_FP16"), name_outputs)
    body, header_length = binary_request_body(request)
    assert len(body) == header_length + request.request_bytes
    header, binary = split_binary_body(body, str(header_length))
    decoded = v2.decode_request(orjson.loads(header), "mlp", None, binary)
    for tensor in decoded.inputs:
        np.testing.assert_array_equal(tensor.data, request.inputs[tensor.name])
    if name_outputs:
        assert v2.binary_outputs(decoded) == {"OUTPUT_FP32", "OUTPUT_FP16"}
    else:
        assert decoded.outputs is None and v2.binary_outputs(decoded) == {"*"}


def test_v2_binary_request_is_built_once_with_its_header() -> None:
    protocol = V2Binary.create(payload(BINARY_SPECS, ("OUTPUT_FP32",), True), timeout=1.0)
    request = protocol.infer_request
    assert (request.method, request.path) == ("POST", "/v2/models/mlp/infer")
    assert request.body is not None
    length = int(request.headers[BINARY_HEADER])
    assert orjson.loads(request.body[:length])["outputs"] == [
        {"name": "OUTPUT_FP32", "parameters": {"binary_data": True}}
    ]
    assert protocol.transport == "http" and protocol.name == "v2-binary"


def server_binary_answer(*arrays: tuple[str, str, np.ndarray]) -> tuple[dict[str, str], bytes]:
    """An answer exactly as the server's REST app frames it."""
    response = InferResponse("m", [Tensor(n, t, a) for n, t, a in arrays], "1")
    doc, blobs = v2.encode_response(response, {"*"})
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return {BINARY_HEADER: str(len(header))}, b"".join([header, *blobs])


def test_read_binary_answer_counts_the_tensor_bytes() -> None:
    headers, body = server_binary_answer(
        ("OUTPUT_FP32", "FP32", np.ones((1, 5), np.float32)),
        ("OUTPUT_BOOL", "BOOL", np.ones(3, bool)),
    )  # fmt: skip
    outputs, size = read_binary_answer(headers, body)
    assert size == 5 * 4 + 3
    assert [o["name"] for o in outputs] == ["OUTPUT_FP32", "OUTPUT_BOOL"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h, b: ({}, b), "Inference-Header-Content-Length"),
        (lambda h, b: ({BINARY_HEADER: "x"}, b), "Inference-Header-Content-Length"),
        (lambda h, b: ({BINARY_HEADER: str(len(b) + 1)}, b), "Inference-Header-Content-Length"),
        (lambda h, b: (h, b[:-1]), "claim"),  # a truncated tensor
        (lambda h, b: (h, b + b"\0"), "claim"),  # bytes nobody claims
        (lambda h, b: ({BINARY_HEADER: "2"}, b), "parse"),
    ],
)  # fmt: skip
def test_read_binary_answer_rejects_bad_framing(change: object, message: str) -> None:
    headers, body = server_binary_answer(("OUTPUT_FP32", "FP32", np.ones((1, 5), np.float32)))
    bad_headers, bad_body = change(headers, body)  # type: ignore[operator]
    with pytest.raises(BadAnswer, match=message):
        read_binary_answer(bad_headers, bad_body)


def test_read_binary_answer_rejects_json_outputs_and_wrong_sizes() -> None:
    header = orjson.dumps({"outputs": [{"name": "y", "datatype": "FP32", "shape": [1],
                                        "data": [1.0]}]})  # fmt: skip
    with pytest.raises(BadAnswer, match="binary data"):
        read_binary_answer({BINARY_HEADER: str(len(header))}, header)
    header = orjson.dumps({"outputs": [{"name": "y", "datatype": "FP32", "shape": [2],
                                        "parameters": {"binary_data_size": 4}}]})  # fmt: skip
    with pytest.raises(BadAnswer, match="needs 8 bytes"):
        read_binary_answer({BINARY_HEADER: str(len(header))}, header + b"\0" * 4)


# --- gRPC ----------------------------------------------------------------------------------


def test_grpc_request_decodes_with_the_servers_own_codec() -> None:
    request = payload(BINARY_SPECS, ("OUTPUT_FP32",), True)
    protocol = grpc_load.GrpcInfer.create(request, timeout=1.0)
    assert (protocol.name, protocol.transport) == ("grpc", "grpc")
    # The bytes sent are the message, serialized once.
    message = type(protocol.request).FromString(protocol.wire)
    assert message == protocol.request and message.model_name == "mlp"
    assert [o.name for o in message.outputs] == ["OUTPUT_FP32"]
    decoded = codec.decode_request(message, None)
    for tensor in decoded.inputs:
        np.testing.assert_array_equal(tensor.data, request.inputs[tensor.name])
    unnamed = grpc_load.infer_request(payload(BINARY_SPECS, ("OUTPUT_FP32",), False))
    assert not unnamed.outputs


def test_grpc_response_tensor_bytes() -> None:
    # The answer as the bench's channel gets it: the server's bytes, parsed by the stub's type.
    raw = codec.encode_response(InferResponse("m", [
        Tensor("OUTPUT_FP32", "FP32", np.ones((1, 5), np.float32)),
        Tensor("OUTPUT_BOOL", "BOOL", np.ones(3, bool)),
    ], "1"))  # fmt: skip
    response = service_pb2.ModelInferResponse.FromString(wire.serialize_infer_response(raw))
    assert grpc_load.response_tensor_bytes(response, ["OUTPUT_FP32"]) == 23
    with pytest.raises(BadAnswer, match="lacks"):
        grpc_load.response_tensor_bytes(response, ["OUTPUT_X"])
    response.raw_output_contents[1] = b"\1\1"
    with pytest.raises(BadAnswer, match="needs 3 bytes"):
        grpc_load.response_tensor_bytes(response)
    del response.raw_output_contents[1]
    with pytest.raises(BadAnswer, match="1 raw_output_contents for 2 outputs"):
        grpc_load.response_tensor_bytes(response)
    with pytest.raises(BadAnswer, match="no outputs"):
        grpc_load.response_tensor_bytes(type(response)())


# --- several protocols in one table, throughput ---------------------------------------------

MULTI = [
    row(report.CLIENT_FLOOR, 1, 0.1, protocol="http"),
    row(report.LIVE_FLOOR, 1, 0.3, protocol="http"),
    row(report.LIVE_FLOOR, 1, 0.5, protocol="grpc"),
    row(report.INFER, 1, 600.0, protocol="v2-json"),
    row(report.INFER, 1, 40.0, protocol="v2-binary"),
    row(report.INFER, 1, 80.0, protocol="grpc"),
]


def test_table_names_the_protocols_when_there_are_several() -> None:
    lines = report.format_table(MULTI, RAW).splitlines()
    assert lines[0].split()[:2] == ["target", "protocol"]
    assert [line.split()[1] for line in lines[1:]] == [
        "-", "http", "http", "grpc", "v2-json", "v2-binary", "grpc",
    ]  # fmt: skip
    # One protocol: no protocol column, the table as it always was.
    single = [r for r in MULTI if r.protocol in ("http", "v2-json")]
    assert report.format_table(single, RAW).splitlines()[0].split()[:2] == ["target", "conc"]


def test_breakdown_per_protocol_uses_its_own_floors() -> None:
    assert report.breakdown(MULTI, RAW, 1, "v2-binary") == pytest.approx({
        "served_p50_ms": 40.0, "client_and_tcp_ms": 0.1, "server_http_ms": 0.2,
        "server_infer_path_ms": 39.5, "forward_ms": 0.2,
    })  # fmt: skip
    assert report.breakdown(MULTI, RAW)["served_p50_ms"] == 600.0  # the first protocol
    assert report.breakdown(MULTI, RAW, 1, "grpc") == {}  # no gRPC client floor
    assert report.breakdown(MULTI, RAW, 4, "v2-json") == {}
    text = report.format_breakdown(report.breakdown(MULTI, RAW, 1, "v2-binary"), 1, "v2-binary")
    assert text.startswith("p50 at concurrency 1 over v2-binary: 40.000 ms")


def test_mb_per_s_is_bytes_times_concurrency_over_mean_latency() -> None:
    mib16 = 16 * 1024 * 1024
    one = row(report.INFER, 1, 50.0)  # mean 50 ms
    assert report.mb_per_s(mib16, mib16, one) == pytest.approx(2 * mib16 / 0.05 / 1e6)
    four = row(report.INFER, 4, 50.0)
    assert report.mb_per_s(100, 0, four) == pytest.approx(100 * 4 / 0.05 / 1e6)
    assert report.mb_per_s(100, 100, row(report.INFER, 1, None)) is None


def test_throughput_rows_and_ratios() -> None:
    sizes = {"v2-json": (1_000_000, 1_000_000), "v2-binary": (1_000_000, 1_000_000),
             "grpc": (1_000_000, 1_000_000)}  # fmt: skip
    copy = row(report.COPY_FLOOR, 1, 0.2)
    rates = report.throughput(MULTI, sizes, copy, (1_000_000, 1_000_000))
    assert [(r.target, r.protocol) for r in rates] == [
        ("copy-floor", ""), ("infer", "v2-json"), ("infer", "v2-binary"), ("infer", "grpc"),
    ]  # fmt: skip
    copy_rate, json_rate, binary_rate, grpc_rate = (r.mb_per_s for r in rates)
    assert copy_rate == pytest.approx(2 / 0.0002)  # 2 MB in 0.2 ms
    assert json_rate == pytest.approx(2 / 0.6) and binary_rate == pytest.approx(2 / 0.04)
    assert grpc_rate == pytest.approx(2 / 0.08)
    assert rates[2].this_over_json == pytest.approx(15.0)
    assert rates[3].this_over_json == pytest.approx(7.5)
    assert rates[1].this_over_json == pytest.approx(1.0)
    assert rates[2].copy_over_this == pytest.approx(200.0)
    assert rates[0].copy_over_this == 1.0 and rates[0].this_over_json is None
    # Without v2-json in the run there is no JSON ratio; without a copy, no copy row.
    no_json = report.throughput(MULTI[4:], sizes, None, None)
    assert [(r.protocol, r.this_over_json, r.copy_over_this) for r in no_json] == [
        ("v2-binary", None, None), ("grpc", None, None),
    ]  # fmt: skip
    lines = report.format_throughput(rates).splitlines()
    assert lines[0].split() == ["target", "protocol", "conc", "request", "response", "MB/s",
                                "copy/this", "this/v2-json"]  # fmt: skip
    assert lines[3].split() == ["infer", "v2-binary", "1", "977", "KiB", "977", "KiB", "50.0",
                                "200x", "15.0x"]  # fmt: skip


def test_format_bytes_and_ratio() -> None:
    assert report.format_bytes(40) == "40 B"
    assert report.format_bytes(3136) == "3.06 KiB"
    assert report.format_bytes(16 * 1024 * 1024) == "16 MiB"
    assert report.format_bytes(256 * 1024) == "256 KiB"
    assert report.format_bytes(5 * 1024**3) == "5120 MiB"
    assert (report.format_ratio(None), report.format_ratio(13.24), report.format_ratio(328.4)) == (
        "-", "13.2x", "328x",
    )  # fmt: skip


def test_document_holds_the_throughput() -> None:
    now = datetime.datetime(2025, 1, 2, tzinfo=datetime.UTC)
    copy = row(report.COPY_FLOOR, 1, 0.2)
    rates = report.throughput(MULTI, {"v2-json": (10, 10)}, copy, (10, 10))
    doc = report.document(config={}, machine={}, rows=MULTI, raw=RAW, now=now, copy=copy,
                          rates=rates)  # fmt: skip
    assert doc["copy_floor"]["target"] == "copy-floor"
    assert [r["protocol"] for r in doc["throughput"]] == ["", "v2-json"]
    assert set(doc["breakdowns_p50_ms"]) == {"v2-json", "v2-binary"}
    assert "MB/s" in doc["legend"] and "live-floor grpc" in doc["legend"]
    orjson.dumps(doc)


# --- the copy floor ------------------------------------------------------------------------


def test_time_copies_runs_for_the_window_on_a_fake_clock() -> None:
    ticks = iter(range(1000))
    latencies = memcopy.time_copies(1000, 10, seconds=10.0, clock=lambda: float(next(ticks)))
    # Each sample reads the clock twice (1 unit apart); it stops at the first done >= end.
    assert latencies and all(latency == 1.0 for latency in latencies)
    assert len(latencies) == 5


def test_time_copies_real_clock_and_sizes() -> None:
    assert memcopy.time_copies(4096, 0, seconds=0.01)
    with pytest.raises(ValueError):
        memcopy.time_copies(-1, 0, seconds=0.01)


# --- CPU sets and CPU time ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, cpus",
    [("0", (0,)), ("0-2,5", (0, 1, 2, 5)), (" 3 , 1", (1, 3)), ("1,1-2", (1, 2))],
)
def test_parse_cpu_list(text: str, cpus: tuple[int, ...]) -> None:
    assert bench_cpus.parse_cpu_list(text) == cpus
    assert bench_cpus.parse_cpu_list(bench_cpus.format_cpu_list(cpus)) == cpus


@pytest.mark.parametrize("text", ["", "a", "3-1", "1-", "-1", "0,,1"])
def test_parse_cpu_list_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        bench_cpus.parse_cpu_list(text)


def test_format_cpu_list_folds_ranges() -> None:
    assert bench_cpus.format_cpu_list([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert bench_cpus.format_cpu_list([3]) == "3"


def test_split_cpus_leaves_the_client_the_rest() -> None:
    assert bench_cpus.split_cpus((0, 1, 2, 3), (0,)) == (1, 2, 3)
    with pytest.raises(BenchError, match="not available"):
        bench_cpus.split_cpus((0, 1), (2,))
    with pytest.raises(BenchError, match="leaves no CPU"):
        bench_cpus.split_cpus((0, 1), (0, 1))


def test_stat_cpu_seconds_counts_fields_after_the_name() -> None:
    # A command name with spaces and a parenthesis must not shift the fields.
    fields = ["S"] + ["0"] * 10 + ["250", "50"] + ["0"] * 30
    stat = "1234 (ember (bench) x) " + " ".join(fields)
    assert bench_cpus.parse_stat_cpu_seconds(stat, 100) == pytest.approx(3.0)


def test_machine_busy_seconds_leave_out_idle_and_iowait() -> None:
    stat = "cpu  100 5 50 1000 40 3 2 10 7 0\ncpu0 1 1 1 1 1 1 1 1 1 1\nintr 5\n"
    assert bench_cpus.parse_busy_seconds(stat, 100) == pytest.approx(1.70)
    with pytest.raises(ValueError):
        bench_cpus.parse_busy_seconds("intr 5\n", 100)
    busy = bench_cpus.machine_busy_seconds()
    assert busy is not None and busy > 0


def test_cpu_time_of_this_process_is_read_from_proc() -> None:
    seconds = bench_cpus.process_cpu_seconds(os.getpid())
    assert seconds is not None and seconds > 0
    assert bench_cpus.process_cpu_seconds(2**22 + 12345) is None  # no such process
    assert bench_cpus.cpus_allowed_list(os.getpid()) == bench_cpus.format_cpu_list(
        os.sched_getaffinity(0)
    )


def test_pinned_restores_the_given_set() -> None:
    allowed = bench_cpus.allowed_cpus()
    with bench_cpus.pinned(allowed[:1], allowed):
        assert os.sched_getaffinity(0) == set(allowed[:1])
    assert os.sched_getaffinity(0) == set(allowed)


# --- the model copy with a bounded queue ----------------------------------------------------

TOML = """name = "m"
max_batch_size = 64

[batching]
max_queue_delay_us = 0
max_queue_size = 1024  # keep this comment

[[inputs]]
name = "input"
"""


def test_set_queue_size_rewrites_the_one_line() -> None:
    out = modelcopy.set_queue_size(TOML, 32)
    assert "max_queue_size = 32  # keep this comment" in out
    assert out.replace("32  #", "1024  #") == TOML


def test_set_queue_size_adds_the_line_when_missing() -> None:
    text = TOML.replace("max_queue_size = 1024  # keep this comment\n", "")
    out = modelcopy.set_queue_size(text, 8)
    assert "[batching]\nmax_queue_size = 8\nmax_queue_delay_us = 0" in out


@pytest.mark.parametrize(
    "text, message",
    [
        ('name = "m"\n', "no \\[batching\\]"),
        ("max_queue_size = 1\n[batching]\nmax_queue_delay_us = 0\n", "outside"),
    ],
)
def test_set_queue_size_refuses(text: str, message: str) -> None:
    with pytest.raises(BenchError, match=message):
        modelcopy.set_queue_size(text, 4)


def test_write_queue_copy_links_weights_and_serves(tmp_path: Path) -> None:
    source = Path(__file__).resolve().parents[2] / "models" / "mlp"
    folder = modelcopy.write_queue_copy(source, 7, tmp_path)
    assert (folder / "model.pt").is_symlink()
    assert (folder / "model.pt").resolve() == (source / "model.pt").resolve()
    ((config, _),) = discover(tmp_path, ["mlp"])
    assert config.batching is not None and config.batching.max_queue_size == 7


# --- the new arguments ----------------------------------------------------------------------


def test_batching_issue_command_line() -> None:
    options = parse(
        "--serve", "--serve-cpus", "0", "--model", "mlp", "--protocol", "v2-binary,v2-json",
        "--concurrency", "1,8,32", "--compare", "no-batching", "--overload", "4",
        "--queue-size", "64", "--retry-after-cap", "0.5", "--plot", "p.png",
    )  # fmt: skip
    assert options.serve_cpus == (0,) and options.compare == "no-batching"
    assert (options.overload, options.overload_concurrency) == (4.0, 128)
    assert (options.queue_size, options.retry_after_cap) == (64, 0.5)
    assert options.plot == Path("p.png")
    assert problems(options) == []
    assert torch_threads(None, True, 2, len(options.serve_cpus)) == 1
    assert torch_threads(3, True, 2, 1) == 3  # --torch-threads wins


@pytest.mark.parametrize(
    "argv",
    [
        ["--serve-cpus", "x"], ["--serve-cpus", "2-1"], ["--overload", "0.5"],
        ["--overload", "nan"], ["--queue-size", "0"], ["--compare", "other"],
        ["--retry-after-cap", "0"],
    ],
)  # fmt: skip
def test_bad_batching_arguments_exit(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="ember bench")
    cli.add_bench_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "mlp", *argv])


def test_problems_of_combinations() -> None:
    lone = parse("--model", "m", "--serve-cpus", "0", "--compare", "no-batching",
                 "--queue-size", "2")  # fmt: skip
    assert [p.split()[0] for p in problems(lone)] == ["--serve-cpus", "--compare", "--queue-size"]
    grpc_only = parse("--model", "m", "--protocol", "grpc", "--overload", "2")
    assert problems(grpc_only) == [
        "--overload needs an HTTP protocol (v2-json or v2-binary): gRPC refusals carry no "
        "Retry-After to wait on"
    ]


def test_overload_concurrency_rounds() -> None:
    assert BenchOptions(model="m", concurrency=(1, 3), overload=1.5).overload_concurrency == 4
    assert BenchOptions(model="m").overload_concurrency is None


def test_execute_refuses_bad_combinations() -> None:
    from ember.server.bench.run import execute

    log = io.StringIO()
    assert execute(BenchOptions(model="m", compare="no-batching"), io.StringIO(), log) == 2
    assert "--compare needs --serve" in log.getvalue()


# --- what the server ran, from its statistics -----------------------------------------------


def stats_doc(inferences: int, executions: int, batches: dict[int, tuple[int, int]]) -> object:
    return {"model_stats": [
        {"name": "other", "inference_count": 99, "execution_count": 99, "batch_stats": []},
        {"name": "mlp", "inference_count": inferences, "execution_count": executions,
         "batch_stats": [{"batch_size": size, "compute_infer": {"count": count, "ns": ns}}
                         for size, (count, ns) in batches.items()]},
    ]}  # fmt: skip


def test_counters_and_their_difference() -> None:
    before = observe.counters(stats_doc(10, 6, {1: (4, 400), 3: (2, 600)}), "mlp")
    after = observe.counters(stats_doc(110, 10, {1: (4, 400), 3: (2, 600), 25: (4, 9000)}), "mlp")
    assert before is not None and after is not None
    assert after.forward_ns == 10000 and after.executions == 10
    diff = observe.batch_diff(before.batches, after.batches)
    assert diff == {25: 4}
    assert observe.counters(stats_doc(1, 1, {}), "missing") is None
    assert observe.counters({"error": "x"}, "mlp") is None


def observed(**changes: object) -> Observed:
    base: dict[str, object] = dict(
        seconds=2.0, batches={8: 10}, inferences=80, executions=10, forward_seconds=0.5,
        client_cpu=0.3, client_cores=1, server_cpu=0.98, server_cores=1, other_cpu=0.0,
    )  # fmt: skip
    base.update(changes)
    return Observed(**base)  # type: ignore[arg-type]


def test_observed_means() -> None:
    seen = observed()
    assert (seen.mean_batch, seen.forward_share) == (8.0, 0.25)
    # From the histogram, not inference_count / execution_count (read at other moments).
    assert observed(batches={1: 3, 7: 1}, inferences=9, executions=4).mean_batch == 2.5
    assert observed(batches={}).mean_batch is None
    assert observed(batches=None).mean_batch is None
    assert observed(forward_seconds=None).forward_share is None


async def test_probe_reads_the_servers_statistics_and_cpu() -> None:
    from aiohttp import web

    readings = [
        stats_doc(10, 10, {1: (10, 1000)}),
        stats_doc(50, 12, {1: (10, 1000), 20: (2, 5000)}),
    ]

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(readings.pop(0))

    app = web.Application()
    app.router.add_get("/v2/models/mlp/stats", stats)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        probe = observe.Probe(f"http://127.0.0.1:{port}", "mlp", server_pid=os.getpid(),
                              client_cores=1, server_cores=1)  # fmt: skip
        await probe.open()
        await asyncio.sleep(0.05)
        await probe.close()
    finally:
        await runner.cleanup()
    seen = probe.result()
    assert seen is not None
    assert (seen.batches, seen.inferences, seen.executions) == ({20: 2}, 40, 2)
    assert seen.mean_batch == 20.0 and seen.forward_seconds == pytest.approx(5e-6)
    assert seen.seconds >= 0.05 and seen.client_cpu >= 0 and seen.server_cpu is not None
    assert seen.other_cpu is not None and seen.other_cpu >= 0


async def test_probe_without_statistics_still_measures_cpu() -> None:
    probe = observe.Probe("http://127.0.0.1:9", "mlp", server_pid=None, client_cores=1,
                          server_cores=None, timeout=1.0)  # fmt: skip
    await probe.open()
    await probe.close()
    seen = probe.result()
    assert seen is not None and seen.batches is None and seen.server_cpu is None


# --- window hooks and the overload level, on the fake clock ---------------------------------


async def test_run_level_calls_the_hooks_at_the_window_edges() -> None:
    fake = FakeTime()
    seen: list[float] = []

    async def mark() -> None:
        seen.append(fake.now)

    await run_level(
        "infer", fake.opener(), concurrency=1, duration=10.0, warmup=5.0, clock=fake.clock,
        on_open=mark, on_close=mark,
    )  # fmt: skip
    # Each once, in order, not before its edge (the hooks poll the clock, which the fake
    # requests move faster than real time).
    assert len(seen) == 2 and 5.0 <= seen[0] <= seen[1] and seen[1] >= 15.0


def retrying_opener(fake: FakeTime, answers: list[float | None]) -> OpenRetryWorker:
    """Each call takes one unit and answers the next of `answers` (cycled)."""

    @asynccontextmanager
    async def open_worker() -> AsyncIterator[RetryCall]:
        async def call() -> float | None:
            answer = answers[fake.calls % len(answers)]
            fake.calls += 1
            fake.now += 1.0
            await asyncio.sleep(0)
            return answer

        yield call

    return open_worker


async def test_overload_level_counts_refusals_and_waits_capped() -> None:
    fake = FakeTime()
    stats = await run_overload_level(
        retrying_opener(fake, [None, 1.0, None, math.inf]), concurrency=1, duration=8.0,
        warmup=0.0, retry_after_cap=0.001, protocol="v2-json", clock=fake.clock,
    )  # fmt: skip
    assert (stats.ok, stats.rejected, stats.errors) == (4, 4, 0)
    assert stats.goodput == 0.5
    assert stats.retry_after_s == math.inf  # the largest the server asked for
    assert stats.waited_s == pytest.approx(0.004)  # each wait capped
    assert stats.ok_p50_ms == stats.rejected_p99_ms == 1000.0


# --- the raw forward at several batch sizes -------------------------------------------------


def test_raw_rate_and_batched_inputs() -> None:
    rate = raw_rate(4, 8, [0.001, 0.002, 0.003])
    assert (rate.calls, rate.rows) == (3, 8) and rate.p50_ms == pytest.approx(2.0)
    assert rate.rows_per_s == pytest.approx(8 * 3 / 0.006)
    with pytest.raises(ValueError):
        raw_rate(1, 1, [])
    from ember.server.bench import raw

    one = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    four = raw.batched(one, 4)["x"]
    assert four.shape == (8, 3) and np.array_equal(four[6:], one["x"])


def test_raw_batch_sizes() -> None:
    assert run.raw_batch_sizes((1, 8, 32), [1.0, 6.6, 25.4, 1.0], 64) == [1, 7, 8, 25, 32]
    assert run.raw_batch_sizes((1, 128), [90.0], 64) == [1, 64]  # what one forward can take
    assert run.raw_batch_sizes((4,), [], 1) == [1]


def test_rows_per_request_and_batch_limit() -> None:
    spec = TensorSpec(name="input", datatype="FP32", shape=[-1, 784])
    config = ModelConfig(name="m", format="torchscript", inputs=[spec], outputs=[spec],
                         max_batch_size=64)  # fmt: skip
    payload4 = Payload("m", (spec.model_copy(update={"shape": [4, 784]}),),
                       {"input": np.zeros((4, 784), np.float32)}, ())  # fmt: skip
    assert run.rows_per_request(config, payload4) == 4
    assert run.max_requests_per_batch(config, 4) == 16
    unbatched = config.model_copy(update={"max_batch_size": 0})
    assert run.rows_per_request(unbatched, payload4) == 1
    assert run.max_requests_per_batch(unbatched, 1) == 1


# --- the lean HTTP client ------------------------------------------------------------------


def test_encode_request_is_one_buffer() -> None:
    wire = rawhttp.encode_request(
        "POST", "http://127.0.0.1:8080", "/v2/models/m/infer", b"{}",
        {"Content-Type": "application/json"},
    )  # fmt: skip
    assert wire == (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")  # fmt: skip
    get = rawhttp.encode_request("GET", "http://h:1/base/", "/x", None, {})
    assert get == b"GET /base/x HTTP/1.1\r\nHost: h:1\r\n\r\n"
    with pytest.raises(BenchError):
        rawhttp.encode_request("GET", "https://h", "/", None, {})


def test_parse_head_and_headers_ignore_case() -> None:
    status, headers = rawhttp.parse_head(
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\ncontent-length: 0"
    )
    assert status == 429
    assert headers.get("retry-after") == headers["RETRY-AFTER"] == "1"
    assert "Content-Length" in headers and headers.get("missing") is None
    with pytest.raises(rawhttp.HttpError):
        rawhttp.parse_head(b"SSH-2.0 hello")


def test_dechunk() -> None:
    data = b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\nNEXT"
    assert rawhttp.dechunk(data) == (b"abcde", len(data) - 4)
    assert rawhttp.dechunk(data[:12]) is None
    with pytest.raises(rawhttp.HttpError):
        rawhttp.dechunk(b"zz\r\n")


def test_retry_after_seconds() -> None:
    assert retry_after_seconds("1") == 1.0
    assert retry_after_seconds(" 0.5 ") == 0.5
    for value in (None, "Wed, 21 Oct 2015 07:28:00 GMT", "-1", "nan"):
        assert retry_after_seconds(value) == math.inf


async def test_http_workers_against_a_canned_server() -> None:
    """Content-Length and chunked answers on one connection, a 429 with Connection: close
    (the worker reconnects), and a bad status as an error."""
    answers = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
        b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\nconnection: close\r\n"
        b"content-length: 2\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 500 Oops\r\ncontent-length: 4\r\n\r\nboom",
    ]
    connections = 0
    bodies: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while answers:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            bodies.append(await reader.readexactly(length))
            answer = answers.pop(0)
            writer.write(answer)
            await writer.drain()
            if b"connection: close" in answer:
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    request = HttpRequest("POST", "/infer", b"xyz", {})
    seen: list[str] = []
    async with server:

        def verify(headers: Mapping[str, str], body: bytes) -> None:
            seen.append(body.decode())

        async with http_retry_worker(url, request, 5.0, verify) as call:
            assert await call() is None
            assert await call() is None
            assert await call() == 1.0
            assert await call() is None  # on a new connection
        async with http_worker(url, request, 5.0) as plain:
            with pytest.raises(BadStatus, match="HTTP 500: boom"):
                await plain()
    assert seen == ["hello", "hello", ""]
    assert bodies == [b"xyz"] * 5 and connections == 3


async def test_http_worker_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        await asyncio.sleep(1)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server, http_worker(url, HttpRequest("GET", "/"), 0.05) as call:
        with pytest.raises(TimeoutError):
            await call()


# --- levels against the raw forward, the compared server, overload and the targets --------


def level_row(server: str, protocol: str, c: int, rps: float, p50: float, p99: float,
              mean: float | None = None, client: float = 0.3) -> Stats:  # fmt: skip
    seen = None
    if mean is not None:
        seen = observed(batches={round(mean): 10}, client_cpu=client)
    return Stats(report.INFER, c, 10.0, int(rps * 10), 0, rps, p50, p50, p99, p50,
                 protocol=protocol, server=server, observed=seen)  # fmt: skip


RAW_RATES = [RawRate(1, 1, 100, 0.2, 5000.0), RawRate(20, 20, 100, 1.0, 16000.0),
             RawRate(32, 32, 100, 1.6, 20000.0)]  # fmt: skip
LEVEL_ROWS = [
    level_row("batching", "v2-binary", 1, 1000.0, 1.0, 2.0, mean=1.0),
    level_row("batching", "v2-binary", 32, 9500.0, 3.0, 8.0, mean=20.0, client=0.5),
    level_row("batching", "v2-json", 32, 6000.0, 5.0, 20.0, mean=20.0),
    level_row("no-batching", "v2-binary", 1, 1100.0, 0.9, 2.0, mean=1.0),
    level_row("no-batching", "v2-binary", 32, 2000.0, 16.0, 20.0, mean=1.0),
    level_row("no-batching", "v2-json", 32, 1500.0, 21.0, 30.0, mean=1.0),
]


def test_levels_compare_with_raw_and_the_other_server() -> None:
    items = {(i.server, i.protocol, i.concurrency): i
             for i in report.levels(LEVEL_ROWS, RAW_RATES, 64)}  # fmt: skip
    top = items["batching", "v2-binary", 32]
    assert top.of_raw_at_concurrency == pytest.approx(9500 / 20000)
    assert top.observed_batch == 20
    assert top.of_raw_at_observed == pytest.approx(9500 / 16000)
    assert top.over_compared == pytest.approx(9500 / 2000)
    assert top.p99_over_p50 == pytest.approx(8 / 3)
    assert items["no-batching", "v2-binary", 32].over_compared is None
    assert items["batching", "v2-binary", 1].of_raw_at_concurrency == pytest.approx(0.2)
    table = report.format_levels(LEVEL_ROWS, RAW_RATES, 64)
    assert "x no-batching" in table.splitlines()[0]
    assert "4.8x" in table and "9,500" in table


def test_table_has_a_server_column_with_two_servers() -> None:
    lines = report.format_table(LEVEL_ROWS).splitlines()
    assert lines[0].split()[:2] == ["server", "target"]
    assert lines[-1].split()[:2] == ["no-batching", "infer"]
    assert report.format_table(ROWS).splitlines()[0].split()[0] == "target"  # as it was


def overload_stats(goodput: float, rejected_p99: float | None) -> OverloadStats:
    return OverloadStats(
        concurrency=128, seconds=10.0, protocol="v2-binary", ok=int(goodput * 10),
        rejected=50, errors=0, goodput=goodput, ok_p50_ms=10.0, ok_p99_ms=30.0,
        rejected_p50_ms=1.0, rejected_p99_ms=rejected_p99, retry_after_s=1.0, waited_s=50.0,
        retry_after_cap_s=1.0,
    )  # fmt: skip


def test_overload_against_the_peak() -> None:
    stats = overload_stats(9000.0, 2.0)
    best = report.peak(LEVEL_ROWS, "batching", "v2-binary")
    assert best is not None and best.rps == 9500.0
    summary = report.overload_summary(stats, best)
    assert summary["goodput_of_peak"] == pytest.approx(9000 / 9500)
    assert summary["peak_concurrency"] == 32
    text = report.format_overload(stats, best)
    assert "94.7% of the peak 9,500 rps (v2-binary c=32)" in text
    assert "refused (429) 50 (p50 1.000 ms, p99 2.000 ms)" in text


def test_targets_met_and_not_met() -> None:
    checks = targets.evaluate(LEVEL_ROWS, RAW_RATES, overload_stats(8000.0, 7.0), 64)
    verdicts = {c.name: c.met for c in checks}
    assert verdicts == {
        "v2-binary c=32: rows/s of raw forward rows/s at batch 32": True,  # 47.5% >= 45%
        "v2-binary c=32: rows/s over the server without batching": True,  # 4.75x
        "v2-binary c=32: p99 / p50": True,  # 2.67x
        "v2-json c=32: rows/s of raw forward rows/s at batch 32": False,  # 30% < 35%
        "v2-json c=32: rows/s over the server without batching": True,  # 4x
        "v2-json c=32: p99 / p50": False,  # 4x
        "overload v2-binary c=128: goodput of the peak throughput": False,  # 84%
        "overload v2-binary c=128: rejection (429) latency p99": False,  # 7 ms
    }
    text = targets.format_checks(checks)
    assert "NOT met  v2-json c=32: p99 / p50: 4.00x (target <= 3.00x)" in text
    unmeasured = targets.evaluate(LEVEL_ROWS, [], overload_stats(9000.0, None), 64)
    assert {c.name: c.met for c in unmeasured}[
        "overload v2-binary c=128: rejection (429) latency p99"
    ] is None
    assert targets.evaluate([], [], None, 64) == []


def test_targets_summarised_over_passes_on_the_median() -> None:
    share = "v2-json c=32: rows/s of raw forward rows/s at batch 32"
    p99 = "v2-json c=32: p99 / p50"
    rejected = "overload v2-binary c=128: rejection (429) latency p99"

    def checks(of_raw: float, ratio: float, ms: float | None) -> list[targets.Check]:
        return [
            targets.Check(share, of_raw, 0.35, True, "share"),
            targets.Check(p99, ratio, 3.0, False, "x"),
            targets.Check(rejected, ms, 5.0, False, "ms"),
        ]

    passes = [checks(0.40, 1.5, 4.0), checks(0.30, 3.5, None), checks(0.34, 2.0, 6.0)]
    summaries = {s.median.name: s for s in targets.summarize(passes)}
    assert list(summaries) == [share, p99, rejected]
    # One pass met the share, but the median (34%) does not: the verdict is the median's.
    assert summaries[share].median.value == pytest.approx(0.34)
    assert summaries[share].median.met is False and summaries[share].met_in == 1
    assert summaries[p99].median.met is True and summaries[p99].met_in == 2
    # A pass that did not measure a target is left out of its median, not counted as 0.
    assert summaries[rejected].values == (4.0, 6.0) and summaries[rejected].passes == 3
    assert summaries[rejected].median.value == pytest.approx(5.0)
    assert summaries[rejected].median.met is False  # "< 5 ms"
    text = targets.format_summary(list(summaries.values()))
    assert text.startswith("targets over 3 passes")
    assert (f"NOT met  {share}: median 34.0% (target >= 35.0%, 30.0% to 40.0%; met in 1 of 3)"
            in text)  # fmt: skip
    assert f"met  {p99}: median 2.00x (target <= 3.00x, 1.50x to 3.50x; met in 2 of 3)" in text
    never = targets.summarize([[targets.Check(share, None, 0.35, True, "share")]])
    assert never[0].median.met is None and never[0].values == ()
    assert "not measured" in targets.format_summary(never)
    assert targets.summarize([]) == []


def test_client_headroom() -> None:
    floor = Stats(report.CLIENT_FLOOR, 32, 3.0, 90000, 0, 30000.0, 1.0, 1.0, 1.0, 1.0,
                  protocol="http", server="batching")  # fmt: skip
    check = report.client_headroom([floor, *LEVEL_ROWS])
    assert check is not None and not check["suspect"]
    assert check["busiest"]["concurrency"] == 32 and check["busiest"]["client_cpu"] == 0.5
    assert check["floors"][0]["floor_over_served"] == pytest.approx(30000 / 9500)
    assert "its floor over 1.2x every served rate" in report.format_client_check(check)
    no_floor = report.format_client_check(report.client_headroom(LEVEL_ROWS))
    assert "not the bottleneck (under 90% busy; no client floor was measured)" in no_floor
    slow_floor = dataclasses.replace(floor, rps=10000.0)
    assert report.client_headroom([slow_floor, *LEVEL_ROWS])["suspect"]  # type: ignore[index]
    busy = [level_row("", "v2-json", 8, 100.0, 1.0, 1.0, mean=1.0, client=0.95)]
    assert report.client_headroom(busy)["suspect"]  # type: ignore[index]
    assert report.client_headroom(ROWS) is None
    quiet = report.client_headroom(LEVEL_ROWS)
    assert quiet is not None and not quiet["contended"] and quiet["others_max_cpu"] == 0.0
    shared = [dataclasses.replace(LEVEL_ROWS[0], observed=observed(other_cpu=0.4))]
    check = report.client_headroom(shared)
    assert check is not None and check["contended"]
    assert "the machine was shared" in report.format_client_check(check)


def test_document_holds_levels_overload_and_targets() -> None:
    checks = targets.evaluate(LEVEL_ROWS, RAW_RATES, overload_stats(9000.0, 2.0), 64)
    doc = report.document(
        config={}, machine={}, rows=LEVEL_ROWS, raw=None,
        now=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), raw_rates=RAW_RATES,
        overload=overload_stats(9000.0, 2.0), max_batch=64,
        checks=[{**dataclasses.asdict(c), "met": c.met} for c in checks],
    )  # fmt: skip
    encoded = orjson.loads(orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS))
    assert encoded["raw_forwards"][2]["rows_per_s"] == 20000.0
    assert encoded["levels"][1]["batches"] == {"20": 10}
    assert encoded["overload"]["goodput_of_peak"] == pytest.approx(9000 / 9500)
    assert encoded["results"][0]["server"] == "batching"
    assert all(t["met"] for t in encoded["targets"] if "json" not in t["name"])


# --- the plot -------------------------------------------------------------------------------


def test_plot_series_and_ceilings() -> None:
    lines = plot.series(LEVEL_ROWS)
    assert [s.label for s in lines] == [
        "batching v2-binary", "batching v2-json", "no-batching v2-binary", "no-batching v2-json",
    ]  # fmt: skip
    assert lines[0].concurrency == [1, 32] and lines[0].rows_per_s == [1000.0, 9500.0]
    assert [r.batch for r in plot.ceilings(RAW_RATES, [1, 8, 32])] == [1, 32]
    assert [r.batch for r in plot.ceilings(RAW_RATES, [1, 8])] == [1]


def test_plot_writes_a_small_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.png"
    plot.write_plot(out, LEVEL_ROWS, RAW_RATES, overload_stats(9000.0, 2.0), title="mlp")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) < 200_000
