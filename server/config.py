"""model.toml: the schema of one model's declaration, and reading it with one-line errors."""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ember.server.errors import ConfigError

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "BF16", "FP32", "FP64", "BYTES",
]  # fmt: skip

Format = Literal["torchscript", "torch_export", "safetensors", "python"]

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

# Where the weights are looked for when `storage_uri` is not given.
DEFAULT_WEIGHTS = {
    "torchscript": "model.pt",
    "torch_export": "model.pt2",
    "safetensors": "model.safetensors",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: Annotated[str, Field(min_length=1)]
    datatype: Datatype
    # -1 marks a variable dimension.
    shape: list[int]
    optional: bool = False
    # Inputs: requests that differ in the one variable non-batch dimension may share a batch,
    # padded with this value to the longest.
    pad_value: float | int | bool | None = None
    # Outputs: cut the variable non-batch dimension back to each request's own length.
    unpad: bool = False

    def variable_dim(self) -> int | None:
        """The one variable dimension after the batch dimension, if there is exactly one."""
        dims = [i for i, d in enumerate(self.shape) if i > 0 and d == -1]
        return dims[0] if len(dims) == 1 else None

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: list[int]) -> list[int]:
        for dim in shape:
            if dim < -1 or dim == 0:
                raise ValueError(f"each dimension must be -1 (variable) or positive, got {dim}")
        return shape


class BatchingConfig(_Strict):
    """Triton's dynamic batcher settings, with its names where it has them."""

    # Rows per batch; defaults to the model's max_batch_size.
    max_batch_size: Annotated[int, Field(ge=1)] | None = None
    max_queue_delay_us: Annotated[int, Field(ge=0)] = 0
    preferred_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    # Requests waiting beyond this are refused at once (429 / RESOURCE_EXHAUSTED); 0 = no limit.
    max_queue_size: Annotated[int, Field(ge=0)] = 0
    # A request not started this long after it arrived is answered 504 and never run; 0 = none.
    default_timeout_us: Annotated[int, Field(ge=0)] = 0
    # A request's own timeout may only shorten the default (Triton's allow_timeout_override).
    allow_timeout_override: bool = True
    # 0 = no priorities; else requests carry priority 1 (highest) .. priority_levels.
    priority_levels: Annotated[int, Field(ge=0)] = 0
    default_priority_level: Annotated[int, Field(ge=0)] = 0


class ScalingConfig(_Strict):
    """model.toml `[scaling]`: read by the activator only (the predictor ignores it). A key left
    out takes the activator's default (its flags, which default to Knative's values)."""

    min_replicas: Annotated[int, Field(ge=0)] | None = None
    # 0 = no limit.
    max_replicas: Annotated[int, Field(ge=0)] | None = None
    # Requests one replica may hold at once; 0 = no limit.
    container_concurrency: Annotated[int, Field(ge=0)] | None = None
    target_concurrency: Annotated[float, Field(gt=0)] | None = None
    target_utilization: Annotated[float, Field(gt=0, le=1)] | None = None
    stable_window_s: Annotated[float, Field(ge=6, le=3600)] | None = None
    panic_window_pct: Annotated[float, Field(ge=1, le=100)] | None = None
    panic_threshold_pct: Annotated[float, Field(gt=100, le=1000)] | None = None
    max_scale_up_rate: Annotated[float, Field(gt=1)] | None = None
    max_scale_down_rate: Annotated[float, Field(gt=1)] | None = None
    scale_to_zero_grace_s: Annotated[float, Field(ge=0)] | None = None
    activation_timeout_s: Annotated[float, Field(gt=0)] | None = None
    queue_depth: Annotated[int, Field(ge=1)] | None = None


class StepConfig(_Strict):
    """One step of `[pipeline]`: a class implementing ember.transformers.step.Step."""

    class_: str = Field(alias="class")
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("class_")
    @classmethod
    def _import_path(cls, value: str) -> str:
        if not _IMPORT_PATH.match(value):
            raise ValueError("expected 'module:Class'")
        return value


