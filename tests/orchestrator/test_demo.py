"""A first run that needs nothing pre-installed (issue 18): the project's wheel, built and
installed into a fresh virtual environment, runs `medtriage demo` end to end on a machine where
nothing answers on PostgreSQL's and Redis's default addresses (the probes point at closed
ports): it starts embedded servers, says so first, processes every sample study from the
model repository and samples the wheel ships, and stops the servers after."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from orchestrator.inference.local_triton.install import install_runtime, runtime_dir
from orchestrator.settings import REPO_ROOT
from tests.orchestrator.cli.test_services import closed_address

pytestmark = pytest.mark.integration

HOME = Path(os.environ.get("MEDTRIAGE_HOME", str(REPO_ROOT / ".medtriage")))
BUILD_TIMEOUT_S = 300
# Measured 41 s on two shared cores (Triton start ~25 s, 9 studies); room for a busy machine.
DEMO_TIMEOUT_S = 420


def _tracked_tree(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked and new, not ignored): no build/ or
    .medtriage/ leftovers can reach the wheel."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    for name in filter(None, listed.split("\0")):
        source = REPO_ROOT / name
        if source.is_file() and not name.startswith("tests/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def _fresh_venv(tmp_path: Path) -> Path:
    """A venv holding only the medtriage wheel (installed --no-deps); its dependencies come
    from the test's own environment through a plain path entry (so that environment's
    editable medtriage is not seen)."""
    source = _tracked_tree(tmp_path / "src")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "wheel"), str(source)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("medtriage-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-2000:]
    return venv


def test_installed_wheel_runs_the_demo_with_embedded_services(tmp_path: Path) -> None:
    venv = _fresh_venv(tmp_path)
    user_home = tmp_path / "user"
    # The Triton runtime (a 55 MB wheel + a stub venv) is shared with the session's, not
    # downloaded again; everything else lives in the fresh ~/.medtriage.
    install_runtime(HOME)
    (user_home / ".medtriage").mkdir(parents=True)
    (user_home / ".medtriage" / "triton").symlink_to(runtime_dir(HOME))
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MEDTRIAGE_") and k not in {"PYTHONPATH", "VIRTUAL_ENV"}
    }
    env |= {
        "HOME": str(user_home),
        "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}",
        "MEDTRIAGE_LOCAL_POSTGRES_ADDRESS": closed_address(),
        "MEDTRIAGE_LOCAL_REDIS_ADDRESS": closed_address(),
        "MEDTRIAGE_PORT": "0",  # a free port: other stacks may hold 8080
    }
    ran = subprocess.run(
        [str(venv / "bin" / "medtriage"), "demo", "--workers", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S,
    )  # fmt: skip
    out = ran.stdout
    assert ran.returncode == 0, out[-3000:] + ran.stderr[-3000:]
    first = out.splitlines()[:2]
    assert first[0].startswith("PostgreSQL: EMBEDDED server"), out[:1000]
    assert first[1].startswith("Redis: EMBEDDED server"), out[:1000]
    assert all("stopped with the stack" in line for line in first)
    home = user_home / ".medtriage"
    # The code, the model repository and the samples all came from the wheel, not the checkout.
    site = next((venv / "lib").glob("python3.*/site-packages"))
    api_log = (home / "logs" / "api.log").read_text()
    assert "Traceback" not in api_log, api_log[-2000:]
    assert (site / "orchestrator" / "_data" / "model_repository").is_dir()
    assert (site / "orchestrator" / "_data" / "samples").is_dir()
    rendered = home / "triton-repository"
    assert {p.name for p in rendered.iterdir() if p.is_dir()} >= {"triage", "analysis"}
    summary = json.loads((home / "demo" / "summary.json").read_text())
    statuses = {row["study"]: row["status"] for row in summary}
    assert statuses["chest-pneumonia"] == "needs_review"
    assert statuses["ct-mr-mixed#1"] == "not_applicable"
    assert all(s != "failed" for s in statuses.values()), statuses
    assert len(list((home / "demo").glob("*.report.json"))) == len(summary)
    # The embedded servers are stopped with the stack.
    assert not (home / "services" / "postgres" / "postmaster.pid").exists()
    assert not (home / "services" / "redis" / "redis.pid").exists()
