"""The garbage collector's settings in a serving process.

The HTTP request path makes no reference cycles (tests/unit/test_http_protocol.py holds it
to that), so once the models are loaded the collector only ever finds the objects of
requests still in flight. At Python's default young threshold of 700 it ran once per ~40
requests at c=32, with a full collection several times a second over the ~200,000 objects
torch and the models leave on the heap: about 7% of the event loop's samples (py-spy,
docs/benchmarks.md). At 10,000 it runs once per several hundred requests, and cycles made
elsewhere still go within a few hundred: grpc keeps each aborted call's traceback in
cycles (about 30 objects, which rpc/server.py keeps from holding the request; a unit test
checks it), and model code may make its own.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000


def quiet() -> None:
    """Once the models are loaded: freeze what is on the heap (full collections no longer
    walk it) and let the young generation grow larger before a collection.

    Only the young generations are collected first (under a millisecond): a full
    collection takes 60-120 ms over torch's heap, on the way to ready, and finds a few
    dozen objects. What the load left in cycles is freed by `collect_all`, on unload.
    """
    gc.collect(1)
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)


def collect_all() -> None:
    """A full collection that also sees what `quiet` froze (a model is being unloaded: its
    weights may sit in cycles among the frozen objects), then the heap frozen again."""
    frozen = gc.get_freeze_count() > 0
    gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()
