"""One bench run, as a short sequence of steps: pin, serve, check each protocol, copy floor,
load (with floors and an overload level), the same against a second server (`--compare`),
raw forwards, report; `--repeat` runs that whole sequence again and judges each target on
the median pass.

CPU sharing (the bench was written on 2 cores): nothing here computes while something else
is timed. The copy floor runs while the server is idle, before the load; during the load this
process only runs the client loop (torch in it sits idle); the raw forwards run last, with
every server stopped. With `--serve-cpus` the server runs under `taskset`, this process on the
other CPUs, and the raw forwards on the server's CPUs with the server's torch thread count, so
they are the ceiling of exactly the core the server had.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import gc
import os
import sys
import tempfile
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import orjson

from ember.server.bench import cpus, memcopy, raw, report, targets
from ember.server.bench.activator import ColdStart, format_cold_start, measure_cold_start
from ember.server.bench.echo import EchoServer
from ember.server.bench.errors import BenchError
from ember.server.bench.launch import ServerProcess
from ember.server.bench.load import (
    OpenWorker,
    OverloadStats,
    RawRate,
    Stats,
    run_level,
    run_overload_level,
    summarize,
)
from ember.server.bench.modelcopy import write_queue_copy
from ember.server.bench.observe import Probe
from ember.server.bench.options import (
    ACTIVATOR,
    COMPARE_FLAGS,
    BenchOptions,
    grpc_target,
    primary_label,
    problems,
    torch_threads,
)
from ember.server.bench.payload import Payload, build_inputs, select_inputs, select_outputs
from ember.server.bench.protocols import PROTOCOLS, LoadProtocol, retrying
from ember.server.bench.report import CLIENT_FLOOR, COPY_FLOOR, INFER, LIVE_FLOOR, RAW
from ember.server.config import ModelConfig, discover
from ember.server.errors import ConfigError
from ember.server.imports import LoadError
from ember.server.runners import Runner

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
class _Target:
    """One server the levels run against: its label in the tables and its extra flags."""

    label: str  # "" when the run has one server: the tables stay as they were
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Pinning:
    """Where each side runs (`--serve-cpus`); None: nobody is pinned."""

    server: tuple[int, ...]
    client: tuple[int, ...]


@dataclass(slots=True)
class _Measured:
    rows: list[Stats] = field(default_factory=list)
    raw: Stats | None = None
    threads: int = 0
    copy: Stats | None = None
    copy_sizes: tuple[int, int] | None = None  # (request, response) bytes the copy floor copied
    sizes: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # per protocol
    raw_rates: list[RawRate] = field(default_factory=list)
    overload: OverloadStats | None = None
    servers: list[dict[str, Any]] = field(default_factory=list)
    rows_per_request: int = 1
    max_batch: int = 1  # requests the model can take in one forward
    cold_start: ColdStart | None = None  # --compare activator


def _plan(
    protocols: Sequence[LoadProtocol],
    endpoints: dict[str, str],
    floor_url: str | None,
    options: BenchOptions,
    floors: bool,
) -> list[tuple[str, str, OpenWorker, float]]:
    """(target, protocol label, worker, seconds) of one concurrency level, in order: the
    floors of each transport in use (when `floors`), then inference over each protocol."""
    plan = []
    if floors and options.floor_seconds > 0:
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


@dataclass(frozen=True, slots=True)
class _Server:
    """The server a target's levels run against, as the probes need it."""

    label: str
    endpoints: dict[str, str]
    pid: int | None
    client_cores: int
    server_cores: int | None

    def probe(self, model: str) -> Probe:
        return Probe(
            self.endpoints["http"], model, server_pid=self.pid,
            client_cores=self.client_cores, server_cores=self.server_cores,
        )  # fmt: skip


def _name(target: str, label: str, server: str) -> str:
    return " ".join(part for part in (server, target, label) if part)


