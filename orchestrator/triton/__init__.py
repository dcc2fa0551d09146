"""Triton Inference Server: the model repository contract and a local runtime.

``config`` reads ``model_repository/<model>/config.pbtxt`` (the only place tensor names, dtypes and
shapes are written down). ``local`` runs the ``tritonserver`` binary bundled in the
``nvidia-pytriton`` wheel, with a python-backend rendering of the production repository, for
machines without the NGC Triton image (laptops, CI).
"""

from __future__ import annotations

from orchestrator.triton.config import (
    ModelConfigError,
    ModelSpec,
    TensorSpec,
    load_model_spec,
    load_repository,
)

__all__ = [
    "ModelConfigError",
    "ModelSpec",
    "TensorSpec",
    "load_model_spec",
    "load_repository",
]
