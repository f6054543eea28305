"""One bench run, as a short sequence of steps: serve, load the model here, raw, load, report.

CPU sharing (the bench was written on 2 cores): nothing here computes while something else
is timed. The raw forward runs while the server is idle (after it is ready, before the load);
during the load this process only runs the client loop, and torch in it sits idle. The raw
forward and a --serve server use the same torch thread count (`options.torch_threads`), so
the two stay comparable.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import gc
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TextIO, TypeVar

import orjson

from ember.server.bench import raw, report
from ember.server.bench.echo import EchoServer
from ember.server.bench.launch import ServerProcess
from ember.server.bench.load import Stats, run_level, summarize
from ember.server.bench.options import BenchOptions, torch_threads
from ember.server.bench.protocols import PROTOCOLS, BenchError, LoadProtocol, build_inputs
from ember.server.bench.report import CLIENT_FLOOR, INFER, LIVE_FLOOR, RAW
from ember.server.config import discover
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


async def _levels(
    protocol: LoadProtocol, url: str, floor_url: str | None, options: BenchOptions, log: TextIO
) -> list[Stats]:
    rows = []
    for concurrency in options.concurrency:
        plan = [(INFER, protocol.infer(url), options.duration)]
        if floor_url is not None:
            plan[:0] = [
                (CLIENT_FLOOR, protocol.live(floor_url), options.floor_seconds),
                (LIVE_FLOOR, protocol.live(url), options.floor_seconds),
            ]
        for target, open_worker, seconds in plan:
            row = await run_level(
                target, open_worker,
                concurrency=concurrency, duration=seconds, warmup=options.warmup,
            )  # fmt: skip
            p50 = report.format_ms(row.p50_ms)
            print(
                f"  {target} c={concurrency}: {row.rps:.1f} rps, p50 {p50} ms, {row.errors} errors",
                file=log, flush=True,
            )  # fmt: skip
            rows.append(row)
    return rows


def _measure(options: BenchOptions, log: TextIO) -> tuple[list[Stats], Stats | None, int]:
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
        inputs = build_inputs(config.inputs, options.seed)
        protocol = PROTOCOLS[options.protocol](
            options.model, config.inputs, inputs, [o.name for o in config.outputs],
            options.timeout,
        )  # fmt: skip
        if server is not None:
            server.wait_ready(options.ready_timeout)
        url = server.url if server is not None else options.url
        # One checked request first: a wrong URL or model fails now, not after the raw forward.
        _run_async(protocol.check(url))
        # 2. The raw forward, with the same inputs the load sends, while the server is idle.
        raw_stats = None
        if runner is not None:
            print(f"raw forward for {options.raw_seconds:g} s, torch threads: {threads}", file=log)
            latencies = raw.time_forward(runner, inputs, options.raw_seconds)
            raw_stats = summarize(RAW, 1, sum(latencies), latencies)
        # 3. The load, with the floors beside it. Objects made so far live to the end: frozen
        # out of the collector, so its passes over them do not show up in client latency.
        floor_url = None
        if options.floor_seconds > 0:
            floor_url = stack.enter_context(EchoServer()).url
        gc.collect()
        gc.freeze()
        print(f"load on {url} over {options.protocol}", file=log)
        try:
            rows = _run_async(_levels(protocol, url, floor_url, options, log))
        finally:
            gc.unfreeze()
    return rows, raw_stats, threads


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
        rows, raw_stats, threads = _measure(options, log)
    except (BenchError, ConfigError, LoadError) as exc:
        print(f"ember bench: error: {exc}", file=log)
        return 2
    print(
        f"\nember bench: model {options.model} over {options.protocol}, "
        f"{options.duration:g} s per level after {options.warmup:g} s warm-up, "
        f"{os.cpu_count()} CPUs, torch threads {threads}",
        file=out,
    )
    print(report.format_table(rows, raw_stats), file=out)
    print("\n".join(f"  {k}: {v}" for k, v in report.LEGEND.items()), file=out)
    parts = report.format_breakdown(report.breakdown(rows, raw_stats))
    if parts:
        print(parts, file=out)
    if options.json is not None:
        doc = report.document(
            config=_config(options), machine=report.machine_info(threads), rows=rows, raw=raw_stats,
            now=started,
        )  # fmt: skip
        Path(options.json).write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 1 if any(row.errors for row in rows) else 0
