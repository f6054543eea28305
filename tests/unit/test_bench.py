"""`ember bench`: its pure parts (percentiles, the closed-loop window, the table, arguments)."""

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

from ember.server.bench import cli, report
from ember.server.bench.load import Call, OpenWorker, Stats, percentiles, run_level, summarize
from ember.server.bench.options import BenchOptions, torch_threads
from ember.server.bench.protocols import PROTOCOLS, BenchError, V2Json, build_inputs
from ember.server.codecs import v2
from ember.server.config import TensorSpec

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


def row(target: str, concurrency: int, p50: float | None, errors: int = 0) -> Stats:
    return Stats(target, concurrency, 1.0, 100, errors, 100.0, p50, p50, p50, p50)


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
        ["--torch-threads", "0"], ["--protocol", "grpc"],
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
    assert set(cli.PROTOCOL_NAMES) == set(PROTOCOLS)


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


def test_v2_json_body_decodes_to_the_same_arrays() -> None:
    inputs = build_inputs(SPECS)
    protocol = V2Json.create("mlp", SPECS, inputs, ["y"], timeout=1.0)
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
        V2Json.create("m", specs, inputs, ["y"], timeout=1.0)
