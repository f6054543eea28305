"""What the predictor calls at startup: remote weights or a remote model folder, through the
node cache, as local paths."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ember.server.storage.cache import NodeCache, cache_dir_from_env
from ember.server.storage.download import DownloadOptions
from ember.server.storage.pull import PlaceFactory, PullResult, pull
from ember.server.storage.settings import S3Settings
from ember.server.storage.sinks import Placement
from ember.server.storage.uri import parse_uri

REMOTE_SCHEMES = ("s3://", "http://", "https://")


def is_remote(uri: str) -> bool:
    return uri.lower().startswith(REMOTE_SCHEMES)


def _pull(uri: str, place: PlaceFactory | None = None) -> tuple[PullResult, Path]:
    root = cache_dir_from_env(os.environ)
    result = pull(
        parse_uri(uri),
        s3=S3Settings.from_env(),
        options=DownloadOptions(),
        cache=NodeCache(root),
        place=place,
    )
    return result, root


def fetch_file(uri: str, place: PlaceFactory | None = None) -> tuple[Path, str, Placement | None]:
    """One remote object: its cached file, its own name (the cache's file name is not, and
    loaders choose by suffix) and, when it was downloaded now and `place` took its bytes too,
    that placement."""
    result, _ = _pull(uri, place)
    if len(result.files) != 1:
        for pulled in result.files:
            if pulled.placement is not None:
                pulled.placement.abort()
        raise ValueError(f"{uri} names {len(result.files)} objects; storage_uri needs one file")
    pulled = result.files[0]
    return pulled.path, pulled.relative.name, pulled.placement


def fetch_folder(uri: str) -> Path:
    """A remote prefix (a KServe STORAGE_URI): a local folder of links into the cache, laid out
    as the objects are under the prefix, so model.toml and relative paths work as on disk."""
    result, root = _pull(uri)
    name = hashlib.sha256(uri.encode()).hexdigest()[:16]
    view = root / "views" / name
    for pulled in result.files:
        link = view.joinpath(*pulled.relative.parts)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            if link.resolve() == pulled.path.resolve():
                continue
            link.unlink()
        link.symlink_to(pulled.path)
    return view