async def _levels(
    protocols: Sequence[LoadProtocol],
    server: _Server,
    floor_url: str | None,
    options: BenchOptions,
    rows_per_request: int,
    floors: bool,
    log: TextIO,
) -> list[Stats]:
    rows = []
    several = len(protocols) > 1
    for concurrency in options.concurrency:
        plan = _plan(protocols, server.endpoints, floor_url, options, floors)
        for target, label, open_worker, seconds in plan:
            probe = server.probe(options.model) if target == INFER else None
            row = await run_level(
                target, open_worker,
                concurrency=concurrency, duration=seconds, warmup=options.warmup,
                protocol=label, on_open=probe.open if probe else None,
                on_close=probe.close if probe else None,
            )  # fmt: skip
            row = dataclasses.replace(
                row, server=server.label,
                rows_per_request=rows_per_request if target == INFER else 1,
                observed=probe.result() if probe else None,
            )  # fmt: skip
            p50 = report.format_ms(row.p50_ms)
            name = _name(target, label if several else "", server.label)
            print(
                f"  {name} c={concurrency}: {row.rps:.1f} rps, p50 {p50} ms, {row.errors} errors",
                file=log, flush=True,
            )  # fmt: skip
            if row.first_error:
                print(f"    first error: {row.first_error}", file=log, flush=True)
            rows.append(row)
    return rows


async def _overload(
    protocols: Sequence[LoadProtocol],
    server: _Server,
    options: BenchOptions,
    rows_per_request: int,
    log: TextIO,
) -> OverloadStats | None:
    concurrency = options.overload_concurrency
    chosen = next((p for p in map(retrying, protocols) if p is not None), None)
    if concurrency is None or chosen is None:
        return None
    probe = server.probe(options.model)
    stats = await run_overload_level(
        chosen.overload(server.endpoints["http"]),
        concurrency=concurrency, duration=options.duration, warmup=options.warmup,
        retry_after_cap=options.retry_after_cap, protocol=chosen.name,
        on_open=probe.open, on_close=probe.close,
    )  # fmt: skip
    stats = dataclasses.replace(stats, rows_per_request=rows_per_request, observed=probe.result())
    print(
        f"  overload {chosen.name} c={concurrency}: goodput {stats.goodput:.1f} rps, "
        f"{stats.rejected} refused (429), {stats.errors} errors",
        file=log, flush=True,
    )  # fmt: skip
    if stats.first_error:
        print(f"    first error: {stats.first_error}", file=log, flush=True)
    return stats


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


def rows_per_request(config: ModelConfig, payload: Payload) -> int:
    """Rows each request carries: its batch dimension for a model that batches, else 1."""
    if config.max_batch_size <= 0 or not payload.specs:
        return 1
    first = payload.inputs[payload.specs[0].name]
    return int(first.shape[0]) if first.ndim else 1


