"""Ships the demo's data inside the wheel, so that `pip install medtriage` and then
`medtriage demo` work without a checkout (issue 18): ``model_repository/`` and ``samples/`` are
copied to ``orchestrator/_data/`` at build time (``settings.data_dir`` finds them there).
Everything else about the package is in pyproject.toml."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("model_repository", "samples")


class BuildPyWithData(build_py):  # type: ignore[misc]
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return  # an editable install reads the checkout's folders
        for name in SHIPPED:
            source = ROOT / name
            if source.is_dir():  # the Docker image mounts the repository instead
                target = Path(self.build_lib) / "orchestrator" / "_data" / name
                shutil.rmtree(target, ignore_errors=True)
                shutil.copytree(
                    source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )


setup(cmdclass={"build_py": BuildPyWithData})
