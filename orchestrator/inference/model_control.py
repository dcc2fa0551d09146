"""Triton's explicit model control, per version.

Triton loads a model's versions according to its ``version_policy``; to load or unload a
single version we reload the model with a config whose policy names exactly the versions
wanted (Triton swaps them in without dropping the others' in-flight requests).
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator.errors import ModelUnavailable
from orchestrator.security.tls import GrpcTls


class TritonControl:
    def __init__(self, url: str, *, tls: GrpcTls | None = None) -> None:
        import tritonclient.grpc as grpcclient

        self._client = grpcclient.InferenceServerClient(
            url=url, **(tls or GrpcTls()).client_kwargs()
        )

    def _call(self, model: str, fn: str, *args: Any, **kwargs: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        try:
            return getattr(self._client, fn)(*args, **kwargs)
        except InferenceServerException as exc:
            raise ModelUnavailable(model, 0, str(exc).splitlines()[0]) from exc

    def index(self) -> list[dict[str, Any]]:
        """Every model/version Triton knows, with its state (READY, UNAVAILABLE, ...)."""
        response = self._call("*", "get_model_repository_index", as_json=True)
        return list(response.get("models", []))

    def loaded_versions(self, model: str) -> set[int]:
        return {
            int(m["version"])
            for m in self.index()
            if m.get("name") == model and m.get("state") == "READY" and m.get("version")
        }

    def set_loaded(self, model: str, versions: set[int]) -> set[int]:
        """Make exactly ``versions`` of ``model`` loaded; return what is loaded afterwards."""
        if not versions:
            self._call(model, "unload_model", model)
            return self.loaded_versions(model)
        if not self.loaded_versions(model):
            self._call(model, "load_model", model)
        config = self._call(model, "get_model_config", model, as_json=True)["config"]
        config["version_policy"] = {"specific": {"versions": sorted(versions)}}
        self._call(model, "load_model", model, config=json.dumps(config))
        return self.loaded_versions(model)

    def load(self, model: str, version: int) -> set[int]:
        return self.set_loaded(model, self.loaded_versions(model) | {version})

    def unload(self, model: str, version: int) -> set[int]:
        return self.set_loaded(model, self.loaded_versions(model) - {version})

    def close(self) -> None:
        self._client.close()
