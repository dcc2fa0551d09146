"""The boundary with Triton Inference Server (gRPC).

One ``TritonInference`` per worker process keeps its gRPC channel warm for every job.
Every call passes an explicit model version, priority and client timeout; tritonclient's
errors are translated here, once, into ModelUnavailable / InferenceTimeout / InferenceError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from orchestrator.errors import InferenceError, InferenceTimeout, ModelUnavailable
from orchestrator.triton.config import ModelSpec

# Triton's priority for STAT studies (1 = highest); 0 means "the model's default level".
PRIORITY_STAT = 1
PRIORITY_DEFAULT = 0


class InferenceClient(Protocol):
    def infer(
        self,
        spec: ModelSpec,
        version: int,
        inputs: Mapping[str, np.ndarray],
        *,
        priority: int = PRIORITY_DEFAULT,
        timeout_s: float,
    ) -> dict[str, np.ndarray]: ...

    def is_ready(self) -> bool: ...


def _translate(exc: Exception, model: str, version: int) -> InferenceError:
    status = ""
    if hasattr(exc, "status"):
        status = str(exc.status() or "")
    text = str(exc)
    if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in text:
        return InferenceTimeout(model, version, "deadline exceeded")
    if "UNAVAILABLE" in status or "unavailable" in text.lower() or "not found" in text.lower():
        return ModelUnavailable(model, version, text.splitlines()[0] if text else status)
    return InferenceError(model, version, text.splitlines()[0] if text else type(exc).__name__)


class TritonInference:
    """tritonclient.grpc behind the InferenceClient protocol."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.url = url
        self._client = grpcclient.InferenceServerClient(url=url)

    def infer(
        self,
        spec: ModelSpec,
        version: int,
        inputs: Mapping[str, np.ndarray],
        *,
        priority: int = PRIORITY_DEFAULT,
        timeout_s: float,
    ) -> dict[str, np.ndarray]:
        from tritonclient.utils import InferenceServerException

        grpc_inputs = []
        for tensor in spec.inputs:
            array = inputs[tensor.name]
            item = self._grpc.InferInput(tensor.name, list(array.shape), tensor.datatype)
            item.set_data_from_numpy(array)
            grpc_inputs.append(item)
        outputs = [self._grpc.InferRequestedOutput(t.name) for t in spec.outputs]
        try:
            response = self._client.infer(
                spec.name,
                grpc_inputs,
                model_version=str(version),
                outputs=outputs,
                priority=priority,
                client_timeout=timeout_s,
            )
        except InferenceServerException as exc:
            raise _translate(exc, spec.name, version) from exc
        result: dict[str, np.ndarray] = {}
        batch = next(iter(inputs.values())).shape[0]
        for tensor in spec.outputs:
            array = response.as_numpy(tensor.name)
            # Guard against the python-backend stub's silent failure mode (empty tensors).
            if array is None or array.size == 0 or array.shape != (batch, *tensor.dims):
                got = None if array is None else array.shape
                raise InferenceError(
                    spec.name,
                    version,
                    f"output {tensor.name!r} has shape {got}, expected {(batch, *tensor.dims)}",
                )
            if not np.all(np.isfinite(array)):
                raise InferenceError(spec.name, version, f"output {tensor.name!r} is not finite")
            result[tensor.name] = array
        return result

    def is_ready(self) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return bool(self._client.is_server_ready())
        except InferenceServerException:
            return False

    def model_ready(self, name: str, version: int) -> bool:
        from tritonclient.utils import InferenceServerException

        try:
            return bool(self._client.is_model_ready(name, str(version)))
        except InferenceServerException:
            return False

    def close(self) -> None:
        self._client.close()


def batches(count: int, size: int) -> Sequence[slice]:
    return [slice(i, min(i + size, count)) for i in range(0, count, size)]
