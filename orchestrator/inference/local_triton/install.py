"""Install the local Triton runtime: the ``nvidia-pytriton`` wheel (``--no-deps``), a stub venv
(numpy<2 + onnxruntime) and the python backend directory.

Layout under ``home`` (``MEDTRIAGE_HOME``, default ``<repo>/.medtriage``)::

    triton/pytriton/          the wheel, installed --no-deps (its numpy<2 pin stays out of the app)
    triton/stub-venv/         a venv (no pip) whose site-packages hold numpy<2 + onnxruntime for
                              the backend stub's embedded Python; found through PATH, see below
    triton/backends/python/   libtriton_python.so, triton_python_backend_utils.py, the stub
    triton/.installed         marker: a second install_runtime() is a no-op
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"
# The stub imports numpy through triton_python_backend_utils; built against numpy 1.x, it answers
# every request with an EMPTY output tensor (and no error) when it finds numpy 2.
STUB_REQUIREMENTS = ("numpy<2", "onnxruntime")
# Bump when the layout under HOME/triton changes so old installs are rebuilt.
INSTALL_LAYOUT_VERSION = 2

# Generous: a cold install downloads ~55 MB (the wheel) + ~30 MB (numpy, onnxruntime).
PIP_TIMEOUT_S = 900.0


class TritonRuntimeError(RuntimeError):
    """Installing, rendering for or starting the local tritonserver failed."""


# --------------------------------------------------------------------------------------------
# install


def runtime_dir(home: Path) -> Path:
    return home / "triton"


def pytriton_dir(home: Path) -> Path:
    """The ``pytriton`` package inside the wheel install (holds ``tritonserver/``)."""
    return runtime_dir(home) / "pytriton" / "pytriton"


def tritonserver_binary(home: Path) -> Path:
    return pytriton_dir(home) / "tritonserver" / "bin" / "tritonserver"


def backend_dir(home: Path) -> Path:
    return runtime_dir(home) / "backends"


def stub_venv_dir(home: Path) -> Path:
    return runtime_dir(home) / "stub-venv"


def stub_site_dir(home: Path) -> Path:
    """site-packages of the stub's venv: numpy<2 and onnxruntime for model.py."""
    return stub_venv_dir(home) / "lib" / f"python{_python_minor()}" / "site-packages"


def _marker(home: Path) -> Path:
    return runtime_dir(home) / ".installed"


def _marker_content() -> str:
    return json.dumps(
        {
            "layout": INSTALL_LAYOUT_VERSION,
            "pytriton": PYTRITON_REQUIREMENT,
            "stub": list(STUB_REQUIREMENTS),
            "python": _python_minor(),
        },
        sort_keys=True,
    )


def _python_minor() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def is_installed(home: Path) -> bool:
    marker = _marker(home)
    return marker.is_file() and marker.read_text() == _marker_content()


def install_runtime(home: Path, *, python: str = sys.executable) -> Path:
    """Install the bundled tritonserver and the python backend under ``home``; idempotent.

    Returns the backend directory to pass as ``--backend-directory``. A completed install is
    recorded in a marker file, so a second call costs a file read.
    """
    home = home.resolve()
    if is_installed(home):
        return backend_dir(home)
    root = runtime_dir(home)
    root.mkdir(parents=True, exist_ok=True)
    _pip(python, "--no-deps", "--target", root / "pytriton", PYTRITON_REQUIREMENT)
    _make_stub_venv(home)
    _pip(python, "--target", stub_site_dir(home), *STUB_REQUIREMENTS)
    _build_python_backend(home)
    _marker(home).write_text(_marker_content())
    return backend_dir(home)


def _pip(python: str, *args: str | Path) -> None:
    # --upgrade: replace a half-written --target from an interrupted earlier run instead of
    # leaving it beside the new one (pip --target otherwise warns and keeps the old directory).
    cmd = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade"]
    cmd += [str(a) for a in args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise TritonRuntimeError(f"{' '.join(cmd)} took over {PIP_TIMEOUT_S:.0f} s") from exc
    if proc.returncode != 0:
        raise TritonRuntimeError(
            f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )


def _make_stub_venv(home: Path) -> None:
    # The stub embeds Python in isolated mode: it ignores PYTHONPATH and PYTHONHOME and finds
    # its prefix by looking up "python3" on PATH. A venv first on PATH therefore becomes the
    # stub's sys.prefix, with its own site-packages and WITHOUT the base interpreter's (which
    # may hold numpy 2). No pip inside: the app's pip fills it with --target, which is faster.
    venv.EnvBuilder(clear=True, symlinks=True, with_pip=False).create(stub_venv_dir(home))


def _build_python_backend(home: Path) -> None:
    server = pytriton_dir(home) / "tritonserver"
    src = server / "backends" / "python"
    stubs = server / "python_backend_stubs"
    stub = stubs / _python_minor() / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in stubs.iterdir()) if stubs.is_dir() else []
        raise TritonRuntimeError(
            f"{PYTRITON_REQUIREMENT} has no python backend stub for Python {_python_minor()} "
            f"(it has: {', '.join(have) or 'none'}); run with one of those Python versions"
        )
    dest = backend_dir(home) / "python"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(src / name, dest / name)
    shutil.copy2(stub, dest / stub.name)
    (dest / stub.name).chmod(0o755)
