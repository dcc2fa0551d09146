"""Object store for originals, previews and reports: a local directory or S3 (boto3).

Keys are opaque internal ids (``tenants/<uuid>/studies/<uuid>/...``): never UIDs or
patient data. Both backends share the ``ObjectStore`` protocol so unit tests can use a fake.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from orchestrator.errors import DependencyUnavailable, ObjectNotFound, StorageError

# boto3 client timeouts: a hung S3 endpoint must not hang a request or a job.
S3_CONNECT_TIMEOUT_S = 5
S3_READ_TIMEOUT_S = 30
S3_MAX_ATTEMPTS = 3
# Local store: tries to make an object's folder that a concurrent delete may remove once empty.
_MKDIR_TRIES = 3


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes, *, content_type: str = ...) -> None: ...
    # Large originals: written from chunks, never held whole in memory.
    def put_stream(self, key: str, chunks: Iterable[bytes], *, content_type: str = ...) -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def ping(self) -> None: ...


class LocalStore:
    """Objects as files under one directory; writes are atomic (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._real_root = os.path.realpath(self.root)

    def _path(self, key: str) -> Path:
        # Lexical: '..' and absolute keys cannot leave the root (the store's own directories
        # hold no symlinks); resolving every key on disk cost each object two realpath walks.
        path = os.path.normpath(os.path.join(self._real_root, key))
        if (
            os.path.commonpath((path, self._real_root)) != self._real_root
            or path == self._real_root
        ):
            raise StorageError(f"key escapes the store: {key!r}")
        return Path(path)

    def _temp_beside(self, path: Path) -> tuple[int, str]:
        """A temporary file in ``path``'s folder, made if needed. A delete may remove the
        folder once it is empty between the mkdir and the mkstemp: make it again."""
        for _ in range(_MKDIR_TRIES - 1):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            except FileNotFoundError:
                continue
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=path.parent, prefix=".tmp-")

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        fd, tmp = self._temp_beside(path)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_stream(
        self, key: str, chunks: Iterable[bytes], *, content_type: str = "application/octet-stream"
    ) -> None:
        path = self._path(key)
        fd, tmp = self._temp_beside(path)
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc

    def delete(self, key: str) -> None:
        """Remove the object, then the folders it leaves empty (a purged study's
        ``tenants/<t>/studies/<id>/…`` folders name it), up to but not including the root."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        parent, root = path.parent, Path(self._real_root)
        while parent != root and root in parent.parents:
            try:
                parent.rmdir()
            except OSError:  # not empty (or already gone, or in use): stop here
                break
            parent = parent.parent

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise DependencyUnavailable("object store", f"{self.root} is not writable")


class S3Store:
    """Objects in an S3 bucket under a prefix; server-side encryption requested on every put."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        server_side_encryption: str = "AES256",
        kms_key_id: str = "",
    ) -> None:
        import boto3
        from botocore.config import Config

        if server_side_encryption not in ("AES256", "aws:kms"):
            raise ValueError("server_side_encryption must be 'AES256' (SSE-S3) or 'aws:kms'")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.sse = server_side_encryption
        self._sse_args = {"ServerSideEncryption": server_side_encryption}
        if server_side_encryption == "aws:kms" and kms_key_id:
            self._sse_args["SSEKMSKeyId"] = kms_key_id
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region,
            config=Config(
                connect_timeout=S3_CONNECT_TIMEOUT_S,
                read_timeout=S3_READ_TIMEOUT_S,
                retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
            ),
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _translate(self, exc: Exception, key: str) -> Exception:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(key)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status >= 500 or code in ("SlowDown", "Throttling"):
                return DependencyUnavailable("object store", code or str(status))
            return StorageError(f"S3 {code} on {key}")
        if isinstance(exc, BotoCoreError):
            return DependencyUnavailable("object store", type(exc).__name__)
        return exc

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                ContentType=content_type,
                **self._sse_args,
            )
        except Exception as exc:
            raise self._translate(exc, key) from exc

    def put_stream(
        self, key: str, chunks: Iterable[bytes], *, content_type: str = "application/octet-stream"
    ) -> None:
        # Multipart upload from a file-like view of the chunks (boto3 reads it part by part).
        try:
            self._client.upload_fileobj(
                _ChunkReader(iter(chunks)),
                self.bucket,
                self._key(key),
                ExtraArgs={"ContentType": content_type, **self._sse_args},
            )
        except Exception as exc:
            raise self._translate(exc, key) from exc

    def get(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            data = bytes(response["Body"].read())
        except Exception as exc:
            raise self._translate(exc, key) from exc
        # Checked on read: an object that was not stored encrypted is not served.
        if response.get("ServerSideEncryption") != self.sse:
            raise StorageError(f"object {key} is not server-side encrypted ({self.sse})")
        return data

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except Exception as exc:
            raise self._translate(exc, key) from exc

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except Exception as exc:
            err = self._translate(exc, key)
            if isinstance(err, ObjectNotFound):
                return False
            raise err from exc

    def ping(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise DependencyUnavailable("object store", type(exc).__name__) from exc


class _ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def open_store(
    url: str,
    *,
    endpoint_url: str = "",
    region: str = "us-east-1",
    encryption_keys: str = "",
    s3_sse: str = "AES256",
    s3_kms_key_id: str = "",
) -> ObjectStore:
    """``file:///path`` → LocalStore sealed with AES-GCM (orchestrator/store/encryption.py);
    ``s3://bucket/prefix`` → S3Store with server-side encryption (and AES-GCM too when keys
    are configured). Without configured keys a local store makes ``<path>.storage-key``."""
    from orchestrator.store.encryption import EncryptedStore, KeyRing, local_key_file

    parsed = urlparse(url)
    store: ObjectStore
    if parsed.scheme == "file":
        root = Path(parsed.path)
        keys = encryption_keys or local_key_file(root.with_name(root.name + ".storage-key"))
        return EncryptedStore(LocalStore(root), KeyRing.parse(keys))
    if parsed.scheme == "s3":
        store = S3Store(
            parsed.netloc,
            parsed.path,
            endpoint_url=endpoint_url or None,
            region=region,
            server_side_encryption=s3_sse,
            kms_key_id=s3_kms_key_id,
        )
        return EncryptedStore(store, KeyRing.parse(encryption_keys)) if encryption_keys else store
    raise ValueError(f"storage URL must be file:///path or s3://bucket/prefix, not {url!r}")


def original_key(tenant_id: str, study_id: str, instance_id: str) -> str:
    return f"tenants/{tenant_id}/studies/{study_id}/originals/{instance_id}.dcm"


def preview_key(tenant_id: str, study_id: str, instance_id: str) -> str:
    return f"tenants/{tenant_id}/studies/{study_id}/previews/{instance_id}.jpg"


def report_key(tenant_id: str, study_id: str, revision: int, fmt: str) -> str:
    return f"tenants/{tenant_id}/studies/{study_id}/reports/r{revision}.{fmt}"
