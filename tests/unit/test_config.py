from __future__ import annotations

from pathlib import Path

import pytest

from ember.server.config import discover, load_model_config
from ember.server.errors import ConfigError

GOOD = """
name = "m"
format = "torchscript"
[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 4]
[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1, 2]
"""


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.toml").write_text(text)
    return folder


def test_good_config_reads_with_defaults(tmp_path: Path) -> None:
    config = load_model_config(write(tmp_path / "m", GOOD))
    assert (config.name, config.device, config.dtype, config.max_batch_size) == (
        "m", "auto", "float32", 0,
    )  # fmt: skip
    assert config.weights_path(tmp_path / "m") == tmp_path / "m" / "model.pt"


def test_name_defaults_to_folder_and_kserve_name_overrides(tmp_path: Path) -> None:
    folder = write(tmp_path / "folder", GOOD.replace('name = "m"\n', "", 1))
    assert load_model_config(folder).name == "folder"
    assert load_model_config(folder, "isvc").name == "isvc"


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        (('format = "torchscript"', 'fromat = "torchscript"'), "fromat", "unknown key"),
        (('datatype = "FP32"', 'datatype = "FP33"'), "inputs.0.datatype", "Input should be"),
        (("shape = [-1, 4]", "shape = [-1, 0]"), "inputs.0.shape", "-1 (variable) or positive"),
        (('format = "torchscript"', 'format = "onnx"'), "format", "Input should be"),
        (('format = "torchscript"', 'format = "safetensors"'), "(top level)", "architecture"),
        (('format = "torchscript"', 'format = "python"'), "(top level)", "class"),
        (('name = "m"', 'name = "m"\ndevice = "tpu"'), "device", "'cuda:N'"),
        (('name = "m"', 'name = "m"\nmax_batch_size = -1'), "max_batch_size", "greater than"),
        (
            (
                "shape = [-1, 2]",
                'shape = [-1, 2]\n[[outputs]]\nname = "y"\ndatatype = "FP32"\nshape = [1]',
            ),
            "(top level)",
            "unique",
        ),
        (('name = "m"', 'name = "m"\nclass = "no colon"'), "class", "module:Class"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_field(
    tmp_path: Path, change: tuple[str, str], field: str, fragment: str
) -> None:
    folder = write(tmp_path / "m", GOOD.replace(*change, 1))
    with pytest.raises(ConfigError) as info:
        load_model_config(folder)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / 'model.toml'}: {field}:")
    assert fragment in message


def test_toml_syntax_error_names_file(tmp_path: Path) -> None:
    folder = write(tmp_path / "m", GOOD + "\nthis is not toml")
    with pytest.raises(ConfigError, match=r"model\.toml: not valid TOML"):
        load_model_config(folder)


def test_discover_selects_and_rejects(tmp_path: Path) -> None:
    write(tmp_path / "a", GOOD.replace('name = "m"', 'name = "a"'))
    write(tmp_path / "b", GOOD.replace('name = "m"', 'name = "b"'))
    (tmp_path / "not-a-model").mkdir()
    assert [c.name for c, _ in discover(tmp_path)] == ["a", "b"]
    assert [c.name for c, _ in discover(tmp_path, ["b"])] == ["b"]
    with pytest.raises(ConfigError, match=r"no model named \['c'\]"):
        discover(tmp_path, ["c"])
    with pytest.raises(ConfigError, match="not a folder"):
        discover(tmp_path / "missing")


def test_duplicate_names_are_rejected(tmp_path: Path) -> None:
    write(tmp_path / "a", GOOD)
    write(tmp_path / "b", GOOD)
    with pytest.raises(ConfigError, match="several folders"):
        discover(tmp_path)


def test_storage_uri_kinds(tmp_path: Path) -> None:
    def weights(uri: str) -> Path | None:
        extra = f'name = "m"\nstorage_uri = "{uri}"'
        folder = write(tmp_path / "m", GOOD.replace('name = "m"', extra))
        return load_model_config(folder).weights_path(folder)

    assert weights("s3://b/k.pt") is None  # fetched through the node cache at load
    assert weights("https://host/k.pt") is None
    assert weights("sub/w.pt") == tmp_path / "m" / "sub" / "w.pt"
    assert weights("file:///abs/w.pt") == Path("/abs/w.pt")
    for bad, fragment in [("../../w.pt", "leaves the model folder"), ("gs://b/k", "scheme")]:
        with pytest.raises(ConfigError, match=fragment):
            weights(bad)


def test_the_example_repository_is_valid() -> None:
    root = Path(__file__).resolve().parents[2] / "models"
    names = [c.name for c, _ in discover(root)]
    assert {"mlp", "identity"} <= set(names)


def test_a_copy_does_not_keep_the_originals_cached_maps() -> None:
    from ember.server.config import ModelConfig, TensorSpec

    config = ModelConfig(
        name="m", format="torchscript",
        inputs=[TensorSpec(name="a", datatype="FP32", shape=[-1])],
        outputs=[TensorSpec(name="y", datatype="FP32", shape=[-1])],
    )  # fmt: skip
    assert list(config.request_input_specs) == ["a"] and config.required_inputs == ("a",)
    other = config.model_copy(
        update={"inputs": [TensorSpec(name="b", datatype="FP32", shape=[-1], optional=True)]}
    )
    assert list(other.request_input_specs) == ["b"] and other.required_inputs == ()
    assert list(config.request_input_specs) == ["a"]
