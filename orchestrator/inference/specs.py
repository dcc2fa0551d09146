"""Read the model repository's contract: ``model_repository/<model>/config.pbtxt``.

Tensor names, dtypes and shapes are written down only in ``config.pbtxt`` (house style 7); the
rest of the code reads them from here. Parsing is Triton's own: ``google.protobuf.text_format``
into the ``ModelConfig`` message that ships with ``tritonclient``, so anything Triton would reject
as malformed fails here too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

CONFIG_FILENAME = "config.pbtxt"
PREPROCESS_FILENAME = "preprocess.json"
# The model's stated operating point (positive labels, target sensitivity), beside the config.
OPERATING_POINT_FILENAME = "operating_point.json"
# Per version: the thresholds derived for it (OOD score, operating point), beside model.onnx.
GATE_FILENAME = "gate.json"
# config.pbtxt model parameters that name an output's role (the names stay in the config).
OOD_OUTPUT_PARAMETER = "ood_output"
ATTENTION_OUTPUT_PARAMETER = "attention_output"
_TYPE_PREFIX = "TYPE_"


class ModelConfigError(Exception):
    """A model's ``config.pbtxt`` (or a file it names) is missing or invalid."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class TensorSpec:
    name: str
    # Triton's wire name ("FP32", "INT64", "BYTES"), as tritonclient's InferInput expects it.
    datatype: str
    # Without the batch dimension when the model batches (max_batch_size > 0); -1 = variable.
    dims: tuple[int, ...]
    label_filename: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    # 0 = the model does not batch: dims are the full shape.
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Class names, one per index of the first output that names a label file.
    labels: tuple[str, ...]
    # Numeric version directories present on disk, ascending.
    versions: tuple[int, ...]
    # The model's preprocess.json (how a DICOM image becomes its input); {} when absent.
    preprocess: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # 0 = no priority queues.
    priority_levels: int = 0
    default_priority_level: int = 0
    # config.pbtxt's model-level parameters (string values), e.g. the OOD output's name.
    parameters: dict[str, str] = field(default_factory=dict, hash=False, compare=False)
    # operating_point.json: positive_labels, target_sensitivity, auto_finalise_positive.
    operating_point: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # Per version: its gate.json (derived OOD and operating-point thresholds); {} when absent.
    gates: dict[int, dict[str, Any]] = field(default_factory=dict, hash=False, compare=False)

    @property
    def probs_output(self) -> str:
        """The class-probability output: the first that names a label file, else the first."""
        return next((t.name for t in self.outputs if t.label_filename), self.outputs[0].name)

    @property
    def ood_output(self) -> str | None:
        return self.parameters.get(OOD_OUTPUT_PARAMETER) or None

    @property
    def attention_output(self) -> str | None:
        return self.parameters.get(ATTENTION_OUTPUT_PARAMETER) or None

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, self.name)

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, self.name)


def _by_name(tensors: tuple[TensorSpec, ...], name: str, model: str) -> TensorSpec:
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    have = ", ".join(t.name for t in tensors)
    raise KeyError(f"model {model!r} has no tensor {name!r} (it has: {have})")


def read_model_config(path: Path) -> mc.ModelConfig:
    """Parse one ``config.pbtxt`` into Triton's ``ModelConfig`` message."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ModelConfigError(path, "no such file") from exc
    except OSError as exc:
        raise ModelConfigError(path, f"cannot read: {exc}") from exc
    config = mc.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelConfigError(path, f"not a valid ModelConfig: {exc}") from exc
    return config


def version_dirs(model_dir: Path) -> tuple[int, ...]:
    """Numeric subdirectories of a model directory: the versions Triton can load."""
    if not model_dir.is_dir():
        return ()
    return tuple(
        sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    )


def load_model_spec(repo: Path, name: str) -> ModelSpec:
    model_dir = repo / name
    path = model_dir / CONFIG_FILENAME
    config = read_model_config(path)
    # Triton takes the directory name when "name" is unset and refuses a mismatch.
    if config.name and config.name != name:
        raise ModelConfigError(path, f'name "{config.name}" does not match its directory {name!r}')
    if not config.input or not config.output:
        raise ModelConfigError(path, "needs at least one input and one output")
    inputs = tuple(_tensor_spec(t, path) for t in config.input)
    outputs = tuple(_tensor_spec(t, path) for t in config.output)
    batching = config.dynamic_batching
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    names = {t.name for t in outputs}
    for key in (OOD_OUTPUT_PARAMETER, ATTENTION_OUTPUT_PARAMETER):
        if parameters.get(key) and parameters[key] not in names:
            raise ModelConfigError(path, f"parameter {key} names no output: {parameters[key]!r}")
    return ModelSpec(
        name=name,
        max_batch_size=config.max_batch_size,
        inputs=inputs,
        outputs=outputs,
        labels=_labels(model_dir, outputs),
        versions=version_dirs(model_dir),
        preprocess=_json_object(model_dir / PREPROCESS_FILENAME),
        priority_levels=batching.priority_levels,
        default_priority_level=batching.default_priority_level,
        parameters=parameters,
        operating_point=_json_object(model_dir / OPERATING_POINT_FILENAME),
        gates={
            v: _json_object(model_dir / str(v) / GATE_FILENAME) for v in version_dirs(model_dir)
        },
    )


def load_repository(repo: Path) -> dict[str, ModelSpec]:
    """Every model of a repository: each subdirectory that holds a ``config.pbtxt``."""
    if not repo.is_dir():
        raise ModelConfigError(repo, "model repository directory does not exist")
    return {
        p.name: load_model_spec(repo, p.name)
        for p in sorted(repo.iterdir())
        if (p / CONFIG_FILENAME).is_file()
    }


def _tensor_spec(
    tensor: mc.ModelInput | mc.ModelOutput,
    path: Path,
) -> TensorSpec:
    if tensor.data_type == mc.TYPE_INVALID:
        raise ModelConfigError(path, f"tensor {tensor.name!r} has no data_type")
    if not tensor.dims:
        raise ModelConfigError(path, f"tensor {tensor.name!r} has no dims")
    type_name = mc.DataType.Name(tensor.data_type)
    # The config says TYPE_STRING, the wire says BYTES; every other type drops the prefix.
    datatype = "BYTES" if type_name == "TYPE_STRING" else type_name.removeprefix(_TYPE_PREFIX)
    label = getattr(tensor, "label_filename", "") or None
    return TensorSpec(
        name=tensor.name, datatype=datatype, dims=tuple(tensor.dims), label_filename=label
    )


def _labels(model_dir: Path, outputs: tuple[TensorSpec, ...]) -> tuple[str, ...]:
    for output in outputs:
        if output.label_filename is None:
            continue
        path = model_dir / output.label_filename
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError as exc:
            reason = f"label file of output {output.name!r} is missing"
            raise ModelConfigError(path, reason) from exc
        return tuple(line.strip() for line in lines if line.strip())
    return ()


def _json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelConfigError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelConfigError(path, "must hold a JSON object")
    return data