def max_requests_per_batch(config: ModelConfig, rows: int) -> int:
    """How many such requests one forward can take (the batcher's limit); 1 without batching."""
    if config.max_batch_size <= 0:
        return 1
    limit = config.max_batch_size
    if config.batching is not None and config.batching.max_batch_size is not None:
        limit = min(limit, config.batching.max_batch_size)
    return max(1, limit // max(1, rows))


def raw_batch_sizes(
    concurrency: Sequence[int], observed_means: Sequence[float], max_batch: int
) -> list[int]:
    """Batch sizes (requests per forward) for the raw forwards: 1, each level's concurrency
    (the largest batch that level can form) and each level's observed mean rounded, all
    within what one forward can take."""
    sizes = {1} | {min(c, max_batch) for c in concurrency}
    sizes |= {min(max(1, round(m)), max_batch) for m in observed_means}
    return sorted(sizes)


def _pinning(options: BenchOptions) -> _Pinning | None:
    if options.serve_cpus is None:
        return None
    client = cpus.split_cpus(cpus.allowed_cpus(), options.serve_cpus)
    return _Pinning(server=options.serve_cpus, client=client)


def _targets(options: BenchOptions, config: ModelConfig) -> list[_Target]:
    if options.compare is None:
        return [_Target("")]
    if options.compare != ACTIVATOR and config.batching is None:
        raise BenchError(
            f"--compare {options.compare}: model '{options.model}' has no [batching] section, "
            "so both servers would be the same"
        )
    return [
        _Target(primary_label(options.compare)),
        _Target(options.compare, COMPARE_FLAGS[options.compare]),
    ]


def _serve_repository(
    options: BenchOptions, model_dir: Path, stack: contextlib.ExitStack, log: TextIO
) -> Path:
    if options.queue_size is None:
        return options.model_repository
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ember-bench-repo-")))
    write_queue_copy(model_dir, options.queue_size, folder)
    print(f"serving a copy of '{options.model}' with max_queue_size = {options.queue_size} "
          f"from {folder}", file=log)  # fmt: skip
    return folder


def _raw_forwards(
    runner: Runner,
    payload: Payload,
    sizes: Sequence[int],
    rows: int,
    seconds: float,
    pinning: _Pinning | None,
    log: TextIO,
) -> tuple[Stats, list[RawRate]]:
    """The raw forward at each batch size (on the server's CPUs when pinned): the batch-1
    row of the latency table, and rows/s at every size."""
    where = "" if pinning is None else f" on CPU(s) {cpus.format_cpu_list(pinning.server)}"
    print(f"raw forwards at batch {', '.join(map(str, sizes))}, {seconds:g} s each{where}",
          file=log)  # fmt: skip
    pinned = cpus.pinned(pinning.server, pinning.client) if pinning else contextlib.nullcontext()
    rates = []
    batch_one: list[float] = []
    with pinned:
        for size in sizes:
            latencies = raw.time_forward(runner, raw.batched(dict(payload.inputs), size), seconds)
            if size == 1:
                batch_one = latencies
            rates.append(raw.raw_rate(size, size * rows, latencies))
    return summarize(RAW, 1, sum(batch_one), batch_one), rates


def _start(
    options: BenchOptions,
    target: _Target,
    repository: Path,
    threads: int | None,
    pinning: _Pinning | None,
    stack: contextlib.ExitStack,
    log: TextIO,
) -> tuple[ServerProcess, dict[str, Any]]:
    env = dict(os.environ)
    flags = list(target.flags)
    if threads is not None:
        # Both: the flag sets torch's pool, the variable every OpenMP user in the server.
        env["OMP_NUM_THREADS"] = str(threads)
        flags += ["--torch-threads", str(threads)]
    server_cpus = pinning.server if pinning else None
    command = "serve"
    if target.label == ACTIVATOR:
        # The activator runs beside this bench (it is part of the path being measured); the
        # replica it starts gets the server's CPUs and the server's flags.
        command = "activator"
        flags = [f"--serve-arg={flag}" for flag in (*flags, "--log-level", "warning")]
        if server_cpus is not None:
            flags += ["--replica-cpus", cpus.format_cpu_list(server_cpus)]
        server_cpus = None
    server = stack.enter_context(
        ServerProcess(
            repository, options.model, env=env, extra_args=flags, cpus=server_cpus,
            command=command,
        )
    )  # fmt: skip
    label = f" ({target.label})" if target.label else ""
    print(f"started ember {command}{label} (pid {server.pid}) at {server.url}", file=log)
    server.wait_ready(options.ready_timeout)
    allowed = cpus.cpus_allowed_list(server.pid) if server.pid else None
    if server_cpus is not None and allowed != cpus.format_cpu_list(server_cpus):
        print(f"warning: the server may use CPUs {allowed}, not "
              f"{cpus.format_cpu_list(server_cpus)}", file=log)  # fmt: skip
    info = {
        "label": target.label, "flags": flags, "pid": server.pid, "url": server.url,
        "cpus_allowed": allowed, "repository": str(repository),
        "torch_threads": threads, "queue_size": options.queue_size,
    }  # fmt: skip
    return server, info


@dataclass(frozen=True, slots=True)
class _Setup:
    """What every server's levels share: the options, the protocols and where each side runs."""

    options: BenchOptions
    protocols: list[LoadProtocol]
    repository: Path  # what the servers serve (a --queue-size copy, or the original)
    threads: int | None  # torch threads of the servers (and of the raw forwards)
    pinning: _Pinning | None
    rows_per_request: int


def _one_server(
    setup: _Setup, target: _Target, first: bool, floors: contextlib.ExitStack,
    measured: _Measured, log: TextIO,
) -> None:  # fmt: skip
    """Start one server (with --serve), check each protocol against it and run its levels;
    the first also gets the copy floor, the floors and the overload level. Stops it."""
    options, protocols, pinning = setup.options, setup.protocols, setup.pinning
    with contextlib.ExitStack() as stack:
        pid = None
        if options.serve:
            server, info = _start(
                options, target, setup.repository, setup.threads, pinning, stack, log
            )
            measured.servers.append(info)
            endpoints = {"http": server.url, "grpc": server.grpc_target}
            pid = server.pid
            if target.label == ACTIVATOR:
                # The model is at zero: the first request wakes it (timed), then the probes
                # read the replica's CPU (the activator's counts among the others).
                cold = _run_async(measure_cold_start(protocols[0], endpoints, options.model))
                measured.cold_start = cold
                pid = cold.replica_pid
                info["replica_pid"] = pid
                print(f"cold start through the activator: {cold.first_response_s:.3f} s",
                      file=log)  # fmt: skip
        else:
            endpoints = {"http": options.url, "grpc": grpc_target(options.url, options.grpc_url)}
        # One checked request per protocol first: a wrong URL or model fails now, not after
        # minutes of load; the answers tell how many tensor bytes come back.
        measured.sizes = _run_async(_check_all(protocols, endpoints))
        floor_url = None
        if first:
            # The copy floor, the same bytes as the first protocol moves, server idle.
            if options.copy_seconds > 0:
                measured.copy_sizes = measured.sizes[protocols[0].name]
                print(f"copy floor for {options.copy_seconds:g} s", file=log)
                latencies = memcopy.time_copies(*measured.copy_sizes, options.copy_seconds)
                measured.copy = summarize(COPY_FLOOR, 1, sum(latencies), latencies)
            if options.floor_seconds > 0 and any(p.transport == "http" for p in protocols):
                # On the server's CPUs, so the client meets it where it meets the server.
                echo = EchoServer(pinning.server if pinning else None)
                floor_url = floors.enter_context(echo).url
        client_cores = len(pinning.client if pinning else cpus.allowed_cpus())
        server_cores = len(pinning.server) if pinning else None
        view = _Server(target.label, endpoints, pid, client_cores, server_cores)
        # Objects made so far live to the end: frozen out of the collector, so its passes
        # over them do not show up in client latency.
        gc.collect()
        gc.freeze()
        print(f"load on {endpoints['http']} over {', '.join(options.protocols)}", file=log)
        rows = setup.rows_per_request
        try:
            measured.rows += _run_async(
                _levels(protocols, view, floor_url, options, rows, first, log)
            )
            if first:
                measured.overload = _run_async(_overload(protocols, view, options, rows, log))
        finally:
            gc.unfreeze()


def _measure(options: BenchOptions, log: TextIO) -> _Measured:
    pinning = _pinning(options)
    if pinning is None:
        return _measure_on(options, pinning, log)
    home = cpus.allowed_cpus()
    cpus.pin_process(pinning.client)
    print(f"server on CPU(s) {cpus.format_cpu_list(pinning.server)}, this bench on "
          f"{cpus.format_cpu_list(pinning.client)}", file=log)  # fmt: skip
    try:
        return _measure_on(options, pinning, log)
    finally:
        # Back where it started, so the next pass (--repeat) can pin the server's CPUs again.
        cpus.pin_process(home)


def _measure_on(options: BenchOptions, pinning: _Pinning | None, log: TextIO) -> _Measured:
    measured = _Measured()
    wanted = torch_threads(
        options.torch_threads, options.serve, os.cpu_count(),
        len(pinning.server) if pinning else None,
    )  # fmt: skip
    ((config, model_dir),) = discover(options.model_repository, [options.model])
    with contextlib.ExitStack() as stack:
        repository = options.model_repository
        if options.serve:
            repository = _serve_repository(options, model_dir, stack, log)
        target_list = _targets(options, config)
        # The model here, for the raw forwards at the end: loaded now, nothing is timed yet.
        runner = None
        if options.raw_seconds > 0:
            _declared, runner = raw.load_model(options.model_repository, options.model)
        measured.threads = raw.configure_threads(wanted)
        payload = _payload(options, config)
        measured.rows_per_request = rows = rows_per_request(config, payload)
        measured.max_batch = max_requests_per_batch(config, rows)
        setup = _Setup(
            options=options,
            protocols=[PROTOCOLS[name](payload, options.timeout) for name in options.protocols],
            repository=repository, threads=wanted, pinning=pinning, rows_per_request=rows,
        )  # fmt: skip
        # The client floor's echo server lives from the first server's levels to the last's.
        with contextlib.ExitStack() as floors:
            for index, target in enumerate(target_list):
                _one_server(setup, target, index == 0, floors, measured, log)
        # Every server has stopped: the raw forwards have the server's CPUs to themselves.
        if runner is not None:
            means = [
                m for r in measured.rows
                if r.observed is not None and (m := r.observed.mean_batch) is not None
            ]  # fmt: skip
            sizes = raw_batch_sizes(options.concurrency, means, measured.max_batch)
            measured.raw, measured.raw_rates = _raw_forwards(
                runner, payload, sizes, rows, options.raw_seconds, pinning, log
            )
    return measured


def _config(options: BenchOptions) -> dict[str, Any]:
    config = {k: v for k, v in dataclasses.asdict(options).items() if k not in ("json", "plot")}
    config["model_repository"] = str(options.model_repository)
    config["concurrency"] = list(options.concurrency)
    config["serve_cpus"] = None if options.serve_cpus is None else list(options.serve_cpus)
    config["overload_concurrency"] = options.overload_concurrency
    config["command"] = ["ember", *sys.argv[1:]]
    return config


def _print_report(
    options: BenchOptions, measured: _Measured, out: TextIO
) -> list[report.Throughput]:
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
    first_server = rows[0].server if rows else ""
    primary = [r for r in rows if r.server == first_server]
    protocols = report.infer_protocols(primary)
    for protocol in protocols:
        parts = report.breakdown(primary, raw_stats, 1, protocol)
        # Named only when several protocols ran: one protocol prints as it always did.
        line = report.format_breakdown(parts, 1, protocol if len(protocols) > 1 else None)
        if line:
            print(line, file=out)
    rates = []
    if measured.copy is not None:
        rates = report.throughput(primary, measured.sizes, measured.copy, measured.copy_sizes)
        print("\n" + report.format_throughput(rates), file=out)
        print("\n".join(f"  {k}: {v}" for k, v in report.THROUGHPUT_LEGEND.items()), file=out)
    if measured.raw_rates:
        print("\n" + report.format_raw_rates(measured.raw_rates, measured.threads), file=out)
    infer = [r for r in rows if r.target == INFER]
    if measured.raw_rates or any(r.observed for r in infer):
        print("\n" + report.format_levels(infer, measured.raw_rates, measured.max_batch),
              file=out)  # fmt: skip
        print("\n".join(f"  {k}: {v}" for k, v in report.LEVELS_LEGEND.items()), file=out)
    if measured.overload is not None:
        peak = report.peak(infer, first_server, measured.overload.protocol)
        print("\n" + report.format_overload(measured.overload, peak), file=out)
    if measured.cold_start is not None:
        print("\n" + format_cold_start(measured.cold_start), file=out)
    client = report.format_client_check(report.client_headroom(rows))
    if client:
        print("\n" + client, file=out)
    return rates


@dataclass(frozen=True, slots=True)
class _Pass:
    """One whole measurement and what was made of it."""

    measured: _Measured
    started: datetime.datetime
    rates: list[report.Throughput]
    checks: list[targets.Check]


def _document(options: BenchOptions, done: _Pass) -> dict[str, Any]:
    measured, checks = done.measured, done.checks
    return report.document(
        config=_config(options), machine=report.machine_info(measured.threads),
        rows=measured.rows, raw=measured.raw, now=done.started, copy=measured.copy,
        rates=done.rates, raw_rates=measured.raw_rates, overload=measured.overload,
        servers=measured.servers, max_batch=measured.max_batch,
        cold_start=None if measured.cold_start is None
        else dataclasses.asdict(measured.cold_start),
        checks=[{**dataclasses.asdict(c), "met": c.met} for c in checks],
    )  # fmt: skip


def _summary_document(summaries: Sequence[targets.Summary]) -> list[dict[str, Any]]:
    return [
        {**dataclasses.asdict(s.median), "met": s.median.met, "median": s.median.value,
         "values": list(s.values), "passes": s.passes, "met_in": s.met_in}
        for s in summaries
    ]  # fmt: skip


def execute(options: BenchOptions, out: TextIO = sys.stdout, log: TextIO = sys.stderr) -> int:
    """Run the bench (`--repeat` times); 0 when every request succeeded, 1 when some failed,
    2 when it could not."""
    found = problems(options)
    for problem in found:
        print(f"ember bench: error: {problem}", file=log)
    if found:
        return 2
    passes: list[_Pass] = []
    for index in range(options.repeat):
        if options.repeat > 1:
            print(f"\n=== pass {index + 1} of {options.repeat} ===", file=out)
            print(f"pass {index + 1} of {options.repeat}", file=log)
        started = datetime.datetime.now(datetime.UTC)
        try:
            measured = _measure(options, log)
        except (BenchError, ConfigError, LoadError) as exc:
            print(f"ember bench: error: {exc}", file=log)
            return 2
        rates = _print_report(options, measured, out)
        checks = targets.evaluate(
            measured.rows, measured.raw_rates, measured.overload, measured.max_batch,
            cold_start=measured.cold_start,
        )  # fmt: skip
        if checks:
            print("\n" + targets.format_checks(checks), file=out)
        passes.append(_Pass(measured, started, rates, checks))
    summaries = targets.summarize([p.checks for p in passes]) if options.repeat > 1 else []
    if summaries:
        print("\n" + targets.format_summary(summaries), file=out)
    if options.json is not None:
        doc: dict[str, Any] = _document(options, passes[0])
        if options.repeat > 1:
            doc = {
                "config": doc["config"],
                "passes": [_document(options, p) for p in passes],
                "summary": _summary_document(summaries),
            }
        Path(options.json).write_bytes(
            orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS)
        )
    last = passes[-1].measured
    if options.plot is not None:
        from ember.server.bench.plot import write_plot  # matplotlib only when asked for

        try:
            write_plot(options.plot, last.rows, last.raw_rates, last.overload,
                       title=f"{options.model}: rows/s and p99 against concurrency")  # fmt: skip
        except BenchError as exc:
            print(f"ember bench: error: {exc}", file=log)
            return 2
    failed = False
    for done in passes:
        failed |= any(row.errors for row in done.measured.rows)
        failed |= done.measured.overload is not None and done.measured.overload.errors > 0
    return 1 if failed else 0
