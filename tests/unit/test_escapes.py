"""Model names and storage URIs that would reach outside the repository or the cache are refused
at config validation, before any file is opened; cache paths never come from a name at all.

Covered elsewhere: `..` in an S3 key or URI (`tests/storage/test_errors.py::test_dot_dot_*`,
`tests/unit/test_storage_uri.py::test_rejects`), `../../w.pt` as storage_uri
(`tests/unit/test_config.py::test_storage_uri_kinds`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.server.config import load_model_config
from ember.server.errors import ConfigError
from ember.server.storage.cache import CacheKey, NodeCache

TOML = """
{name}
format = "torchscript"
{storage}
[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 4]
[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1, 2]
"""


def folder_with(tmp_path: Path, name: str = 'name = "m"', storage: str = "") -> Path:
    folder = tmp_path / "repo" / "m"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.toml").write_text(TOML.format(name=name, storage=storage))
    return folder


@pytest.mark.parametrize(
    "bad", ["..", ".", "../evil", "a/b", "/etc", "a\\\\b", ".hidden", "-x", "a b", "m\\u0000"]
)
def test_model_names_that_could_be_paths_are_refused(tmp_path: Path, bad: str) -> None:
    folder = folder_with(tmp_path, f'name = "{bad}"')
    with pytest.raises(ConfigError, match="name: letters, digits"):
        load_model_config(folder)


@pytest.mark.parametrize("bad", ["..", "../evil", "a/b", "/etc/passwd"])
def test_a_kserve_model_name_flag_is_checked_the_same_way(tmp_path: Path, bad: str) -> None:
    folder = folder_with(tmp_path)
    with pytest.raises(ConfigError, match="name: letters, digits"):
        load_model_config(folder, bad)
    assert load_model_config(folder, "team.m-2").name == "team.m-2"


@pytest.mark.parametrize(
    "uri", ["/etc/passwd", "sub/../../w.pt", "./../w.pt", "sub/./../../../etc/passwd", ".."]
)
def test_storage_uris_that_leave_the_model_folder_are_refused(tmp_path: Path, uri: str) -> None:
    folder = folder_with(tmp_path, storage=f'storage_uri = "{uri}"')
    with pytest.raises(ConfigError, match="leaves the model folder"):
        load_model_config(folder).weights_path(folder)


def test_storage_uris_inside_the_folder_and_explicit_file_uris_are_kept(tmp_path: Path) -> None:
    folder = folder_with(tmp_path, storage='storage_uri = "sub/../w.pt"')
    assert load_model_config(folder).weights_path(folder) == folder / "w.pt"
    # An absolute path is allowed only when written as one: the operator's explicit choice.
    folder = folder_with(tmp_path, storage='storage_uri = "file:///models/w.pt"')
    assert load_model_config(folder).weights_path(folder) == Path("/models/w.pt")


def test_cache_paths_are_hashes_whatever_the_key_says(tmp_path: Path) -> None:
    cache = NodeCache(tmp_path / "cache")
    key = CacheKey("../../..", "../bucket", "../../etc/passwd", "../etag", 3)
    path, hit = cache.fetch(key, lambda sink: sink.write_at(0, memoryview(b"abc")))
    assert not hit and path.is_relative_to(tmp_path / "cache" / "objects")
    assert path.read_bytes() == b"abc"
    assert all(part not in ("..", "etc", "passwd") for part in path.relative_to(tmp_path).parts)
