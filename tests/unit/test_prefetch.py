"""Which remote objects `ember serve` starts pulling before torch is imported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path, PurePosixPath

from ember.server.prefetch import remote_objects
from ember.server.settings import ServeSettings

MODEL = """
name = "{name}"
format = "safetensors"
architecture = "arch:Tiny"
{uri}
[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 4]
[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1, 3]
"""


def repository(root: Path, **uris: str | None) -> Path:
    for name, uri in uris.items():
        (root / name).mkdir(parents=True)
        line = f'storage_uri = "{uri}"' if uri else ""
        (root / name / "model.toml").write_text(MODEL.format(name=name, uri=line))
    return root


def test_each_remote_storage_uri_of_the_served_models(tmp_path: Path) -> None:
    repo = repository(tmp_path, a="s3://b/a.safetensors", b="weights.safetensors",
                      c="https://host/c.safetensors", d=None)  # fmt: skip
    settings = ServeSettings(model_repository=repo)
    assert remote_objects(settings) == [
        ("file", "s3://b/a.safetensors"), ("file", "https://host/c.safetensors"),
    ]  # fmt: skip
    only = ServeSettings(model_repository=repo, models=("b", "c"))
    assert remote_objects(only) == [("file", "https://host/c.safetensors")]


def test_a_remote_model_dir_is_one_folder_and_a_local_one_nothing(tmp_path: Path) -> None:
    assert remote_objects(ServeSettings(model_dir="s3://b/isvc/")) == [("folder", "s3://b/isvc/")]
    assert remote_objects(ServeSettings(model_dir=str(tmp_path))) == []


def test_a_bad_repository_prefetches_nothing_and_raises_nothing(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.toml").write_text("name = [")
    assert remote_objects(ServeSettings(model_repository=tmp_path)) == []
    assert remote_objects(ServeSettings(model_repository=tmp_path / "missing")) == []


def test_deciding_what_to_prefetch_imports_neither_torch_nor_numpy() -> None:
    code = (
        "import sys; import ember.server.prefetch, ember.server.settings; "
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)  # fmt: skip
    assert done.stdout.strip() == "[]"


def test_headers_are_read_ahead_only_for_weights_that_may_stream(tmp_path: Path) -> None:
    from ember.server.prefetch import streamed_uris

    repo = repository(tmp_path, a="s3://b/a.safetensors", c="https://host/c.safetensors")
    toml = repo / "c" / "model.toml"
    toml.write_text('device = "cpu"\n' + toml.read_text())
    settings = ServeSettings(model_repository=repo)
    # `a` runs on device "auto" (CUDA, if there is one), `c` on the CPU.
    assert streamed_uris(settings, {}) == {"s3://b/a.safetensors"}
    assert streamed_uris(settings, {"EMBER_STREAM_WEIGHTS": "always"}) == {
        "s3://b/a.safetensors", "https://host/c.safetensors",
    }  # fmt: skip
    assert streamed_uris(settings, {"EMBER_STREAM_WEIGHTS": "never"}) == set()
    assert streamed_uris(settings, {"EMBER_STREAM_WEIGHTS": "bogus"}) == set()
    assert streamed_uris(ServeSettings(model_dir="s3://b/isvc/"), {}) == set()


def test_a_uri_claimed_before_its_header_arrived_gets_no_handoff(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save

    from ember.server.prefetch import Prefetch
    from ember.server.storage.sinks import FileSink

    data = save({"w": torch.zeros(4)})
    prefetch = Prefetch([("file", "s3://b/w.safetensors")])
    with FileSink.create(tmp_path / "partial", len(data)) as sink:

        def read(byte_range: object) -> bytes:
            return data[byte_range.start : byte_range.end]  # type: ignore[attr-defined]

        args = (PurePosixPath("w.safetensors"), len(data), read, sink)
        # The loader came first: it fetches itself, and no handoff is left behind.
        assert prefetch.claim("s3://b/w.safetensors") is None
        assert prefetch._handoff("s3://b/w.safetensors", *args) is None
        # Another object, not claimed yet: its handoff waits for the loader.
        handoff = prefetch._handoff("s3://b/v.safetensors", *args)
        assert handoff is not None and prefetch.claim("s3://b/v.safetensors") is handoff
        handoff.release()
