"""The copy floor: the payload's bytes copied in this process, with no protocol at all.

A round trip moves the request's tensor bytes one way and the answer's back, so one sample
is two copies: a request-sized buffer, then a response-sized one, each into a destination
allocated once (a plain memcpy through `memoryview` slice assignment; no allocation, page
faults or Python work per byte). Nothing that carries these bytes between two processes can
be faster, so it is the floor for the throughput columns.
"""

from __future__ import annotations

import time

from ember.server.bench.load import Clock

WARMUP_COPIES = 5


def _source(size: int) -> bytes:
    # Real pages with varied bytes: a zero-filled buffer may be backed by the kernel's one
    # shared zero page, which stays in cache and makes the copy look faster than it is.
    pattern = bytes(range(256))
    return (pattern * (size // len(pattern) + 1))[:size]


def time_copies(
    request_bytes: int, response_bytes: int, seconds: float, clock: Clock = time.perf_counter
) -> list[float]:
    """Latencies (seconds) of back-to-back round-trip copies for `seconds`, after a warm-up."""
    if request_bytes < 0 or response_bytes < 0:
        raise ValueError("sizes must be >= 0")
    pairs = []
    for size in (request_bytes, response_bytes):
        target = bytearray(size)
        pairs.append((memoryview(target), _source(size)))
    (request_to, request_from), (response_to, response_from) = pairs

    def round_trip() -> None:
        request_to[:] = request_from
        response_to[:] = response_from

    for _ in range(WARMUP_COPIES):
        round_trip()
    latencies = []
    end = clock() + seconds
    while True:
        sent = clock()
        round_trip()
        done = clock()
        latencies.append(done - sent)
        if done >= end:
            return latencies
