"""Remote weights start downloading while the interpreter is still importing torch.

`ember serve` spends seconds importing torch before it can load anything (3.3 s of a 7.3 s
cold start from S3 on the benchmark machine; docs/benchmarks.md). The model repository and
the storage settings need neither torch nor numpy, so the CLI reads them first and hands
every remote object to one daemon thread that pulls it into the node cache. The loader later
asks the cache for the same object as it always does: the cache's lock makes it wait for
the download in flight, then it finds the published file. A safetensors file being
downloaded also gets a `Handoff`: a loader that places tensors onto a device claims it and
takes the bytes written so far and the rest as they arrive, instead of waiting for the end.
A failure here is silent on purpose: the loader repeats the fetch and reports the error the
usual way, once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from pathlib import PurePosixPath

from ember.server.config import ModelConfig, discover
from ember.server.errors import ConfigError
from ember.server.imports import LoadError
from ember.server.settings import ServeSettings
from ember.server.storage import fetch
from ember.server.storage.download import ByteRange
from ember.server.storage.pull import ReadRange
from ember.server.storage.sinks import FileSink
from ember.server.weights.handoff import Handoff
from ember.server.weights.header import HeaderError, read_header
from ember.server.weights.mode import may_stream, stream_mode


def _remote_models(settings: ServeSettings) -> list[ModelConfig]:
    try:
        models = discover(settings.model_repository, list(settings.models) or None)
    except (ConfigError, OSError):
        return []  # the server reports it, with the file and the field
    return [
        config
        for config, _ in models
        if config.storage_uri is not None and fetch.is_remote(config.storage_uri)
    ]


def remote_objects(settings: ServeSettings) -> list[tuple[str, str]]:
    """(kind, uri) for what the server will fetch: the model folder (`folder`) when
    --model_dir / STORAGE_URI is remote, else each model's remote `storage_uri` (`file`)."""
    if settings.model_dir is not None:
        return [("folder", settings.model_dir)] if fetch.is_remote(settings.model_dir) else []
    return [
        ("file", config.storage_uri) for config in _remote_models(settings) if config.storage_uri
    ]


def streamed_uris(settings: ServeSettings, env: Mapping[str, str]) -> set[str]:
    """The remote weights a loader may place onto a device as they arrive: the prefetch
    reads their headers and keeps a handoff for them (a CPU model under `auto` gets none)."""
    if settings.model_dir is not None:
        return set()
    try:
        mode = stream_mode(env)
    except LoadError:
        return set()  # the loader reports it
    return {
        config.storage_uri
        for config in _remote_models(settings)
        if config.storage_uri
        and config.format == "safetensors"
        and may_stream(mode, config.devices)
    }


class Prefetch:
    """The pulls started before the import of torch, and their handoffs until claimed."""

    def __init__(self, objects: list[tuple[str, str]], streamed: set[str] | None = None) -> None:
        self.objects = objects
        # None: every safetensors object gets a handoff.
        self._streamed = streamed
        self._handoffs: dict[str, Handoff] = {}
        self._claimed: set[str] = set()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._pull_all, name="ember-prefetch", daemon=True)

    def claim(self, uri: str) -> Handoff | None:
        """The handoff of `uri`'s download, once (None: no download of it started here, or it
        is not safetensors). Whoever claims it must attach or release it."""
        with self._lock:
            # A download that has not reached its header yet gets no handoff any more: the
            # loader is already fetching (and waits at the cache's lock).
            self._claimed.add(uri)
            return self._handoffs.pop(uri, None)

    def _pull_all(self) -> None:
        for kind, uri in self.objects:
            with contextlib.suppress(Exception):
                if kind == "folder":
                    fetch.fetch_folder(uri)
                elif self._streamed is None or uri in self._streamed:
                    fetch.fetch_file(uri, place=lambda *args, uri=uri: self._handoff(uri, *args))
                else:
                    fetch.fetch_file(uri)

    def _handoff(
        self, uri: str, relative: PurePosixPath, size: int, read: ReadRange, file: FileSink
    ) -> Handoff | None:
        if relative.suffix != ".safetensors":
            return None
        try:
            header = read_header(size, lambda start, end: read(ByteRange(start, end)))
        except HeaderError:
            return None  # the loader reports it when it opens the file
        with self._lock:
            if uri in self._claimed:
                return None
            handoff = Handoff(header, file)
            self._handoffs[uri] = handoff
        return handoff


def start(settings: ServeSettings) -> Prefetch | None:
    """Begin pulling the server's remote objects on a daemon thread; None if there are none."""
    objects = remote_objects(settings)
    if not objects:
        return None
    prefetch = Prefetch(objects, streamed_uris(settings, os.environ))
    prefetch.thread.start()
    return prefetch
