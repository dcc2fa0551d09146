"""The local Triton runtime against the REAL bundled tritonserver binary.

A tiny production-form repository (backend onnxruntime, KIND_GPU, TensorRT accelerator) with two
versions that compute different things is rendered for the python backend and served; every
answer is compared with ONNX Runtime run in this process on the same input. The real
model_repository (trained triage/analysis models) is rendered and checked the same way; a missing
model.onnx there is an error, never a skip.
"""

from __future__ import annotations

import functools
import os
import queue
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from orchestrator.inference.local_triton.install import (
    TritonRuntimeError,
    install_runtime,
    stub_site_dir,
)
from orchestrator.inference.local_triton.process import TritonProcess, default_home, server_env
from orchestrator.inference.local_triton.render import (
    ORT_THREADS_PARAMETER,
    render_repository,
    to_python_backend,
)
from orchestrator.inference.specs import ModelConfigError, load_model_spec, read_model_config

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[3]
MODEL = "toy"
# Float32 through the same ORT kernels on both sides; only summation order may differ.
RTOL = 1e-5
ATOL = 1e-6
# Every Triton call in a test passes a client timeout (house style 14).
CLIENT_TIMEOUT_S = 30.0
BATCH = 5
# A completed install is one marker read; anything near pip's runtime means it reinstalled.
NOOP_INSTALL_S = 1.0

# A production-form config: what render_repository must turn into a CPU python-backend model
# without changing the contract. The ONNX graph's names ("input.1", "out0", "out1") differ from
# these on purpose: the rendered model maps them by position.
TOY_CONFIG = """
name: "toy"
backend: "onnxruntime"
max_batch_size: 8
version_policy: { all { } }
input [ { name: "image" data_type: TYPE_FP32 dims: [ 1, 28, 28 ] } ]
output [
  { name: "probs" data_type: TYPE_FP32 dims: [ 2 ] label_filename: "labels.txt" },
  { name: "heatmap" data_type: TYPE_FP32 dims: [ 7, 7 ] }
]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 2000
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy {
    timeout_action: REJECT
    default_timeout_microseconds: 30000000
    allow_timeout_override: true
    max_queue_size: 64
  }
}
instance_group [ { kind: KIND_GPU count: 1 } ]
optimization { execution_accelerators {
  gpu_execution_accelerator : [ { name : "tensorrt" } ]
} }
"""


