"""Render the production repository for the local Triton: each ONNX model becomes a
python-backend model with the same name, versions, batching and I/O contract whose ``model.py``
runs the version's ``model.onnx`` with ONNX Runtime."""

from __future__ import annotations

import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from orchestrator.inference.local_triton.install import TritonRuntimeError
from orchestrator.inference.specs import (
    CONFIG_FILENAME,
    PREPROCESS_FILENAME,
    ModelConfigError,
    read_model_config,
    version_dirs,
)

# Instances per model in the rendered repository. One stub process per instance; on a 2-core
# machine more than one mostly adds memory.
DEFAULT_INSTANCE_COUNT = 1
# ONNX Runtime intra-op threads per model instance. One thread per instance keeps N instances
# from oversubscribing the cores; batching a study's images into one request, not ORT threads,
# gives throughput.
DEFAULT_ORT_THREADS = 1
# Name of the config.pbtxt parameter model.py reads the thread count from.
ORT_THREADS_PARAMETER = "ort_intra_op_num_threads"
MODEL_TEMPLATE = Path(__file__).with_name("model.py.tmpl")
ONNX_FILENAME = "model.onnx"

# --------------------------------------------------------------------------------------------
# render


# Written into a rendered repository so a later render may replace it wholesale, and never a
# directory it did not make.
_RENDER_MARKER = ".medtriage-rendered"


def render_repository(
    src: Path,
    dest: Path,
    *,
    instance_count: int = DEFAULT_INSTANCE_COUNT,
    ort_threads: int = DEFAULT_ORT_THREADS,
    dynamic_batching: bool = True,
) -> Path:
    """Render the production repository ``src`` as a python-backend repository at ``dest``.

    Same models, versions, max_batch_size, dynamic batching (priorities, queue policy),
    version_policy, I/O contract and label files; each version's ``model.py`` runs its
    ``model.onnx`` with ONNX Runtime on CPU. ``dest`` is replaced if an earlier render made it.
    ``dynamic_batching=False`` drops the dynamic batcher (see ``to_python_backend``).
    """
    if instance_count < 1 or ort_threads < 1:
        raise ValueError("instance_count and ort_threads must be >= 1")
    models = sorted(p for p in src.iterdir() if (p / CONFIG_FILENAME).is_file())
    if not models:
        raise ModelConfigError(src, f"no model directories with a {CONFIG_FILENAME}")
    _prepare_dest(dest)
    template = MODEL_TEMPLATE.read_text(encoding="utf-8")
    model_py = _fill_template(template)
    for model_dir in models:
        _render_model(
            model_dir,
            dest / model_dir.name,
            model_py,
            instance_count,
            ort_threads,
            dynamic_batching,
        )
    (dest / _RENDER_MARKER).write_text(str(src.resolve()))
    return dest


def _prepare_dest(dest: Path) -> None:
    if dest.exists():
        if not (dest / _RENDER_MARKER).is_file() and any(dest.iterdir()):
            raise TritonRuntimeError(
                f"{dest} exists and was not rendered by medtriage; choose an empty directory"
            )
        shutil.rmtree(dest)
    dest.mkdir(parents=True)


def _fill_template(template: str) -> str:
    values = {
        "ONNX_FILENAME": ONNX_FILENAME,
        "THREADS_PARAMETER": ORT_THREADS_PARAMETER,
        "DEFAULT_THREADS": str(DEFAULT_ORT_THREADS),
    }
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", value)
    if "{{" in template:
        raise TritonRuntimeError(f"{MODEL_TEMPLATE} has an unfilled placeholder")
    return template


def _render_model(
    src: Path,
    dest: Path,
    model_py: str,
    instance_count: int,
    ort_threads: int,
    dynamic_batching: bool = True,
) -> None:
    config_path = src / CONFIG_FILENAME
    config = read_model_config(config_path)
    versions = version_dirs(src)
    if not versions:
        raise ModelConfigError(src, "no numeric version directories to serve")
    dest.mkdir()
    for version in versions:
        onnx = src / str(version) / ONNX_FILENAME
        if not onnx.is_file():
            raise ModelConfigError(
                onnx, "missing: the python-backend rendering serves ONNX models only"
            )
        # The whole version directory, not just the graph: readers of the rendered repository
        # find the same side files (model cards, calibration references) as in production.
        version_dest = dest / str(version)
        shutil.copytree(src / str(version), version_dest)
        (version_dest / "model.py").write_text(model_py, encoding="utf-8")
    for name in _side_files(config):
        if not (src / name).is_file():
            raise ModelConfigError(src / name, "named in config.pbtxt but missing")
        shutil.copy2(src / name, dest / name)
    if (src / PREPROCESS_FILENAME).is_file():
        shutil.copy2(src / PREPROCESS_FILENAME, dest / PREPROCESS_FILENAME)
    cpu_config = to_python_backend(
        config,
        instance_count=instance_count,
        ort_threads=ort_threads,
        dynamic_batching=dynamic_batching,
    )
    (dest / CONFIG_FILENAME).write_text(
        f"# Rendered by medtriage from {config_path.resolve()}; edit that file, not this one.\n"
        + text_format.MessageToString(cpu_config),
        encoding="utf-8",
    )


def _side_files(config: mc.ModelConfig) -> list[str]:
    return sorted({o.label_filename for o in config.output if o.label_filename})


def to_python_backend(
    config: mc.ModelConfig,
    *,
    instance_count: int = DEFAULT_INSTANCE_COUNT,
    ort_threads: int = DEFAULT_ORT_THREADS,
    dynamic_batching: bool = True,
) -> mc.ModelConfig:
    """A copy of a production ``ModelConfig`` for the python backend on CPU.

    Everything that is the model's contract (name, I/O, batching, version_policy, warmup) is kept;
    only how it executes changes. ``dynamic_batching=False`` drops the dynamic batcher: on this
    backend it cost throughput at every batch size and client count measured (benchmarks/
    README.md), and requests still carry their priority (Triton accepts and ignores it).
    """
    out = mc.ModelConfig()
    out.CopyFrom(config)
    out.backend = "python"
    # platform ("onnxruntime_onnx") would select the native backend, which the wheel lacks;
    # default_model_filename would make the python backend look for a script by that name.
    out.ClearField("platform")
    out.ClearField("default_model_filename")
    # GPU-only: TensorRT/CUDA execution accelerators, CUDA graphs, pinned-memory tuning.
    out.ClearField("optimization")
    out.ClearField("instance_group")
    out.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instance_count)
    out.parameters[ORT_THREADS_PARAMETER].string_value = str(ort_threads)
    if not dynamic_batching:
        out.ClearField("dynamic_batching")
    return out
