from __future__ import annotations

import argparse

import pytest

from ember.server.cli import _parser
from ember.server.storage.cli import duration, size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600), ("1.5h", 5400)],
)
def test_duration(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["7", "d", "-1d", "7 days", ""])
def test_bad_duration(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


@pytest.mark.parametrize(
    ("text", "count"),
    [("16M", 16 << 20), ("16MiB", 16 << 20), ("16mb", 16 << 20), ("512k", 512 << 10),
     ("1G", 1 << 30), ("2T", 2 << 40), ("1048576", 1 << 20)],
)  # fmt: skip
def test_size(text: str, count: int) -> None:
    assert size(text) == count


@pytest.mark.parametrize("text", ["0", "M", "1.5M", "-1M", "1P"])
def test_bad_size(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        size(text)


def test_pull_and_cache_arguments() -> None:
    args = _parser().parse_args(["pull", "s3://b/k", "--dest", "/mnt/models", "--chunk-size", "8M"])
    assert (args.uri, str(args.dest), args.chunk_size) == ("s3://b/k", "/mnt/models", 8 << 20)
    args = _parser().parse_args(["cache", "prune", "--older-than", "7d"])
    assert (args.cache_command, args.older_than, args.all) == ("prune", 604800, False)
    args = _parser().parse_args(["cache", "prune", "--max-size", "40G"])
    assert (args.max_size, args.older_than, args.all) == (40 << 30, None, False)


def test_prune_needs_a_choice(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["cache", "prune"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["cache", "prune", "--all", "--older-than", "1d"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["cache", "prune", "--max-size", "1G", "--all"])
