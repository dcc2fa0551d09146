"""The boundary with Triton Inference Server (gRPC).

One ``TritonInference`` per worker process keeps its gRPC channel warm for every job.
Every call passes an explicit model version, priority and client timeout; tritonclient's
errors are translated here, once, into ModelUnavailable / InferenceTimeout / InferenceError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from orchestrator.errors import InferenceError, InferenceTimeout, ModelUnavailable
from orchestrator.inference.specs import ModelSpec
from orchestrator.security.tls import GrpcTls

# Triton's priority for STAT studies (1 = highest); 0 means "the model's default level".
PRIORITY_STAT = 1
PRIORITY_DEFAULT = 0
# config.pbtxt data types (without TYPE_) and the numpy dtype a response must carry.
NUMPY_DTYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


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


@dataclass(frozen=True)
class OutputCheck:
    """Whether a response may be used: a problem of the whole batch (nothing in it can be
    trusted), or per row (that instance's outputs only)."""

    batch_problem: str | None = None
    row_problems: dict[int, str] = field(default_factory=dict)

    def problem(self, row: int) -> str | None:
        return self.batch_problem or self.row_problems.get(row)


def check_outputs(spec: ModelSpec, batch: int, outputs: Mapping[str, np.ndarray]) -> OutputCheck:
    """Check a response against the model's config (shape with the batch dimension, dtype)
    and every floating value for NaN/infinity, before anything is built from it."""
    for tensor in spec.outputs:
        array = outputs.get(tensor.name)
        expected = (batch, *tensor.dims)
        if array is None:
            return OutputCheck(f"output {tensor.name!r} is missing")
        shape = tuple(array.shape)
        if (
            array.size == 0
            or len(shape) != len(expected)
            or any(want not in (-1, got) for want, got in zip(expected, shape, strict=True))
        ):
            return OutputCheck(f"output {tensor.name!r} has shape {shape}, expected {expected}")
        dtype = NUMPY_DTYPES.get(tensor.datatype)
        if dtype is not None and array.dtype != dtype:
            return OutputCheck(
                f"output {tensor.name!r} is {array.dtype}, expected {np.dtype(dtype)}"
                f" ({tensor.datatype})"
            )
    rows: dict[int, str] = {}
    for tensor in spec.outputs:
        array = outputs[tensor.name]
        if array.dtype.kind != "f":
            continue
        finite = np.isfinite(array.reshape(batch, -1)).all(axis=1)
        for row in np.flatnonzero(~finite):
            rows.setdefault(int(row), f"output {tensor.name!r} holds NaN or infinity")
    return OutputCheck(None, rows)


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

    def __init__(self, url: str, *, tls: GrpcTls | None = None) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.url = url
        self._client = grpcclient.InferenceServerClient(
            url=url, **(tls or GrpcTls()).client_kwargs()
        )

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
        # Returned as received: the pipeline checks every response (check_outputs), whichever
        # client produced it, and fails only the instances whose outputs are unusable.
        result: dict[str, np.ndarray] = {}
        for tensor in spec.outputs:
            array = response.as_numpy(tensor.name)
            if array is not None:
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
