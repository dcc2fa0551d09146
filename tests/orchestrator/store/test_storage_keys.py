"""Where the object store's encryption keys may come from (issue 16, item 12): in a
non-local deployment never a key file beside or inside the store's folder; the environment
or a mounted secret instead. The local demo keeps its key file beside the store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.settings import WorkerSettings
from orchestrator.store.encryption import new_key_entry
from orchestrator.store.objects import open_store

PLAINTEXT = b"DICM plaintext that must not reach the disk"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MEDTRIAGE_STORAGE") or name == "MEDTRIAGE_DEPLOYMENT":
            monkeypatch.delenv(name)


def _settings(store: Path, **values: object) -> WorkerSettings:
    return WorkerSettings(storage_url=f"file://{store}", **values)  # type: ignore[arg-type]


def test_production_refuses_a_local_store_without_keys(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="MEDTRIAGE_STORAGE_ENCRYPTION_KEYS"):
        _settings(tmp_path / "objects", deployment="production")
    assert not list(tmp_path.iterdir())  # and no key file was made


def test_a_keys_file_inside_the_store_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "objects"
    (store / "secrets").mkdir(parents=True)
    inside = store / "secrets" / "keys"
    inside.write_text(new_key_entry("k1"))
    for deployment in ("production", "local"):
        with pytest.raises(ValidationError, match="inside the object store"):
            _settings(store, deployment=deployment, storage_encryption_keys_file=inside)


def test_production_takes_keys_from_a_mounted_secret(tmp_path: Path) -> None:
    store, secret = tmp_path / "objects", tmp_path / "run-secrets" / "storage-keys"
    secret.parent.mkdir()
    secret.write_text(new_key_entry("mounted-1") + "\n")
    settings = _settings(store, deployment="production", storage_encryption_keys_file=secret)
    assert settings.storage_encryption_keys.startswith("mounted-1:")
    objects = open_store(settings.storage_url, encryption_keys=settings.storage_encryption_keys)
    objects.put("a/b.dcm", PLAINTEXT)
    assert objects.get("a/b.dcm") == PLAINTEXT
    on_disk = [p.read_bytes() for p in store.rglob("*") if p.is_file()]
    assert on_disk and all(PLAINTEXT not in data for data in on_disk)
    assert not (tmp_path / "objects.storage-key").exists()


def test_production_takes_keys_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDTRIAGE_DEPLOYMENT", "production")
    monkeypatch.setenv("MEDTRIAGE_STORAGE_ENCRYPTION_KEYS", new_key_entry("env-1"))
    assert _settings(tmp_path / "objects").storage_encryption_keys.startswith("env-1:")


def test_production_with_s3_needs_no_local_keys() -> None:
    settings = WorkerSettings(storage_url="s3://bucket/prefix", deployment="production")
    assert settings.storage_encryption_keys == ""  # SSE-S3 / SSE-KMS encrypt at rest


def test_local_keeps_its_key_file_beside_the_store(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "objects")
    open_store(settings.storage_url)
    assert (tmp_path / "objects.storage-key").exists()


def test_the_cli_refuses_to_start_and_says_why(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MEDTRIAGE_DEPLOYMENT": "production",
        "MEDTRIAGE_STORAGE_URL": f"file://{tmp_path / 'objects'}",
    }
    env.pop("MEDTRIAGE_STORAGE_ENCRYPTION_KEYS", None)
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "worker"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "MEDTRIAGE_STORAGE_ENCRYPTION_KEYS" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "objects.storage-key").exists()
