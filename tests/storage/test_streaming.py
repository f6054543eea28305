"""Safetensors weights placed into their tensors while they download from a real S3 server:
through faults and beside the node cache (the handoff from the prefetch: test_serve_s3.py)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save

from ember.server import loading
from ember.server.storage.cache import NodeCache
from ember.server.storage.download import DownloadOptions, plan_ranges
from ember.server.storage.pull import pull
from ember.server.storage.uri import parse_uri
from ember.server.weights.header import FIRST_READ
from ember.server.weights.placement import TensorPlacement

pytestmark = pytest.mark.e2e

CPU = torch.device("cpu")
SMALL = DownloadOptions(concurrency=4, chunk_size=256 * 1024)


def weights(seed: int) -> tuple[dict[str, torch.Tensor], bytes]:
    torch.manual_seed(seed)
    state = {
        "embed": torch.randn(512, 384),
        "proj": torch.randn(384, 96, dtype=torch.float16),
        "bias": torch.randn(96),
        "step": torch.tensor(7, dtype=torch.int64),
    }
    return state, save(state)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_tensors_fill_as_ranges_arrive_and_the_cache_gets_the_file(
    rclone: Any, proxy: Any, tmp_path: Path
) -> None:
    state, data = weights(seed=1)
    bucket = rclone.new_bucket()
    rclone.put(bucket, "m/w.safetensors", data)
    front = proxy(rclone)
    settings = rclone.settings(front.endpoint)
    cache = NodeCache(tmp_path / "cache")
    uri = f"s3://{bucket}/m/w.safetensors"

    result = pull(parse_uri(uri), s3=settings, options=SMALL, cache=cache,
                  place=loading._placer(CPU, uri))  # fmt: skip
    (pulled,) = result.files
    assert isinstance(pulled.placement, TensorPlacement)
    assert_same(pulled.placement.tensors, state)
    # The same bytes reached the cache, published for the next start.
    assert hashlib.sha256(pulled.path.read_bytes()).digest() == hashlib.sha256(data).digest()
    # One small GET for the header, then the object's ranges, each once.
    gets = front.gets()
    assert gets[0].range == f"bytes=0-{FIRST_READ - 1}"
    assert len(gets) == 1 + len(plan_ranges(len(data), SMALL.chunk_size))

    front.seen.clear()
    again = pull(parse_uri(uri), s3=settings, options=SMALL, cache=cache,
                 place=loading._placer(CPU, uri))  # fmt: skip
    # A hit places nothing while downloading (nothing downloads): the loader reads the file.
    assert again.files[0].placement is None and not again.files[0].downloaded
    assert front.gets() == []


def test_cut_and_refused_ranges_still_place_identical_tensors(
    rclone: Any, proxy: Any, tmp_path: Path
) -> None:
    state, data = weights(seed=2)
    bucket = rclone.new_bucket()
    rclone.put(bucket, "w.safetensors", data)
    faulted: set[int] = set()
    lock = threading.Lock()

    def decide(seen: Any) -> str | None:
        # The first request of every data range fails once, by turns cut mid-body or a 500.
        end = seen.range_end
        if seen.method != "GET" or end is None or end == FIRST_READ - 1:
            return None
        with lock:
            if end in faulted:
                return None
            faulted.add(end)
            return ("cut", "500")[len(faulted) % 2]

    front = proxy(rclone, decide=decide)
    uri = f"s3://{bucket}/w.safetensors"
    result = pull(parse_uri(uri), s3=rclone.settings(front.endpoint), options=SMALL,
                  cache=NodeCache(tmp_path / "cache"), sleep=lambda s: None,
                  place=loading._placer(CPU, uri))  # fmt: skip
    (pulled,) = result.files
    assert pulled.placement is not None and len(faulted) >= 4
    assert_same(pulled.placement.tensors, state)  # type: ignore[attr-defined]
    assert pulled.path.read_bytes() == data


def test_an_object_the_parser_refuses_downloads_without_a_placement(
    rclone: Any, tmp_path: Path
) -> None:
    bucket = rclone.new_bucket()
    data = b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}"
    rclone.put(bucket, "w.safetensors", data)
    uri = f"s3://{bucket}/w.safetensors"
    # Streaming is an optimisation: the file still reaches the cache, and loading it is left
    # to the safetensors package (which reports what is wrong with it).
    result = pull(parse_uri(uri), s3=rclone.settings(), options=SMALL,
                  cache=NodeCache(tmp_path / "cache"), place=loading._placer(CPU, uri))  # fmt: skip
    (pulled,) = result.files
    assert pulled.placement is None and pulled.path.read_bytes() == data
