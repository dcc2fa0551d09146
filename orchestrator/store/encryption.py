"""Encryption at rest for the object store: ``EncryptedStore(inner)`` wraps any ObjectStore.

Each object is sealed with AES-256-GCM under the active key; the object key is the
associated data, so a ciphertext moved to another key does not open. Stored layout::

    b"MTE1" | len(kid) (1 byte) | kid (ascii) | nonce (12 bytes) | ciphertext + tag (16 bytes)

Large originals are written by ``put_stream`` in a segmented layout (the STREAM construction:
each segment sealed on its own, nonce = prefix | segment number | last-segment flag, so
reordered, dropped or truncated segments fail to open)::

    b"MTE2" | len(kid) | kid | nonce prefix (7 bytes) | segment size (4 bytes, big endian) |
    segment 0 ciphertext + tag | segment 1 ... | last segment ciphertext + tag

Keys come from configuration as ``kid:base64(32 bytes)`` entries, comma-separated; the first
encrypts, all decrypt, so rotating is "put the new key first, keep the old ones" and old
objects stay readable. The wrapper implements only the protocol's methods on purpose: a new
store method raises AttributeError here instead of bypassing encryption, until it is added
to this class.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from orchestrator.errors import StorageError
from orchestrator.store.objects import ObjectStore

MAGIC = b"MTE1"
MAGIC_STREAM = b"MTE2"
NONCE_BYTES = 12
# Segmented layout: plaintext bytes per segment, and the nonce's random prefix length
# (prefix + 4-byte segment number + 1-byte last flag = NONCE_BYTES).
SEGMENT_BYTES = 1 << 20
_PREFIX_BYTES = 7
_TAG_BYTES = 16
KEY_BYTES = 32  # AES-256
_MAX_KID = 255
_MAGIC_BYTES = len(MAGIC)  # both layouts' magics are this long
# The largest segment size a reader accepts (64 MiB): a bent header cannot ask for more.
_MAX_SEGMENT_BYTES = 64 << 20


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
    """The development default: a key file beside (never inside) the local store, made once.

    Several processes (API, workers) may start on a fresh store at once: the key is written
    to a private temporary file and published with ``link``, which fails if another process
    published first, so no reader ever sees a created-but-empty key file.
    """
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(new_key_entry("local-1"))
            os.chmod(tmp, 0o600)
            # FileExistsError: another process published its key first; use that one.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    return path.read_text().strip()


def seal(ring: KeyRing, key: str, data: bytes) -> bytes:
    kid = ring.active.encode()
    nonce = os.urandom(NONCE_BYTES)
    header = MAGIC + bytes([len(kid)]) + kid + nonce
    # Encrypted straight into the output: no second copy of a large object to prepend the header.
    out = bytearray(len(header) + len(data) + _TAG_BYTES)
    out[: len(header)] = header
    AESGCM(ring.key(ring.active)).encrypt_into(
        nonce, data, key.encode(), memoryview(out)[len(header) :]
    )
    return out  # type: ignore[return-value]  # bytes-like; stores write it as is


def _segment_nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def seal_stream(
    ring: KeyRing, key: str, chunks: Iterable[bytes], segment_bytes: int = SEGMENT_BYTES
) -> Iterator[bytes]:
    """The segmented layout of ``chunks``, produced one segment at a time."""
    kid = ring.active.encode()
    aead = AESGCM(ring.key(ring.active))
    prefix = os.urandom(_PREFIX_BYTES)
    yield MAGIC_STREAM + bytes([len(kid)]) + kid + prefix + segment_bytes.to_bytes(4, "big")
    buf = bytearray()
    index = 0
    for chunk in chunks:
        buf += chunk
        # Keep at least one byte back: the last segment is only known at the end.
        while len(buf) > segment_bytes:
            piece = bytes(buf[:segment_bytes])
            del buf[:segment_bytes]
            yield aead.encrypt(_segment_nonce(prefix, index, False), piece, key.encode())
            index += 1
    yield aead.encrypt(_segment_nonce(prefix, index, True), bytes(buf), key.encode())


def _kid(blob: bytes, key: str) -> tuple[str, int]:
    """The key id after the magic and where the rest starts; ObjectTampered if the frame
    is cut or bent there (a length byte past the end, an empty or non-ascii id)."""
    if len(blob) < _MAGIC_BYTES + 1:
        raise _malformed(key, "cut before its key id")
    n = blob[_MAGIC_BYTES]
    end = _MAGIC_BYTES + 1 + n
    raw = blob[_MAGIC_BYTES + 1 : end]
    if n == 0 or len(raw) < n:
        raise _malformed(key, "cut inside its key id")
    if not raw.isascii() or b":" in raw:
        raise _malformed(key, "key id is not a key id")
    return raw.decode("ascii"), end


def _malformed(key: str, what: str) -> ObjectTampered:
    return ObjectTampered(f"object {key} is not a well-formed sealed object ({what})")


def _aead(ring: KeyRing, key: str, kid: str) -> AESGCM:
    """The cipher for ``kid``; an id this ring does not hold is an integrity failure of that
    object (a bent key id, or a key dropped from the ring while objects still need it)."""
    try:
        return AESGCM(ring.key(kid))
    except StorageError as exc:
        raise ObjectTampered(
            f"object {key} is sealed with unknown key id {kid!r} (tampered, or its key was"
            " removed from the ring too early)"
        ) from exc


def _open_stream(ring: KeyRing, key: str, blob: bytes) -> bytes:
    kid, pos = _kid(blob, key)
    if len(blob) < pos + _PREFIX_BYTES + 4 + _TAG_BYTES:
        raise _malformed(key, "cut inside its segment header")
    prefix = blob[pos : pos + _PREFIX_BYTES]
    pos += _PREFIX_BYTES
    segment_bytes = int.from_bytes(blob[pos : pos + 4], "big")
    pos += 4
    if not 0 < segment_bytes <= _MAX_SEGMENT_BYTES:
        raise _malformed(key, f"segment size {segment_bytes}")
    aead = _aead(ring, key, kid)
    sealed = segment_bytes + _TAG_BYTES
    segments = max(1, -(-(len(blob) - pos) // sealed))
    # Each segment decrypted into its place in one buffer (no growing, no per-segment copies).
    out = bytearray(max(0, len(blob) - pos - segments * _TAG_BYTES))
    view, target = memoryview(blob), memoryview(out)
    index = 0
    try:
        while True:
            last = len(blob) - pos <= sealed
            piece = view[pos : pos + sealed]
            size = len(piece) - _TAG_BYTES
            if size < 0:
                raise InvalidTag
            at = index * segment_bytes
            aead.decrypt_into(
                _segment_nonce(prefix, index, last), piece, key.encode(), target[at : at + size]
            )
            if last:
                if at + size != len(out):
                    raise InvalidTag
                return bytes(out)
            pos += sealed
            index += 1
    except (InvalidTag, ValueError) as exc:
        raise ObjectTampered(
            f"object {key} failed its AES-GCM integrity check (tampered, truncated or moved)"
        ) from exc


def open_sealed(ring: KeyRing, key: str, blob: bytes) -> bytes:
    """The plaintext of a sealed object. Anything else (a bad tag, a plain file, a frame cut
    or bent anywhere, a key id the ring does not hold) raises ObjectTampered, the one error
    the pipeline turns into an integrity failure of that instance alone."""
    if blob.startswith(MAGIC_STREAM):
        return _open_stream(ring, key, blob)
    if not blob.startswith(MAGIC):
        raise ObjectTampered(f"object {key} is not encrypted; refusing to serve it")
    kid, start = _kid(blob, key)
    if len(blob) < start + NONCE_BYTES + _TAG_BYTES:
        raise _malformed(key, "cut inside its nonce or tag")
    nonce = blob[start : start + NONCE_BYTES]
    aead = _aead(ring, key, kid)
    try:
        return aead.decrypt(nonce, memoryview(blob)[start + NONCE_BYTES :], key.encode())
    except (InvalidTag, ValueError) as exc:
        raise ObjectTampered(
            f"object {key} failed its AES-GCM integrity check (tampered or moved)"
        ) from exc


# Short secrets kept in the database (webhook signing secrets), sealed like objects: AES-GCM
# under the active key, bound to ``context`` (the row they belong to) as associated data.
SEALED_TEXT_PREFIX = "sealed:v1:"


def seal_text(ring: KeyRing, context: str, text: str) -> str:
    return SEALED_TEXT_PREFIX + base64.b64encode(seal(ring, context, text.encode())).decode()


def open_text(ring: KeyRing | None, context: str, value: str) -> str:
    """The text ``seal_text`` sealed for ``context``; a value without the prefix (stored
    before sealing, or by a deployment without keys) is returned as it is."""
    if not value.startswith(SEALED_TEXT_PREFIX):
        return value
    if ring is None:
        raise StorageError(f"{context}: sealed, and no encryption keys are configured")
    try:
        blob = base64.b64decode(value[len(SEALED_TEXT_PREFIX) :], validate=True)
    except binascii.Error as exc:
        raise ObjectTampered(f"{context}: sealed value is not base64") from exc
    return open_sealed(ring, context, blob).decode()


def key_id_of(blob: bytes) -> str | None:
    """The key id an object was sealed with, or None if it is not sealed."""
    if not blob.startswith((MAGIC, MAGIC_STREAM)):
        return None
    try:
        return _kid(blob, "")[0]
    except ObjectTampered:
        return None


class EncryptedStore:
    """An ObjectStore that seals on put and opens on get; everything else passes through."""

    def __init__(self, inner: ObjectStore, ring: KeyRing) -> None:
        self.inner = inner
        self.ring = ring

    def put(self, key: str, data: bytes, *, content_type: str = "application/octet-stream") -> None:
        self.inner.put(key, seal(self.ring, key, data), content_type="application/octet-stream")

    def put_stream(
        self, key: str, chunks: Iterable[bytes], *, content_type: str = "application/octet-stream"
    ) -> None:
        self.inner.put_stream(
            key, seal_stream(self.ring, key, chunks), content_type="application/octet-stream"
        )

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
