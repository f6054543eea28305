"""One bench run, as a short sequence of steps: serve, load the model here, check each
protocol, raw forward, copy floor, load, report.

CPU sharing (the bench was written on 2 cores): nothing here computes while something else
is timed. The raw forward and the copy floor run while the server is idle (after it is ready,
before the load); during the load this process only runs the client loop, and torch in it
sits idle. The raw forward and a --serve server use the same torch thread count
(`options.torch_threads`), so the two stay comparable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import gc
import os
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

import orjson

from ember.server.bench import memcopy, raw, report
from ember.server.bench.echo import EchoServer
from ember.server.bench.launch import ServerProcess
from ember.server.bench.load import OpenWorker, Stats, run_level, summarize
from ember.server.bench.options import BenchOptions, grpc_target, torch_threads
from ember.server.bench.payload import Payload, build_inputs, select_inputs, select_outputs
from ember.server.bench.protocols import PROTOCOLS, BenchError, LoadProtocol
from ember.server.bench.report import CLIENT_FLOOR, COPY_FLOOR, INFER, LIVE_FLOOR, RAW
from ember.server.config import ModelConfig, discover
from ember.server.errors import ConfigError
from ember.server.loading import LoadError

T = TypeVar("T")


def _run_async(main: Coroutine[Any, Any, T]) -> T:
    # uvloop when installed (it comes with uvicorn[standard]): a cheaper client loop means
    # less of the client in the measured latency.
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


@dataclass(frozen=True, slots=True)
class _Measured:
    rows: list[Stats]
    raw: Stats | None
    threads: int
    copy: Stats | None = None
    copy_sizes: tuple[int, int] | None = None  # (request, response) bytes the copy floor copied
    sizes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # per protocol


def _plan(
    protocols: Sequence[LoadProtocol],
    endpoints: dict[str, str],
    floor_url: str | None,
    options: BenchOptions,
) -> list[tuple[str, str, OpenWorker, float]]:
    """(target, protocol label, worker, seconds) of one concurrency level, in order: the
    floors of each transport in use, then inference over each protocol."""
    plan = []
    if options.floor_seconds > 0:
        first_of: dict[str, LoadProtocol] = {}
        for protocol in protocols:
            first_of.setdefault(protocol.transport, protocol)
        for transport, protocol in first_of.items():
            # A client floor needs a canned answer in the protocol's framing: HTTP only.
            if transport == "http" and floor_url is not None:
                plan.append((CLIENT_FLOOR, transport, protocol.live(floor_url),
                             options.floor_seconds))  # fmt: skip
            plan.append((LIVE_FLOOR, transport, protocol.live(endpoints[transport]),
                         options.floor_seconds))  # fmt: skip
    for protocol in protocols:
        plan.append((INFER, protocol.name, protocol.infer(endpoints[protocol.transport]),
                     options.duration))  # fmt: skip
    return plan


async def _levels(
    protocols: Sequence[LoadProtocol],
    endpoints: dict[str, str],
    floor_url: str | None,
    options: BenchOptions,
    log: TextIO,
) -> list[Stats]:
    rows = []
    several = len(protocols) > 1
    for concurrency in options.concurrency:
        for target, label, open_worker, seconds in _plan(protocols, endpoints, floor_url, options):
            row = await run_level(
                target, open_worker,
                concurrency=concurrency, duration=seconds, warmup=options.warmup,
                protocol=label,
            )  # fmt: skip
            p50 = report.format_ms(row.p50_ms)
            name = f"{target} {label}" if several else target
            print(
                f"  {name} c={concurrency}: {row.rps:.1f} rps, p50 {p50} ms, {row.errors} errors",
                file=log, flush=True,
            )  # fmt: skip
            if row.first_error:
                print(f"    first error: {row.first_error}", file=log, flush=True)
            rows.append(row)
    return rows


async def _check_all(
    protocols: Sequence[LoadProtocol], endpoints: dict[str, str]
) -> dict[str, tuple[int, int]]:
    """One checked request per protocol: (request, response) tensor bytes of each."""
    return {p.name: (p.request_bytes, await p.check(endpoints[p.transport])) for p in protocols}


def _payload(options: BenchOptions, config: ModelConfig) -> Payload:
    """The tensors every protocol sends (--input/--shape) and the outputs it must get back."""
    specs = select_inputs(config.inputs, options.inputs, options.shape)
    outputs, name_outputs = select_outputs(
        [o.name for o in config.outputs], [i.name for i in config.inputs],
        [s.name for s in specs], options.outputs,
    )  # fmt: skip
    return Payload(
        model=options.model, specs=tuple(specs), inputs=build_inputs(specs, options.seed),
        outputs=outputs, name_outputs=name_outputs,
    )  # fmt: skip


def _measure(options: BenchOptions, log: TextIO) -> _Measured:
    with contextlib.ExitStack() as stack:
        server = None
        wanted = torch_threads(options.torch_threads, options.serve, os.cpu_count())
        if options.serve:
            env = dict(os.environ)
            if wanted is not None:
                env["OMP_NUM_THREADS"] = str(wanted)
            server = stack.enter_context(
                ServerProcess(options.model_repository, options.model, env=env)
            )
            print(f"started ember serve (pid {server.pid}) at {server.url}", file=log)
        # 1. Load the model here while the server loads it there: nothing is timed yet.
        runner = None
        if options.raw_seconds > 0:
            config, runner = raw.load_model(options.model_repository, options.model)
        else:
            ((config, _model_dir),) = discover(options.model_repository, [options.model])
        threads = raw.configure_threads(wanted)
        payload = _payload(options, config)
        protocols = [PROTOCOLS[name](payload, options.timeout) for name in options.protocols]
        if server is not None:
            server.wait_ready(options.ready_timeout)
            endpoints = {"http": server.url, "grpc": server.grpc_target}
        else:
            endpoints = {"http": options.url, "grpc": grpc_target(options.url, options.grpc_url)}
        # One checked request per protocol first: a wrong URL or model fails now, not after
        # the raw forward; the answers tell how many tensor bytes come back.
        sizes = _run_async(_check_all(protocols, endpoints))
        # 2. The raw forward, with the same inputs the load sends, while the server is idle.
        raw_stats = None
        if runner is not None:
            print(f"raw forward for {options.raw_seconds:g} s, torch threads: {threads}", file=log)
            latencies = raw.time_forward(runner, dict(payload.inputs), options.raw_seconds)
            raw_stats = summarize(RAW, 1, sum(latencies), latencies)
        # 3. The copy floor, the same bytes as the first protocol moves, still server idle.
        copy_stats = copy_sizes = None
        if options.copy_seconds > 0:
            copy_sizes = sizes[protocols[0].name]
            print(f"copy floor for {options.copy_seconds:g} s", file=log)
            latencies = memcopy.time_copies(*copy_sizes, options.copy_seconds)
            copy_stats = summarize(COPY_FLOOR, 1, sum(latencies), latencies)
        # 4. The load, with the floors beside it. Objects made so far live to the end: frozen
        # out of the collector, so its passes over them do not show up in client latency.
        floor_url = None
        if options.floor_seconds > 0 and any(p.transport == "http" for p in protocols):
            floor_url = stack.enter_context(EchoServer()).url
        gc.collect()
        gc.freeze()
        print(f"load on {endpoints['http']} over {', '.join(options.protocols)}", file=log)
        try:
            rows = _run_async(_levels(protocols, endpoints, floor_url, options, log))
        finally:
            gc.unfreeze()
    return _Measured(rows, raw_stats, threads, copy_stats, copy_sizes, sizes)


def _config(options: BenchOptions) -> dict[str, Any]:
    config = {k: v for k, v in dataclasses.asdict(options).items() if k != "json"}
    config["model_repository"] = str(options.model_repository)
    config["concurrency"] = list(options.concurrency)
    config["command"] = ["ember", *sys.argv[1:]]
    return config


def execute(options: BenchOptions, out: TextIO = sys.stdout, log: TextIO = sys.stderr) -> int:
    """Run the bench; 0 when every request succeeded, 1 when some failed, 2 when it could not."""
    started = datetime.datetime.now(datetime.UTC)
    try:
        measured = _measure(options, log)
    except (BenchError, ConfigError, LoadError) as exc:
        print(f"ember bench: error: {exc}", file=log)
        return 2
    rows, raw_stats = measured.rows, measured.raw
    print(
        f"\nember bench: model {options.model} over {', '.join(options.protocols)}, "
        f"{options.duration:g} s per level after {options.warmup:g} s warm-up, "
        f"{os.cpu_count()} CPUs, torch threads {measured.threads}",
        file=out,
    )
    print(report.format_table(rows, raw_stats), file=out)
    legend = dict(report.LEGEND)
    if any(row.protocol == "grpc" for row in rows):
        legend |= report.GRPC_LEGEND
    print("\n".join(f"  {k}: {v}" for k, v in legend.items()), file=out)
    protocols = report.infer_protocols(rows)
    for protocol in protocols:
        parts = report.breakdown(rows, raw_stats, 1, protocol)
        # Named only when several protocols ran: one protocol prints as it always did.
        line = report.format_breakdown(parts, 1, protocol if len(protocols) > 1 else None)
        if line:
            print(line, file=out)
    rates = []
    if measured.copy is not None:
        rates = report.throughput(rows, measured.sizes, measured.copy, measured.copy_sizes)
        print("\n" + report.format_throughput(rates), file=out)
        print("\n".join(f"  {k}: {v}" for k, v in report.THROUGHPUT_LEGEND.items()), file=out)
    if options.json is not None:
        doc = report.document(
            config=_config(options), machine=report.machine_info(measured.threads), rows=rows,
            raw=raw_stats, now=started, copy=measured.copy, rates=rates,
        )  # fmt: skip
        Path(options.json).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 1 if any(row.errors for row in rows) else 0