def _toy_onnx(seed: int, heat_scale: float) -> onnx.ModelProto:
    """image [B,1,28,28] -> softmax(flatten(image) @ W + b) [B,2], scale * avgpool4x4 [B,7,7]."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 0.05, (784, 2)).astype(np.float32)
    bias = rng.normal(0, 0.1, (2,)).astype(np.float32)
    inits = [
        helper.make_tensor("W", TensorProto.FLOAT, weights.shape, weights.ravel()),
        helper.make_tensor("b", TensorProto.FLOAT, bias.shape, bias),
        helper.make_tensor("scale", TensorProto.FLOAT, [], [heat_scale]),
        helper.make_tensor("shape", TensorProto.INT64, [3], [-1, 7, 7]),
    ]
    nodes = [
        helper.make_node("Flatten", ["input.1"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["logits0"]),
        helper.make_node("Add", ["logits0", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["out0"], axis=1),
        helper.make_node("AveragePool", ["input.1"], ["pool"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Reshape", ["pool", "shape"], ["pooled"]),
        helper.make_node("Mul", ["pooled", "scale"], ["out1"]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["B", 1, 28, 28])],
        [
            helper.make_tensor_value_info("out0", TensorProto.FLOAT, ["B", 2]),
            helper.make_tensor_value_info("out1", TensorProto.FLOAT, ["B", 7, 7]),
        ],
        inits,
    )
    # Opset/IR pinned low enough for the stub's onnxruntime and the app's alike.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def home() -> Path:
    path = default_home(REPO_ROOT)
    install_runtime(path)
    return path


@pytest.fixture(scope="module")
def production_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("production")
    model_dir = repo / MODEL
    for version, (seed, scale) in {1: (1, 1.0), 2: (2, 3.0)}.items():
        (model_dir / str(version)).mkdir(parents=True)
        onnx.save(_toy_onnx(seed, scale), model_dir / str(version) / "model.onnx")
        (model_dir / str(version) / "card.json").write_text(f"v{version}")
    (model_dir / "config.pbtxt").write_text(TOY_CONFIG)
    (model_dir / "labels.txt").write_text("normal\nabnormal\n")
    (model_dir / "preprocess.json").write_text('{"mean": 0.5, "std": 0.5}')
    return repo


@pytest.fixture(scope="module")
def rendered(production_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_repository(production_repo, tmp_path_factory.mktemp("rendered") / "repo")


@pytest.fixture(scope="module")
def toy_server(
    home: Path, rendered: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonProcess]:
    log = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    with TritonProcess(home, rendered, log) as server:
        yield server


@pytest.fixture(scope="module")
def client(toy_server: TritonProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(toy_server.grpc_url) as c:
        yield c


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 1, 28, 28)).astype(np.float32)


def _ort(repo: Path, version: int, images: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(repo / MODEL / str(version) / "model.onnx"))
    return session.run(["out0", "out1"], {"input.1": images})


def _infer(
    client: grpcclient.InferenceServerClient,
    model: str,
    version: int,
    images: np.ndarray,
    outputs: tuple[str, ...],
    input_name: str = "image",
) -> list[np.ndarray]:
    inp = grpcclient.InferInput(input_name, list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    result = client.infer(
        model,
        [inp],
        model_version=str(version),
        outputs=[grpcclient.InferRequestedOutput(name) for name in outputs],
        client_timeout=CLIENT_TIMEOUT_S,
    )
    arrays = [result.as_numpy(name) for name in outputs]
    # The numpy-2 trap: the stub then answers with an EMPTY tensor and no error.
    for name, array in zip(outputs, arrays, strict=True):
        assert array is not None and array.size > 0, f"{model} v{version}: empty {name!r}"
    return arrays


def test_the_cpu_rendering_can_drop_the_dynamic_batcher_and_nothing_else() -> None:
    original = mc.ModelConfig()
    text_format.Parse(TOY_CONFIG, original)
    assert original.HasField("dynamic_batching")
    kept = to_python_backend(original)
    dropped = to_python_backend(original, dynamic_batching=False)
    assert kept.HasField("dynamic_batching")
    assert not dropped.HasField("dynamic_batching")
    dropped.dynamic_batching.CopyFrom(kept.dynamic_batching)
    assert dropped == kept


def test_rendered_config_keeps_contract_and_runs_on_cpu(rendered: Path) -> None:
    config = read_model_config(rendered / MODEL / "config.pbtxt")
    original = mc.ModelConfig()
    text_format.Parse(TOY_CONFIG, original)

    assert config.backend == "python"
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (mc.ModelInstanceGroup.KIND_CPU, 1)
    ]
    assert not config.HasField("optimization")
    assert config.parameters[ORT_THREADS_PARAMETER].string_value == "1"
    assert config.input == original.input
    assert config.output == original.output
    assert config.dynamic_batching == original.dynamic_batching
    assert config.version_policy == original.version_policy
    assert config.max_batch_size == original.max_batch_size
    spec = load_model_spec(rendered, MODEL)
    assert spec.versions == (1, 2)
    assert spec.labels == ("normal", "abnormal")
    assert spec.preprocess == {"mean": 0.5, "std": 0.5}
    for version in (1, 2):
        assert (rendered / MODEL / str(version) / "model.py").is_file()
        assert (rendered / MODEL / str(version) / "card.json").read_text() == f"v{version}"


@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_inference_equals_onnxruntime(
    client: grpcclient.InferenceServerClient, production_repo: Path, version: int
) -> None:
    images = _images(1, seed=version)
    probs, heatmap = _infer(client, MODEL, version, images, ("probs", "heatmap"))
    want_probs, want_heatmap = _ort(production_repo, version, images)

    assert probs.shape == (1, 2) and probs.dtype == np.float32
    assert heatmap.shape == (1, 7, 7) and heatmap.dtype == np.float32
    np.testing.assert_allclose(probs, want_probs, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(heatmap, want_heatmap, rtol=RTOL, atol=ATOL)


def test_versions_compute_different_things(client: grpcclient.InferenceServerClient) -> None:
    # Guards the per-version model.onnx path: a render that served one file twice would pass
    # the ORT comparison for one version only, but make this identical.
    images = _images(1, seed=7)
    v1 = _infer(client, MODEL, 1, images, ("heatmap",))[0]
    v2 = _infer(client, MODEL, 2, images, ("heatmap",))[0]
    np.testing.assert_allclose(v2, 3.0 * v1, rtol=RTOL, atol=ATOL)


def test_batch_of_n(client: grpcclient.InferenceServerClient, production_repo: Path) -> None:
    images = _images(BATCH, seed=11)
    probs, heatmap = _infer(client, MODEL, 2, images, ("probs", "heatmap"))
    want_probs, want_heatmap = _ort(production_repo, 2, images)

    assert probs.shape == (BATCH, 2) and heatmap.shape == (BATCH, 7, 7)
    np.testing.assert_allclose(probs, want_probs, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(heatmap, want_heatmap, rtol=RTOL, atol=ATOL)


def test_concurrent_requests_are_batched_and_split_back(
    client: grpcclient.InferenceServerClient, production_repo: Path
) -> None:
    # Async requests of different sizes land in one dynamic batch; model.py concatenates them
    # for one ORT call and must hand each request back exactly its own rows.
    sizes = [1, 3, 2, 1]
    batches = [_images(n, seed=100 + i) for i, n in enumerate(sizes)]
    answers: queue.Queue[tuple[int, grpcclient.InferResult | None, Exception | None]]
    answers = queue.Queue()

    for i, images in enumerate(batches):
        inp = grpcclient.InferInput("image", list(images.shape), "FP32")
        inp.set_data_from_numpy(images)
        client.async_infer(
            MODEL,
            [inp],
            functools.partial(lambda i, result, error: answers.put((i, result, error)), i),
            model_version="1",
            client_timeout=CLIENT_TIMEOUT_S,
        )
    for _ in sizes:
        i, result, error = answers.get(timeout=CLIENT_TIMEOUT_S)
        assert error is None and result is not None, error
        want_probs, _ = _ort(production_repo, 1, batches[i])
        got = result.as_numpy("probs")
        assert got is not None and got.shape == (sizes[i], 2)
        np.testing.assert_allclose(got, want_probs, rtol=RTOL, atol=ATOL)


def test_metrics_port_answers(toy_server: TritonProcess) -> None:
    text = httpx.get(toy_server.metrics_url, timeout=CLIENT_TIMEOUT_S).text
    assert "nv_inference_request_success" in text


def test_explicit_model_control_and_stop(
    home: Path, rendered: Path, production_repo: Path, tmp_path: Path
) -> None:
    server = TritonProcess(home, rendered, tmp_path / "explicit.log", model_control="explicit")
    with server:
        with grpcclient.InferenceServerClient(server.grpc_url) as c:
            assert not c.is_model_ready(MODEL, client_timeout=CLIENT_TIMEOUT_S)
            c.load_model(MODEL, client_timeout=CLIENT_TIMEOUT_S)
            assert c.is_model_ready(MODEL, "1", client_timeout=CLIENT_TIMEOUT_S)
            assert c.is_model_ready(MODEL, "2", client_timeout=CLIENT_TIMEOUT_S)
            images = _images(2, seed=3)
            probs = _infer(c, MODEL, 1, images, ("probs",))[0]
            np.testing.assert_allclose(
                probs, _ort(production_repo, 1, images)[0], rtol=RTOL, atol=ATOL
            )
            c.unload_model(MODEL, client_timeout=CLIENT_TIMEOUT_S)
            assert not c.is_model_ready(MODEL, client_timeout=CLIENT_TIMEOUT_S)
        pid = server.pid
        assert pid is not None and server.is_running

    assert not server.is_running
    assert not _alive(pid)
    assert _group_members(pid) == [], "backend stubs outlived the server"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid:
                members.append(int(entry.name))
        except ProcessLookupError:
            continue
    return members


def test_second_install_is_a_noop(home: Path) -> None:
    started = time.monotonic()
    install_runtime(home)
    assert time.monotonic() - started < NOOP_INSTALL_S


def test_stub_sees_numpy_1_and_its_own_venv_first(home: Path) -> None:
    # numpy 2 in the stub = empty outputs with no error; the venv on PATH is how the stub's
    # isolated embedded Python finds its site-packages.
    site = stub_site_dir(home)
    assert [p.name for p in site.glob("numpy-1.*.dist-info")], "stub runtime must pin numpy<2"
    env = server_env(home, {"PATH": "/usr/bin", "PYTHONPATH": "/elsewhere"})
    assert env["PATH"].split(os.pathsep)[0] == str(site.parents[2] / "bin")
    assert "PYTHONPATH" not in env


def test_render_refuses_a_foreign_directory(production_repo: Path, tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not ours")

    with pytest.raises(TritonRuntimeError, match="not rendered by medtriage"):
        render_repository(production_repo, tmp_path)
    assert (tmp_path / "precious.txt").exists()


def test_render_needs_each_versions_onnx(production_repo: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(production_repo, src)
    (src / MODEL / "3").mkdir()

    with pytest.raises(ModelConfigError, match="model.onnx"):
        render_repository(src, tmp_path / "out")


# --------------------------------------------------------------------------------------------
# The real model_repository: the trained triage/analysis models, rendered and served.

REAL_MODELS = ("triage", "analysis")
REAL_BATCH = 3


@pytest.fixture(scope="module")
def real_server(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    # No skip when the ONNX files are missing: render_repository raises, the test errors.
    work = tmp_path_factory.mktemp("real")
    rendered_real = render_repository(REPO_ROOT / "model_repository", work / "repo")
    with TritonProcess(home, rendered_real, work / "tritonserver.log") as server:
        yield server


def _real_cases() -> list[tuple[str, int]]:
    return [
        (name, version)
        for name in REAL_MODELS
        for version in load_model_spec(REPO_ROOT / "model_repository", name).versions
    ]


@pytest.mark.parametrize(("name", "version"), _real_cases(), ids=lambda case: str(case))
def test_real_repository_equals_onnxruntime(
    real_server: TritonProcess, name: str, version: int
) -> None:
    repo = REPO_ROOT / "model_repository"
    spec = load_model_spec(repo, name)
    (image,) = spec.inputs
    images = _images(REAL_BATCH, seed=version).reshape(REAL_BATCH, *image.dims)
    session = ort.InferenceSession(str(repo / name / str(version) / "model.onnx"))
    # Same position mapping as model.py: the graph's names may differ from config.pbtxt's.
    want = session.run(None, {session.get_inputs()[0].name: images})

    with grpcclient.InferenceServerClient(real_server.grpc_url) as c:
        got = _infer(c, name, version, images, tuple(t.name for t in spec.outputs), image.name)

    # strict=False: model.py answers the config's outputs from the graph's first ones.
    for tensor, array, expected in zip(spec.outputs, got, want, strict=False):
        assert array.shape == (REAL_BATCH, *tensor.dims), tensor.name
        np.testing.assert_allclose(array, expected, rtol=RTOL, atol=ATOL, err_msg=tensor.name)
