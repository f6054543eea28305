"""`ember bench`: its pure parts (percentiles, the closed-loop window, the tables, arguments,
the requests each protocol builds and the checks of their answers)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import orjson
import pytest

from ember.server.bench import cli, grpc_load, memcopy, report
from ember.server.bench.client import BadAnswer
from ember.server.bench.load import Call, OpenWorker, Stats, percentiles, run_level, summarize
from ember.server.bench.options import TRANSPORTS, BenchOptions, grpc_target, torch_threads
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
from ember.server.config import TensorSpec
from ember.server.request import InferResponse, Tensor
from ember.server.rest.body import split_binary_body
from ember.server.rpc import codec

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
    response = codec.encode_response(InferResponse("m", [
        Tensor("OUTPUT_FP32", "FP32", np.ones((1, 5), np.float32)),
        Tensor("OUTPUT_BOOL", "BOOL", np.ones(3, bool)),
    ], "1"))  # fmt: skip
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
