"""`ember pull` and `ember cache`: arguments, and the runs that turn them into library calls.

`ember` builds every subcommand's parser on each start, so this module imports nothing heavy:
boto3 and the downloader load when a pull runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ember.server.storage.cache import NodeCache

log = logging.getLogger("ember.storage")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def duration(text: str) -> float:
    """`90s`, `30m`, `12h`, `7d`, `2w` -> seconds."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a number with a unit (s, m, h, d, w), such as 7d, got {text!r}"
        )
    return float(match.group(1)) * _SECONDS[match.group(2)]


def size(text: str) -> int:
    """`16M`, `16MiB`, `512k`, `1G`, `2T`, `1048576` -> bytes (binary units)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 16M or 8MiB, got {text!r}")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="the node cache (default $EMBER_CACHE_DIR or ~/.cache/ember)",
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")


def add_pull_arguments(parser: argparse.ArgumentParser) -> None:
    from ember.server.storage.download import DEFAULT_CHUNK_SIZE, DEFAULT_CONCURRENCY

    parser.add_argument(
        "uri", help="s3://bucket/key, s3://bucket/prefix/, https://host/file, file:// or a path"
    )
    parser.add_argument(
        "--dest",
        type=Path,
        default=None,
        help="write into this folder (as KServe's storage initializer fills /mnt/models) "
        "instead of the node cache",
    )
    parser.add_argument(
        "--concurrency",
        type=positive,
        default=DEFAULT_CONCURRENCY,
        help=f"ranged GETs in flight (default {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument(
        "--chunk-size",
        type=size,
        default=DEFAULT_CHUNK_SIZE,
        help=f"bytes per ranged GET (default {DEFAULT_CHUNK_SIZE >> 20}M)",
    )
    _add_common(parser)


def add_cache_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cache_command", required=True)
    ls = sub.add_parser("ls", help="list the cached objects, most recently used first")
    _add_common(ls)
    prune = sub.add_parser("prune", help="remove cached objects")
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--older-than", type=duration, help="not used for this long (90s, 30m, 12h, 7d, 2w)"
    )
    which.add_argument("--all", action="store_true", help="every object not being downloaded")
    which.add_argument(
        "--max-size",
        type=size,
        help="remove the least recently used objects until the cache holds at most this "
        "(512M, 40G, 1T)",
    )
    _add_common(prune)


def _cache(args: argparse.Namespace) -> NodeCache:
    from ember.server.storage.cache import NodeCache, cache_dir_from_env

    root = args.cache_dir if args.cache_dir is not None else cache_dir_from_env(os.environ)
    return NodeCache(root)


def run_pull(args: argparse.Namespace) -> int:
    from ember.server import logs
    from ember.server.storage.download import DownloadOptions
    from ember.server.storage.errors import StorageError
    from ember.server.storage.progress import human_bytes
    from ember.server.storage.pull import pull
    from ember.server.storage.retry import RetryPolicy
    from ember.server.storage.settings import S3Settings
    from ember.server.storage.uri import parse_uri

    logs.configure(args.log_level)
    # An init container gets SIGTERM when its pod is deleted: stop like on Ctrl-C, removing the
    # partial files, rather than die mid-write (those would be cleaned up later, but not now).
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        s3 = S3Settings.from_env(os.environ)
        options = DownloadOptions(
            concurrency=args.concurrency,
            chunk_size=args.chunk_size,
            retry=RetryPolicy(attempts=s3.max_attempts),
        )
        uri = parse_uri(args.uri)
        result = pull(
            uri,
            s3=s3,
            options=options,
            cache=None if args.dest is not None else _cache(args),
            dest=args.dest,
            stream=sys.stderr,
        )
    except StorageError as exc:
        log.error(str(exc))
        return 1
    except OSError as exc:
        # The cache or destination folder: not writable, full, a file where a folder should be.
        where = f"{exc.filename}: " if exc.filename else ""
        log.error(f"{where}{exc.strerror or exc}")
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    seconds = max(result.seconds, 1e-9)
    log.info(
        "pulled %s: %d files, %s, %s downloaded in %.1f s (%s/s)",
        uri,
        len(result.files),
        human_bytes(sum(f.size for f in result.files)),
        human_bytes(result.downloaded_bytes),
        result.seconds,
        human_bytes(result.downloaded_bytes / seconds),
    )
    # stdout carries only paths, for scripts: the folder, the one file, or one line per file.
    if args.dest is not None:
        print(args.dest)
    elif len(result.files) == 1:
        print(result.files[0].path)
    else:
        for file in result.files:
            print(f"{file.relative}\t{file.path}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_cache(args: argparse.Namespace) -> int:
    from ember.server import logs
    from ember.server.storage.errors import StorageError
    from ember.server.storage.progress import human_bytes

    logs.configure(args.log_level)
    cache = _cache(args)
    try:
        if args.cache_command == "ls":
            entries = cache.entries()
            now = time.time()
            for entry in entries:
                idle = _ago(now - entry.last_used)
                print(
                    f"{human_bytes(entry.key.size):>10}  {idle:>8}  {entry.key}  "
                    f"etag={entry.key.etag}  {entry.path}"
                )
            total = sum(e.key.size for e in entries)
            print(f"{len(entries)} objects, {human_bytes(total)} in {cache.root}")
            return 0
        if args.max_size is not None:
            removed, freed = cache.shrink(args.max_size)
        else:
            removed, freed = cache.prune(None if args.all else args.older_than)
        print(f"removed {removed} objects, freed {human_bytes(freed)} in {cache.root}")
        return 0
    except (StorageError, OSError) as exc:
        log.error(str(exc))
        return 1


def _ago(seconds: float) -> str:
    for unit in ("w", "d", "h", "m"):
        if seconds >= _SECONDS[unit]:
            return f"{seconds / _SECONDS[unit]:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"