class PipelineConfig(_Strict):
    """model.toml `[pipeline]`: what clients send and get back (declared here, as a Triton
    ensemble declares its own inputs and outputs), and the steps between that and the model's
    own tensors. The steps' declarations are checked against these when the model loads."""

    inputs: Annotated[list[TensorSpec], Field(min_length=1)]
    outputs: Annotated[list[TensorSpec], Field(min_length=1)]
    preprocess: list[StepConfig] = Field(default_factory=list)
    postprocess: list[StepConfig] = Field(default_factory=list)
    # Threads that run the model's synchronous steps; default: the CPUs this process may use,
    # at most 4.
    workers: Annotated[int, Field(ge=1, le=64)] | None = None


class ModelConfig(_Strict):
    name: str
    format: Format
    version: str = "1"
    storage_uri: str | None = None
    architecture: str | None = None
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    class_: str | None = Field(default=None, alias="class")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    inputs: Annotated[list[TensorSpec], Field(min_length=1)]
    outputs: Annotated[list[TensorSpec], Field(min_length=1)]
    # One device, or a list: instances are placed on each, batches go to the least loaded.
    device: str | Annotated[list[str], Field(min_length=1)] = "auto"
    instances: Annotated[int, Field(ge=1, le=64)] = 1  # per device
    batching: BatchingConfig | None = None
    # torch.compile the module (dynamic shapes, so batches of any size reuse one graph). Needs
    # a C++ compiler where the server runs; the first forward (the warm-up) compiles.
    compile: bool = False
    # Capture the forward as one CUDA graph per batch size in `cuda_graph_batch_sizes`
    # (default: powers of two up to the batch limit, and the limit); a batch is padded to the
    # next captured size and run by replaying its graph. Ignored on the CPU.
    cuda_graphs: bool = False
    cuda_graph_batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    max_batch_size: Annotated[int, Field(ge=0)] = 0
    scaling: ScalingConfig | None = None
    # Pre/post-processing around the model; `ember serve --no-pipeline` leaves it out (the
    # chain then runs in a separate `ember transformer`).
    pipeline: PipelineConfig | None = None

    @property
    def request_inputs(self) -> list[TensorSpec]:
        """The inputs clients send: the pipeline's when there is one, else the model's."""
        return self.pipeline.inputs if self.pipeline else self.inputs

    @property
    def request_outputs(self) -> list[TensorSpec]:
        return self.pipeline.outputs if self.pipeline else self.outputs

    # By name, built once per config (it is frozen): validation looks up every request's
    # tensors here.
    @functools.cached_property
    def request_input_specs(self) -> dict[str, TensorSpec]:
        return {s.name: s for s in self.request_inputs}

    @functools.cached_property
    def request_output_specs(self) -> dict[str, TensorSpec]:
        return {s.name: s for s in self.request_outputs}

    @functools.cached_property
    def required_inputs(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.request_inputs if not s.optional)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        # pydantic copies the instance's __dict__, cached properties included: a copy with
        # another pipeline or other inputs must not keep the original's maps.
        copy = super().model_copy(update=update, deep=deep)
        for name, attribute in vars(ModelConfig).items():
            if isinstance(attribute, functools.cached_property):
                copy.__dict__.pop(name, None)
        return copy

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(
                "letters, digits, '_', '.' and '-' only, starting with a letter or digit"
            )
        return name

    @field_validator("device")
    @classmethod
    def _device(cls, device: str | list[str]) -> str | list[str]:
        for one in [device] if isinstance(device, str) else device:
            if not _DEVICE.match(one):
                raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {one!r}")
        return device

    @property
    def devices(self) -> list[str]:
        return [self.device] if isinstance(self.device, str) else list(self.device)

    @field_validator("architecture", "class_")
    @classmethod
    def _import_path(cls, value: str | None) -> str | None:
        if value is not None and not _IMPORT_PATH.match(value):
            raise ValueError("expected 'module:Class'")
        return value

    @model_validator(mode="after")
    def _per_format(self) -> ModelConfig:
        if self.format == "safetensors" and self.architecture is None:
            raise ValueError("format 'safetensors' needs architecture = 'module:Class'")
        if self.format == "python" and self.class_ is None:
            raise ValueError("format 'python' needs class = 'module:Class'")
        pipeline = self.pipeline
        for kind, specs in (
            ("inputs", self.inputs), ("outputs", self.outputs),
            ("pipeline.inputs", pipeline.inputs if pipeline else []),
            ("pipeline.outputs", pipeline.outputs if pipeline else []),
        ):  # fmt: skip
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names must be unique, got {names}")
        self._check_batching()
        if self.compile and self.format not in ("safetensors", "torch_export"):
            raise ValueError("compile = true needs format 'safetensors' or 'torch_export'")
        self._check_cuda_graphs()
        if self.format != "python":
            bytes_specs = [s.name for s in (*self.inputs, *self.outputs) if s.datatype == "BYTES"]
            if bytes_specs:
                raise ValueError(f"torch models cannot take or return BYTES ({bytes_specs})")
        return self

    def _check_batching(self) -> None:
        for spec in self.inputs:
            if spec.pad_value is not None and spec.variable_dim() is None:
                raise ValueError(
                    f"input '{spec.name}': pad_value needs exactly one variable (-1) dimension "
                    f"after the batch dimension, shape is {spec.shape}"
                )
        for spec in self.outputs:
            if spec.unpad and spec.variable_dim() is None:
                raise ValueError(
                    f"output '{spec.name}': unpad needs exactly one variable (-1) dimension "
                    f"after the batch dimension, shape is {spec.shape}"
                )
        batching = self.batching
        if batching is None:
            return
        if self.max_batch_size == 0:
            raise ValueError("[batching] needs max_batch_size > 0 (the first dimension is rows)")
        for spec in self.inputs:
            if not spec.shape or spec.shape[0] != -1:
                raise ValueError(
                    f"[batching] needs every input's first dimension to be -1, "
                    f"input '{spec.name}' has shape {spec.shape}"
                )
        limit = self.batch_limit
        too_big = [n for n in batching.preferred_batch_sizes if n > limit]
        if too_big:
            raise ValueError(f"preferred_batch_sizes {too_big} exceed max_batch_size {limit}")
        if batching.max_batch_size is not None and batching.max_batch_size > self.max_batch_size:
            raise ValueError(
                f"[batching] max_batch_size {batching.max_batch_size} exceeds the model's "
                f"max_batch_size {self.max_batch_size}"
            )
        if batching.default_priority_level > batching.priority_levels:
            raise ValueError(
                f"default_priority_level {batching.default_priority_level} is above "
                f"priority_levels {batching.priority_levels}"
            )

    def _check_cuda_graphs(self) -> None:
        if self.cuda_graph_batch_sizes and not self.cuda_graphs:
            raise ValueError("cuda_graph_batch_sizes needs cuda_graphs = true")
        if not self.cuda_graphs:
            return
        if self.format == "python":
            raise ValueError("cuda_graphs = true needs a torch format, not 'python'")
        if self.compile:
            raise ValueError("cuda_graphs = true and compile = true cannot be combined")
        for spec in self.inputs:
            fixed = spec.shape[1:] if self.max_batch_size else spec.shape
            if -1 in fixed:
                raise ValueError(
                    f"cuda_graphs = true needs fixed input shapes apart from the batch "
                    f"dimension, input '{spec.name}' has shape {spec.shape}"
                )
        if self.cuda_graph_batch_sizes and not self.max_batch_size:
            raise ValueError("cuda_graph_batch_sizes needs max_batch_size > 0")
        too_big = [n for n in self.cuda_graph_batch_sizes if n > self.batch_limit]
        if too_big:
            raise ValueError(
                f"cuda_graph_batch_sizes {too_big} exceed the batch limit {self.batch_limit}"
            )

    @property
    def graph_batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes captured as CUDA graphs, ascending; () for a model that does not
        batch (its one fixed shape is captured)."""
        if not self.max_batch_size:
            return ()
        if self.cuda_graph_batch_sizes:
            return tuple(sorted(set(self.cuda_graph_batch_sizes)))
        limit = self.batch_limit
        sizes = {1 << i for i in range(limit.bit_length()) if 1 << i < limit}
        return tuple(sorted(sizes | {limit}))

    @property
    def batch_limit(self) -> int:
        """Rows per batch when batching."""
        configured = self.batching.max_batch_size if self.batching else None
        return configured or self.max_batch_size

    def weights_path(self, model_dir: Path) -> Path | None:
        """The local weights file; None for python models without storage and for remote
        storage URIs."""
        if self.storage_uri is None:
            default = DEFAULT_WEIGHTS.get(self.format)
            return None if default is None else model_dir / default
        uri = self.storage_uri
        if uri.startswith("file://"):
            return Path(uri.removeprefix("file://"))
        if uri.lower().startswith(("s3://", "http://", "https://")):
            return None  # fetched through the node cache when the model loads
        if "://" in uri:
            raise ConfigError(
                f"{model_dir / 'model.toml'}: storage_uri: scheme of '{uri}' is not supported "
                "(a relative path, file://, s3:// or https://)"
            )
        # Checked on the path as written, not resolved: a model folder of links (a cached
        # copy of a remote folder) points outside itself by design.
        folder = Path(os.path.normpath(model_dir.absolute()))
        path = Path(os.path.normpath(folder / uri))
        if not path.is_relative_to(folder):
            raise ConfigError(
                f"{model_dir / 'model.toml'}: storage_uri: '{uri}' leaves the model folder "
                "(use file:// for an absolute path)"
            )
        return path


def _describe(error: ValidationError, file: Path) -> str:
    # A typo shows up as an unknown key plus a missing one: the unknown key is the useful half.
    first = min(error.errors(), key=lambda e: e["type"] != "extra_forbidden")
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    where = where.replace("class_", "class")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    extra = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{file}: {where}: {message}{extra}"


def load_model_config(model_dir: Path, name: str | None = None) -> ModelConfig:
    """Read `model_dir/model.toml`. `name` (a KServe --model_name) overrides the file's name."""
    file = model_dir / "model.toml"
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except ValueError as exc:
        # TOMLDecodeError and UnicodeDecodeError, and the ValueError tomllib lets through for
        # an integer of more digits than int() converts.
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables by recursion.
        raise ConfigError(f"{file}: not valid TOML: arrays or tables nested too deeply") from None
    raw.setdefault("name", model_dir.name)
    if name is not None:
        raw["name"] = name
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, file)) from None


def discover(repository: Path, only: list[str] | None = None) -> list[tuple[ModelConfig, Path]]:
    """Every model folder under `repository` (a folder holding model.toml), validated."""
    if not repository.is_dir():
        raise ConfigError(f"{repository}: model repository is not a folder")
    found = []
    for model_dir in sorted(p for p in repository.iterdir() if (p / "model.toml").is_file()):
        config = load_model_config(model_dir)
        found.append((config, model_dir))
    names = [c.name for c, _ in found]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{repository}: several folders declare the model name(s) {duplicates}")
    if only:
        missing = [n for n in only if n not in names]
        if missing:
            raise ConfigError(f"{repository}: no model named {missing} (found {names})")
        found = [(c, d) for c, d in found if c.name in only]
    if not found:
        raise ConfigError(f"{repository}: no model folders (each needs a model.toml)")
    return found
