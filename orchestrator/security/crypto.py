"""Encryption at rest for the object store: ``EncryptedStore(inner)`` wraps any ObjectStore.

Each object is sealed with AES-256-GCM under the active key; the object key is the
associated data, so a ciphertext moved to another key does not open. Stored layout::

    b"MTE1" | len(kid) (1 byte) | kid (ascii) | nonce (12 bytes) | ciphertext + tag (16 bytes)

Keys come from configuration as ``kid:base64(32 bytes)`` entries, comma-separated; the first
encrypts, all decrypt, so rotating is "put the new key first, keep the old ones" and old
objects stay readable. The wrapper implements only the protocol's methods on purpose: a new
store method (e.g. a streaming put) raises AttributeError here instead of bypassing
encryption, until it is added to this class.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from orchestrator.errors import StorageError
from orchestrator.storage import ObjectStore

MAGIC = b"MTE1"
NONCE_BYTES = 12
KEY_BYTES = 32  # AES-256
_MAX_KID = 255


class ObjectTampered(StorageError):
    """A stored object is not what was stored: bad tag, not sealed, or wrong SHA-256."""


def verify_sha256(data: bytes, expected: str) -> bytes:
    """Return ``data`` if its SHA-256 is the one recorded at ingest, else raise."""
    actual = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(actual, expected):
        raise ObjectTampered(
            f"stored original does not match its SHA-256 recorded at ingest"
            f" ({actual[:12]}… != {expected[:12]}…)"
        )
    return data


class KeyRing:
    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ValueError("no encryption keys")
        for kid, key in keys:
            if len(key) != KEY_BYTES:
                raise ValueError(f"key {kid!r}: need {KEY_BYTES} bytes, got {len(key)}")
            if not kid or len(kid) > _MAX_KID or not kid.isascii() or ":" in kid:
                raise ValueError(f"key id {kid!r}: 1-255 ascii characters, no ':'")
        self.active = keys[0][0]
        self._keys = dict(keys)

    @classmethod
    def parse(cls, text: str) -> KeyRing:
        """``kid:base64,kid2:base64`` (the first is active)."""
        keys = []
        for entry in filter(None, (e.strip() for e in text.split(","))):
            kid, _, b64 = entry.partition(":")
            try:
                keys.append((kid, base64.b64decode(b64, validate=True)))
            except binascii.Error as exc:
                raise ValueError(f"key {kid!r}: not base64") from exc
        return cls(keys)

    def key(self, kid: str) -> bytes:
        try:
            return self._keys[kid]
        except KeyError:
            raise StorageError(f"object sealed with unknown key id {kid!r}") from None

    @property
    def kids(self) -> list[str]:
        return list(self._keys)


def new_key_entry(kid: str | None = None) -> str:
    """A fresh ``kid:base64`` entry for the settings."""
    return f"{kid or secrets.token_hex(4)}:{base64.b64encode(AESGCM.generate_key(256)).decode()}"


def local_key_file(path: Path) -> str:
    """The development default: a key file beside (never inside) the local store, made once."""
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(new_key_entry("local-1"))
    return path.read_text().strip()


def seal(ring: KeyRing, key: str, data: bytes) -> bytes:
    kid = ring.active.encode()
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(ring.key(ring.active)).encrypt(nonce, data, key.encode())
    return MAGIC + bytes([len(kid)]) + kid + nonce + sealed


def open_sealed(ring: KeyRing, key: str, blob: bytes) -> bytes:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 1:
        raise ObjectTampered(f"object {key} is not encrypted; refusing to serve it")
    n = blob[len(MAGIC)]
    start = len(MAGIC) + 1
    kid = blob[start : start + n].decode("ascii", errors="replace")
    nonce = blob[start + n : start + n + NONCE_BYTES]
    try:
        return AESGCM(ring.key(kid)).decrypt(nonce, blob[start + n + NONCE_BYTES :], key.encode())
    except InvalidTag as exc:
        raise ObjectTampered(
            f"object {key} failed its AES-GCM integrity check (tampered or moved)"
        ) from exc


def key_id_of(blob: bytes) -> str | None:
    """The key id an object was sealed with, or None if it is not sealed."""
    if not blob.startswith(MAGIC):
        return None
    n = blob[len(MAGIC)]
    return blob[len(MAGIC) + 1 : len(MAGIC) + 1 + n].decode("ascii", errors="replace")


class EncryptedStore:
    """An ObjectStore that seals on put and opens on get; everything else passes through."""

    def __init__(self, inner: ObjectStore, ring: KeyRing) -> None:
        self.inner = inner
        self.ring = ring

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        self.inner.put(key, seal(self.ring, key, data), content_type="application/octet-stream")

    def get(self, key: str) -> bytes:
        return open_sealed(self.ring, key, self.inner.get(key))

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def ping(self) -> None:
        self.inner.ping()

    def rewrap(self, key: str) -> bool:
        """Re-seal one object under the active key (after a rotation); True if it changed."""
        blob = self.inner.get(key)
        if key_id_of(blob) == self.ring.active:
            return False
        self.put(key, open_sealed(self.ring, key, blob))
        return True
