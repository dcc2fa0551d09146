"""Errors of the orchestrator.

Tree::

    MedtriageError                      (500)
    ├── BadRequest                      (400)
    │   └── InvalidUpload               (422)   nothing in the upload could be accepted
    ├── PayloadTooLarge                 (413)
    ├── UnsupportedMediaType            (415)
    ├── AuthenticationError             (401)   missing / wrong / expired API key
    ├── PermissionDenied                (403)   key valid, role insufficient
    ├── NotFound                        (404)
    ├── Gone                            (410)   e.g. a replayed upload that retention purged
    ├── Conflict                        (409)   e.g. an idempotency key still in flight
    ├── DependencyUnavailable           (503)   PostgreSQL, Redis, object store or Triton down
    ├── DependencyBusy                  (503)   up, but refused this call for now (a deadlock,
    │                                           a lock or statement timeout): retry it
    ├── StorageError                    (500)
    │   └── ObjectNotFound              (404)
    └── InferenceError                  (502)
        ├── ModelUnavailable            (503)   model/version not loaded or server down
        ├── InferenceTimeout            (504)
        └── InvalidOutput               (502)   outputs of the wrong shape/dtype, NaN/inf

Third-party errors are translated once, at the adapter that calls the library, with
``raise ... from exc``. One FastAPI handler maps the root class to a JSON answer.
"""

from __future__ import annotations


class MedtriageError(Exception):
    http_status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(MedtriageError):
    http_status = 400


class InvalidUpload(BadRequest):
    http_status = 422


class PayloadTooLarge(MedtriageError):
    http_status = 413


class UnsupportedMediaType(MedtriageError):
    http_status = 415


class AuthenticationError(MedtriageError):
    http_status = 401


class PermissionDenied(MedtriageError):
    http_status = 403


class NotFound(MedtriageError):
    http_status = 404


class Gone(MedtriageError):
    http_status = 410


class Conflict(MedtriageError):
    http_status = 409


class DependencyUnavailable(MedtriageError):
    http_status = 503

    def __init__(self, dependency: str, message: str) -> None:
        super().__init__(f"{dependency} unavailable: {message}")
        self.dependency = dependency


class DependencyBusy(MedtriageError):
    """The dependency is up but could not do this call now; the same call may succeed a moment
    later. Not an outage: readiness and alerts about a dependency being down ignore it."""

    http_status = 503
    # Seconds a client waits before retrying (the conflict is usually gone by then).
    RETRY_AFTER_S = 1

    def __init__(self, dependency: str, message: str) -> None:
        super().__init__(f"{dependency} busy: {message}, retry")
        self.dependency = dependency
        self.headers = {"Retry-After": str(self.RETRY_AFTER_S)}


class StorageError(MedtriageError):
    pass


class ObjectNotFound(StorageError):
    http_status = 404

    def __init__(self, key: str) -> None:
        super().__init__(f"object not found: {key}")
        self.key = key


class InferenceError(MedtriageError):
    http_status = 502

    def __init__(self, model: str, version: int, message: str) -> None:
        super().__init__(f"{model} v{version}: {message}")
        self.model = model
        self.version = version


class ModelUnavailable(InferenceError):
    http_status = 503


class InferenceTimeout(InferenceError):
    http_status = 504


class InvalidOutput(InferenceError):
    """A response that does not match the model's config.pbtxt, or holds NaN/infinity."""
