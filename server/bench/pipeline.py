"""`ember bench --serve --model M` for a model whose requests are text (a BYTES input and a
`[pipeline]`): served sentences/s over V2 JSON against its own ceiling from the same run,
the raw in-process pipeline (tokenize + forward + pool) at the batch size the server formed.

The sentences are a fixed mix of short and long ones (seeded), one per request, so the
server's batches hold requests of different lengths and pay for padding as users' do; the
raw pipeline takes the same sentences in the same proportion.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import aiohttp
import orjson

from ember.server.bench import cpus
from ember.server.bench.errors import BenchError
from ember.server.bench.launch import ServerProcess
from ember.server.bench.options import BenchOptions
from ember.server.config import ModelConfig, discover

# Text as it comes: a few words, a sentence, a paragraph (some longer than 256 tokens, so
# truncation is part of the mix).
_TEXT = (
    "the a model server batches requests from many clients into one forward pass while "
    "others wait briefly for a free slot and engineers measure latency throughput memory "
    "and cost on their own clusters every day with dashboards alerts and careful notes about "
    "what changed between releases of the runtime and its kernels"
)
_WORDS = _TEXT.split()
LENGTHS = (3, 8, 12, 20, 40, 80, 160, 300)  # words; one sentence of each per cycle
TARGET_RATIO = 0.70
TOKENIZER = "ember.transformers.text:Tokenize"


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        words = LENGTHS[i % len(LENGTHS)]
        out.append(" ".join(rng.choice(_WORDS) for _ in range(words)))
    return out


@dataclass(frozen=True, slots=True)
class Served:
    concurrency: int
    sentences_per_s: float
    p50_ms: float
    p99_ms: float
    failed: int
    mean_batch: float  # requests per forward, from the server's statistics


@dataclass(frozen=True, slots=True)
class Raw:
    batch: int
    sentences_per_s: float


def text_input(config: ModelConfig) -> str | None:
    """The BYTES input of a model whose pipeline starts with the built-in tokenizer (the one
    kind of input this bench knows how to fill: sentences)."""
    pipeline = config.pipeline
    if pipeline is None or not pipeline.preprocess:
        return None
    if pipeline.preprocess[0].class_ != TOKENIZER:
        return None
    specs = config.request_inputs
    if len(specs) == 1 and specs[0].datatype == "BYTES":
        return specs[0].name
    return None


def _body(name: str, text: str) -> bytes:
    tensor = {"name": name, "datatype": "BYTES", "shape": [1], "data": [text]}
    return orjson.dumps({"inputs": [tensor]})


async def _load(
    url: str, bodies: Sequence[bytes], concurrency: int, seconds: float, warmup: float
) -> tuple[int, list[float], int]:
    """Closed loop: `concurrency` clients, each sending a body when its last answer is in."""
    latencies: list[float] = []
    failed = 0
    counter = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        measure_from = start + warmup
        end = measure_from + seconds

        async def client(seed: int) -> None:
            nonlocal failed, counter
            # Each client draws its next sentence at random: a fixed stride would give every
            # client one length for good and let batches sort themselves by length.
            pick = random.Random(seed)
            while (sent := time.perf_counter()) < end:
                body = bodies[pick.randrange(len(bodies))]
                async with session.post(url, data=body, headers=headers) as answer:
                    await answer.read()
                    ok = answer.status == 200
                done = time.perf_counter()
                if sent >= measure_from:
                    if ok:
                        latencies.append(done - sent)
                        counter += 1
                    else:
                        failed += 1

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    return counter, latencies, failed


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _executions(base_url: str, model: str) -> tuple[int, int]:
    import urllib.request

    with urllib.request.urlopen(f"{base_url}/v2/models/{model}/stats", timeout=10) as answer:
        doc = orjson.loads(answer.read())
    stats = doc["model_stats"][0]
    return int(stats["inference_count"]), int(stats["execution_count"])


def measure_served(
    server: ServerProcess, options: BenchOptions, name: str, bodies: Sequence[bytes], log: TextIO
) -> list[Served]:
    url = f"{server.url}/v2/models/{options.model}/infer"
    results = []
    for level in options.concurrency:
        before = _executions(server.url, options.model)
        count, latencies, failed = asyncio.run(
            _load(url, bodies, level, options.duration, options.warmup)
        )
        after = _executions(server.url, options.model)
        requests = after[0] - before[0]
        forwards = max(1, after[1] - before[1])
        served = Served(
            level, count / options.duration, 1e3 * _percentile(latencies, 0.5),
            1e3 * _percentile(latencies, 0.99), failed, requests / forwards,
        )  # fmt: skip
        print(f"  c={level}: {served.sentences_per_s:.1f} sentences/s, "
              f"{served.mean_batch:.1f} requests/forward, {failed} failed", file=log)  # fmt: skip
        results.append(served)
    return results


def measure_raw(
    repository: Path, model: str, name: str, texts: Sequence[str], sizes: Sequence[int],
    seconds: float,
) -> list[Raw]:  # fmt: skip
    """The same pipeline in this process, one batch at a time: the chain's preprocess on the
    whole batch, one forward, its postprocess; no HTTP, no queue, no event loop between."""
    import numpy as np
    import torch

    from ember.server import loading
    from ember.server.validation import model_inputs
    from ember.transformers.chain import Chain

    ((config, model_dir),) = discover(repository, [model])
    runner, _ = loading.load(config, model_dir)
    chain = Chain.load(config, model_dir)
    torch.set_num_threads(torch.get_num_threads())
    results = []
    try:
        for size in sizes:
            # Drawn as the load's clients draw theirs: the same mix of lengths per batch.
            pick = random.Random(size)
            batches = [
                np.array([pick.choice(texts).encode() for _ in range(size)], dtype=object)
                for _ in range(64)
            ]

            def once(batch: np.ndarray) -> None:
                tensors = asyncio.run(chain.preprocess({name: batch}))
                with torch.inference_mode():
                    outputs = runner.predict(model_inputs(tensors, config))
                asyncio.run(chain.postprocess({**tensors, **outputs}))

            once(batches[0])  # warm-up
            done = 0
            i = 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                once(batches[i % len(batches)])
                done += size
                i += 1
            results.append(Raw(size, done / (time.perf_counter() - start)))
    finally:
        chain.close()
    return results


def run_pipeline_bench(options: BenchOptions, config: ModelConfig, out: TextIO, log: TextIO) -> int:
    name = text_input(config)
    if name is None:
        raise BenchError(f"model '{options.model}' takes no single BYTES text input")
    if not options.serve:
        raise BenchError("a pipeline model's bench needs --serve (it measures the raw pipeline "
                         "on the server's CPUs after the server stops)")  # fmt: skip
    texts = sentences(len(LENGTHS) * 64, options.seed)
    bodies = [_body(name, t) for t in texts]
    pinning = None
    if options.serve_cpus is not None:
        pinning = (options.serve_cpus, cpus.split_cpus(cpus.allowed_cpus(), options.serve_cpus))
    env = dict(os.environ)
    server = ServerProcess(
        options.model_repository, options.model, env=env,
        cpus=None if pinning is None else pinning[0],
    )  # fmt: skip
    print(f"serving '{options.model}'"
          + ("" if pinning is None else f" on CPU(s) {cpus.format_cpu_list(pinning[0])}"),
          file=log)  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.enter_context(server)
        server.wait_ready(options.ready_timeout)
        pinned = cpus.pinned(pinning[1], pinning[0]) if pinning else contextlib.nullcontext()
        with pinned:
            served = measure_served(server, options, name, bodies, log)
    limit = config.batch_limit if config.batching else 1
    sizes = sorted({min(limit, max(1, round(s.mean_batch))) for s in served})
    print(f"raw pipeline at batch {', '.join(map(str, sizes))}, {options.raw_seconds:g} s each",
          file=log)  # fmt: skip
    pinned = cpus.pinned(pinning[0], pinning[1]) if pinning else contextlib.nullcontext()
    with pinned:
        raw = measure_raw(
            options.model_repository, options.model, name, texts, sizes,
            max(options.raw_seconds, 3.0),
        )  # fmt: skip
    code = _report(options, served, raw, out)
    if options.json is not None:
        document = {
            "model": options.model, "lengths_words": LENGTHS, "protocol": "v2-json",
            "serve_cpus": options.serve_cpus, "served": [dataclasses.asdict(s) for s in served],
            "raw": [dataclasses.asdict(r) for r in raw],
        }  # fmt: skip
        Path(options.json).write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    return code


def _report(options: BenchOptions, served: list[Served], raw: list[Raw], out: TextIO) -> int:
    by_batch = {r.batch: r for r in raw}
    limit = max(by_batch)
    print(f"\n{options.model}: sentences of {min(LENGTHS)}-{max(LENGTHS)} words, one per request, "
          "V2 JSON", file=out)  # fmt: skip
    print("| concurrency | served sentences/s | p50 ms | p99 ms | requests/forward "
          "| raw pipeline sentences/s (same batch) | served/raw |", file=out)  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|", file=out)
    failed = 0
    verdicts: list[tuple[int, float]] = []
    for s in served:
        batch = min(limit, max(1, round(s.mean_batch)))
        ceiling = by_batch[batch].sentences_per_s
        ratio = s.sentences_per_s / ceiling
        verdicts.append((s.concurrency, ratio))
        failed += s.failed
        print(f"| {s.concurrency} | {s.sentences_per_s:.1f} | {s.p50_ms:.1f} | {s.p99_ms:.1f} "
              f"| {s.mean_batch:.1f} | {ceiling:.1f} (batch {batch}) | {100 * ratio:.1f}% |",
              file=out)  # fmt: skip
    for concurrency, ratio in verdicts:
        if concurrency == 32:
            met = "met" if ratio >= TARGET_RATIO else "NOT met"
            print(f"\ntarget: served >= {100 * TARGET_RATIO:.0f}% of the raw pipeline at "
                  f"concurrency 32: {100 * ratio:.1f}% ({met})", file=out)  # fmt: skip
    return 1 if failed else 0
