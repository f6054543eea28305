"""Remote weights start downloading while the interpreter is still importing torch.

`ember serve` spends seconds importing torch before it can load anything (3.3 s of a 7.3 s
cold start from S3 on the benchmark machine; docs/benchmarks.md). The model repository and
the storage settings need neither torch nor numpy, so the CLI reads them first and hands
every remote object to one daemon thread that pulls it into the node cache. The loader later
asks the cache for the same object as it always does: the cache's lock makes it wait for
the download in flight, then it finds the published file. Nothing is shared between the two
but the cache itself. A failure here is silent on purpose: the loader repeats the fetch and
reports the error the usual way, once.
"""

from __future__ import annotations

import contextlib
import threading

from ember.server.config import discover
from ember.server.errors import ConfigError
from ember.server.settings import ServeSettings
from ember.server.storage import fetch


def remote_objects(settings: ServeSettings) -> list[tuple[str, str]]:
    """(kind, uri) for what the server will fetch: the model folder (`folder`) when
    --model_dir / STORAGE_URI is remote, else each model's remote `storage_uri` (`file`)."""
    if settings.model_dir is not None:
        return [("folder", settings.model_dir)] if fetch.is_remote(settings.model_dir) else []
    try:
        models = discover(settings.model_repository, list(settings.models) or None)
    except (ConfigError, OSError):
        return []  # the server reports it, with the file and the field
    return [
        ("file", config.storage_uri)
        for config, _ in models
        if config.storage_uri is not None and fetch.is_remote(config.storage_uri)
    ]


def _pull_all(objects: list[tuple[str, str]]) -> None:
    for kind, uri in objects:
        with contextlib.suppress(Exception):
            if kind == "folder":
                fetch.fetch_folder(uri)
            else:
                fetch.fetch_file(uri)


def start(settings: ServeSettings) -> threading.Thread | None:
    """Begin pulling the server's remote objects on a daemon thread; None if there are none."""
    objects = remote_objects(settings)
    if not objects:
        return None
    thread = threading.Thread(target=_pull_all, args=(objects,), name="ember-prefetch", daemon=True)
    thread.start()
    return thread
