"""Zip archives of DICOM files: members read with size limits, never extracted to disk.

A zip of a study is a convenience format (PACS exports, CD copies). Members are read in
memory with both the declared and the actual uncompressed size bounded, so a zip bomb is
refused before it inflates. Directory entries and operating-system litter (``__MACOSX/``,
``.DS_Store``, ``Thumbs.db``) are skipped; a ``DICOMDIR`` index is skipped too (it lists
files, it is not an instance). Anything else that cannot be read is reported per member.
"""

from __future__ import annotations

import io
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from orchestrator.errors import BadRequest, PayloadTooLarge

# Members beyond this many are refused as a whole (a study of 10k slices still fits).
DEFAULT_MAX_MEMBERS = 20_000
# Members inflating to more than this go to a file (when the caller gives a folder).
TO_DISK_ABOVE_BYTES = 16 * 1024 * 1024
# Read members in chunks of this size so the running total is checked while inflating.
_CHUNK = 1 << 20
LITTER_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}
ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"


@dataclass
class Unpacked:
    files: list[tuple[str, bytes | Path]] = field(default_factory=list)
    # (member name, reason) for members that could not be read.
    rejected: list[tuple[str, str]] = field(default_factory=list)


def is_zip(data: bytes) -> bool:
    return data[:4] in (ZIP_MAGIC, EMPTY_ZIP_MAGIC)


def skipped(info: zipfile.ZipInfo) -> bool:
    path = PurePosixPath(info.filename)
    if info.is_dir() or "__MACOSX" in path.parts:
        return True
    return path.name in LITTER_NAMES or path.name.startswith("._") or path.name == "DICOMDIR"


def unpack(
    data: bytes | Path,
    *,
    name: str = "upload.zip",
    max_bytes: int,
    max_members: int = DEFAULT_MAX_MEMBERS,
    spool: Path | None = None,
) -> Unpacked:
    """The DICOM candidates in a zip (in memory or a file). Members larger than
    TO_DISK_ABOVE_BYTES are inflated into files under ``spool`` when given. Raises BadRequest
    for a corrupt archive and PayloadTooLarge when the members together inflate beyond
    ``max_bytes``."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise BadRequest(f"{name}: not a readable zip archive ({exc})") from exc
    out = Unpacked()
    with archive:
        members = [info for info in archive.infolist() if not skipped(info)]
        if len(members) > max_members:
            raise PayloadTooLarge(
                f"{name}: {len(members)} members exceed the limit of {max_members}; "
                "split the archive"
            )
        declared = sum(info.file_size for info in members)
        if declared > max_bytes:
            raise PayloadTooLarge(
                f"{name}: members declare {declared} bytes uncompressed, over the "
                f"{max_bytes}-byte limit"
            )
        total = 0
        for info in members:
            label = f"{name}/{info.filename}"
            if info.flag_bits & 0x1:
                out.rejected.append((label, "encrypted zip member; send it unencrypted"))
                continue
            to_disk = spool is not None and info.file_size > TO_DISK_ABOVE_BYTES
            target = spool / f"member-{uuid.uuid4().hex}" if spool is not None else None
            try:
                buf = bytearray()
                with archive.open(info) as fh, _sink(target if to_disk else None) as sink:
                    # Declared sizes can lie: count what actually inflates.
                    while chunk := fh.read(_CHUNK):
                        total += len(chunk)
                        if total > max_bytes:
                            raise PayloadTooLarge(
                                f"{name}: members inflate beyond the {max_bytes}-byte limit"
                            )
                        if sink is None:
                            buf += chunk
                        else:
                            sink.write(chunk)
            except PayloadTooLarge:
                raise
            except (zipfile.BadZipFile, zlib.error, NotImplementedError, OSError, EOFError) as exc:
                out.rejected.append((label, f"unreadable zip member ({exc})"))
                continue
            if to_disk and target is not None:
                out.files.append((label, target))
            else:
                out.files.append((label, bytes(buf)))
    return out


@contextmanager
def _sink(path: Path | None) -> Iterator[BinaryIO | None]:
    if path is None:
        yield None
        return
    with path.open("wb") as fh:
        yield fh
