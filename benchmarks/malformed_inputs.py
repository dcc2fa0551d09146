"""The bad inputs of ``benchmarks.malformed``: built in memory, deterministically (fixed seeds,
UIDs derived from the case name), from

- the odd and malformed files among pydicom's test files and ``../shared/data/dicom`` (read
  where they lie at run time, never copied);
- mutations of good synthetic files (``orchestrator.samples.radiograph``): truncation at many
  offsets, byte flips in the header and in the pixel data, wrong / oversized element lengths
  written into the raw bytes, the transfer syntax UID swapped;
- hand-made bombs: huge declared images and frame counts, nonsense BitsAllocated /
  SamplesPerPixel, deflated data sets that inflate to gigabytes, sequences nested thousands
  deep, zip bombs, and bytes that are not DICOM at all.
"""

from __future__ import annotations

import io
import os
import random
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_files
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

import preprocess as pp
from orchestrator.samples import load_samples, radiograph
from orchestrator.settings import REPO_ROOT

SHARED_DICOM = REPO_ROOT.parent / "shared" / "data" / "dicom"
SEED = 20261128
# Good files are small, so the accepted ones are processed quickly.
GOOD_SIZE = 64
# What the deflate and zip bombs inflate to.
BOMB_BYTES = 2 * 1024**3
ZIP_BOMB_BYTES = 1024**3
# Names that mark a test file as odd on purpose (in pydicom's set).
_ODD_NAMES = (
    "no_meta",
    "NoMeta",
    "truncated",
    "badVR",
    "missing",
    "nested",
    "UN_sequence",
    "image_dfl",
    "mismatch",
    "delimiter",
    "odd",
    "empty",
    "DICOMDIR",
    "README",
    ".json",
    ".gz",
    ".dump",
    ".icc",
)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
_LONG_VRS |= {b"UV"}
_PIXEL_TAG = b"\xe0\x7f\x10\x00"


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    data: bytes
    # A zip archive (sent as is to the zip path, not wrapped).
    is_zip: bool = False


def _uid(name: str, what: str) -> str:
    return str(generate_uid(entropy_srcs=[f"medtriage-malformed/{name}/{what}"]))


def _save(ds: pydicom.Dataset, *, implicit: bool = False, big: bool = False) -> bytes:
    buf = io.BytesIO()
    if implicit or big:
        ds.save_as(buf, implicit_vr=implicit, little_endian=not big, enforce_file_format=True)
    else:
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def good_dataset(name: str, size: int = GOOD_SIZE) -> pydicom.Dataset:
    """A synthetic radiograph whose UIDs and dates derive from ``name`` (same bytes each run)."""
    images, _ = load_samples()
    image = images[sum(name.encode()) % len(images)]
    ds = pydicom.dcmread(io.BytesIO(radiograph(image, study_uid=_uid(name, "study"), size=size)))
    ds.SeriesInstanceUID = _uid(name, "series")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(name, "sop")
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    return ds


def good_file(name: str, size: int = GOOD_SIZE) -> bytes:
    return _save(good_dataset(name, size))


# --- raw-byte helpers (explicit VR little endian) -------------------------------------------


@dataclass(frozen=True)
class _Element:
    offset: int
    tag: int
    vr: bytes
    length_offset: int
    length_size: int
    length: int
    value_offset: int


def _elements(raw: bytes, start: int = 132) -> Iterator[_Element]:
    """Top-level elements of an explicit VR LE file, meta included; stops at undefined length."""
    pos = start
    while pos + 8 <= len(raw):
        group, elem = struct.unpack_from("<HH", raw, pos)
        vr = raw[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", raw, pos + 8)[0]
            el = _Element(pos, group << 16 | elem, vr, pos + 8, 4, length, pos + 12)
        else:
            length = struct.unpack_from("<H", raw, pos + 6)[0]
            el = _Element(pos, group << 16 | elem, vr, pos + 6, 2, length, pos + 8)
        yield el
        if length == 0xFFFFFFFF:
            return
        pos = el.value_offset + length


def _with_length(raw: bytes, el: _Element, length: int) -> bytes:
    fmt = "<I" if el.length_size == 4 else "<H"
    length &= 0xFFFFFFFF if el.length_size == 4 else 0xFFFF
    return (
        raw[: el.length_offset]
        + struct.pack(fmt, length)
        + raw[el.length_offset + el.length_size :]
    )


def _with_meta(raw: bytes, tag: int, value: bytes) -> bytes:
    """``raw`` with one file-meta element's value replaced and (0002,0000) recomputed."""
    meta = [e for e in _elements(raw) if e.tag >> 16 == 2]
    end = meta[-1].value_offset + meta[-1].length
    body = b""
    for e in meta[1:]:
        if e.tag == tag:
            value += b"\0" * (len(value) % 2)
            body += raw[e.offset : e.offset + 6] + struct.pack("<H", len(value)) + value
        else:
            body += raw[e.offset : e.value_offset + e.length]
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(body))
    return raw[:132] + group_length + body + raw[end:]


def _meta_end(raw: bytes) -> int:
    meta = [e for e in _elements(raw) if e.tag >> 16 == 2]
    return meta[-1].value_offset + meta[-1].length


# --- families --------------------------------------------------------------------------------


def _reference_files() -> Iterator[Case]:
    """The odd ones among pydicom's test files and ../shared/data/dicom (failing our own read and
    check, failing to decode per the shared manifest, or odd by name)."""
    import warnings

    warnings.simplefilter("ignore")
    bundled = sorted(f for f in get_testdata_files() if os.path.isfile(f))
    undecodable = set()
    manifest = SHARED_DICOM / "manifest.tsv"
    for line in manifest.read_text().splitlines()[1:]:
        cols = line.split("\t")
        if cols[11] != "ok":
            undecodable.add(cols[0])
    shared = sorted(p for p in SHARED_DICOM.rglob("*") if p.is_file() and p.suffix != ".tsv")
    seen: set[bytes] = set()
    for path in [Path(f) for f in bundled] + shared:
        rel = str(path.relative_to(SHARED_DICOM)) if SHARED_DICOM in path.parents else path.name
        data = path.read_bytes()
        odd = any(mark in path.name for mark in _ODD_NAMES) or rel in undecodable
        if not odd:
            try:
                ds = pp.read_dicom(data)
                pp.check_image(ds)
            except Exception:  # noqa: BLE001 - any refusal makes it a malformed input
                odd = True
        if odd and data not in seen:
            seen.add(data)
            source = "shared" if SHARED_DICOM in path.parents else "pydicom"
            yield Case(f"{source}:{rel}", f"reference:{source}", data)


def _truncations(rng: random.Random) -> Iterator[Case]:
    for kind, ts in (("raw", None), ("rle", RLELossless)):
        for i in range(30):
            name = f"truncate-{kind}-{i}"
            ds = good_dataset(name)
            if ts is not None:
                ds.compress(ts)
            raw = _save(ds)
            # Spread over the file: preamble, meta, header, pixel data, last bytes.
            cut = [0, 1, 64, 128, 131, 132, 133, 140][i] if i < 8 else rng.randrange(140, len(raw))
            if i == 29:
                cut = len(raw) - 1
            yield Case(f"{name}@{cut}", "mutation:truncate", raw[:cut])


def _byte_flips(rng: random.Random) -> Iterator[Case]:
    for i in range(50):
        name = f"flip-header-{i}"
        raw = good_file(name)
        pixel = raw.rindex(_PIXEL_TAG)
        data = bytearray(raw)
        for _ in range(1 + i % 4):
            pos = rng.randrange(128, pixel)
            data[pos] ^= 1 << rng.randrange(8)
        yield Case(name, "mutation:flip-header", bytes(data))
    for i in range(25):
        kind = "raw" if i < 10 else "rle"
        name = f"flip-pixels-{kind}-{i}"
        ds = good_dataset(name)
        if kind == "rle":
            ds.compress(RLELossless)
        raw = _save(ds)
        pixel = raw.rindex(_PIXEL_TAG)
        data = bytearray(raw)
        for _ in range(1 + i % 8):
            pos = rng.randrange(pixel + 12, len(raw))
            data[pos] = rng.randrange(256)
        yield Case(name, "mutation:flip-pixels", bytes(data))


def _lengths(rng: random.Random) -> Iterator[Case]:
    """Element length fields rewritten in the raw bytes: undefined, huge, off by one, odd."""
    variants: list[tuple[str, Callable[[int], int]]] = [
        ("undefined", lambda n: 0xFFFFFFFF),
        ("huge", lambda n: 0x7FFFFFF0),
        ("plus-one", lambda n: n + 1),
        ("times-1000", lambda n: max(n, 1) * 1000),
    ]
    base = good_file("lengths-probe")
    tags = [e.tag for e in _elements(base)]
    picks = [t for t in tags if t >> 16 != 0x7FE0][:: max(1, len(tags) // 14)] + [0x7FE00010]
    for tag in picks:
        for label, change in variants:
            name = f"length-{tag:08x}-{label}"
            raw = good_file(name)
            el = next(e for e in _elements(raw) if e.tag == tag)
            yield Case(name, "mutation:length", _with_length(raw, el, change(el.length)))
    del rng


def _syntax_swaps() -> Iterator[Case]:
    swaps = {
        "implicit-le": ImplicitVRLittleEndian,
        "explicit-be": ExplicitVRBigEndian,
        "deflated": DeflatedExplicitVRLittleEndian,
        "jpeg-baseline": JPEGBaseline8Bit,
        "j2k-lossless": JPEG2000Lossless,
        "rle": RLELossless,
        "jpeg-ls": "1.2.840.10008.1.2.4.80",
        "mpeg2": "1.2.840.10008.1.2.4.100",
        "htj2k": "1.2.840.10008.1.2.4.201",
        "unknown": "1.2.3.4.5.6.7",
        "empty": "",
        "not-a-uid": "hello, world",
        "private-ge": "1.2.840.113619.5.2",
    }
    for label, uid in swaps.items():
        name = f"syntax-{label}"
        yield Case(name, "mutation:syntax", _with_meta(good_file(name), 0x00020010, uid.encode()))
    # The other way round: a compressed data set that claims to be uncompressed.
    ds = good_dataset("syntax-rle-as-raw")
    ds.compress(RLELossless)
    raw = _save(ds)
    for label, uid in (
        ("explicit-le", ExplicitVRLittleEndian),
        ("implicit", ImplicitVRLittleEndian),
    ):
        name = f"syntax-rle-as-{label}"
        yield Case(name, "mutation:syntax", _with_meta(raw, 0x00020010, uid.encode()))


def _image(name: str, pixels: bytes | None = None, ts: str | None = None, **tags: object) -> bytes:
    ds = good_dataset(name)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    if ts is not None:
        ds.file_meta.TransferSyntaxUID = ts
        ds.PixelData = encapsulate([pixels if pixels is not None else b"\xff\xd8junk\xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    elif pixels is not None:
        ds.PixelData = pixels
    return _save(ds)


def _bombs() -> Iterator[Case]:
    little = b"\0" * 128
    for rows, cols in ((65535, 65535), (20000, 20000), (1, 65535), (65535, 1)):
        yield Case(
            f"declared-{rows}x{cols}",
            "bomb:size",
            _image(f"size-{rows}", little, Rows=rows, Columns=cols),
        )
        name = f"declared-{rows}x{cols}-rle"
        yield Case(
            name, "bomb:size", _image(name, b"\0" * 64, RLELossless, Rows=rows, Columns=cols)
        )
        name = f"declared-{rows}x{cols}-jpeg"
        yield Case(name, "bomb:size", _image(name, None, JPEGBaseline8Bit, Rows=rows, Columns=cols))
    for frames in (2, 1000, 90000, 1_000_000, 2**31 - 1, 0, -1):
        name = f"frames-{frames}"
        yield Case(name, "bomb:frames", _image(name, little, NumberOfFrames=frames))
        name = f"frames-{frames}-rle"
        yield Case(
            name, "bomb:frames", _image(name, b"\0" * 64, RLELossless, NumberOfFrames=frames)
        )
    for bits in (0, 1, 7, 13, 32, 64, 255, 65535):
        name = f"bits-allocated-{bits}"
        yield Case(name, "bomb:attributes", _image(name, BitsAllocated=bits))
    for stored, high in ((0, 0), (17, 16), (16, 40), (12, 0)):
        name = f"bits-stored-{stored}-high-{high}"
        yield Case(name, "bomb:attributes", _image(name, BitsStored=stored, HighBit=high))
    for samples in (0, 2, 3, 4, 255, 65535):
        name = f"samples-{samples}"
        yield Case(name, "bomb:attributes", _image(name, SamplesPerPixel=samples))
    for photometric in ("PALETTE COLOR", "YBR_FULL_422", "RGB", "NONSENSE", ""):
        name = f"photometric-{photometric or 'empty'}"
        yield Case(name, "bomb:attributes", _image(name, PhotometricInterpretation=photometric))
    for label, tags in {
        "pixelrep-7": {"PixelRepresentation": 7},
        "planar-5": {"PlanarConfiguration": 5},
        "rows-0": {"Rows": 0},
        "window-nan": {"WindowCenter": "NaN", "WindowWidth": "0"},
        "slope-inf": {"RescaleSlope": "1e999", "RescaleIntercept": "-1e999"},
        "slope-0": {"RescaleSlope": "0"},
        "no-study-uid": {"StudyInstanceUID": ""},
    }.items():
        yield Case(f"attr-{label}", "bomb:attributes", _image(f"attr-{label}", **tags))
    yield from _deflate_bombs()
    yield from _nested()


def _deflate_bombs() -> Iterator[Case]:
    """Deflated Explicit VR LE (1.2.840.10008.1.2.1.99) files whose few-MB body inflates to GBs."""
    ds = good_dataset("deflate-good")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    raw = _save(ds)
    end = _meta_end(raw)
    yield Case("deflate-good", "bomb:deflate", raw)
    header = raw[:end]

    def deflated(prefix: bytes, zeros: int) -> bytes:
        co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        out = [co.compress(prefix)]
        chunk = bytes(1 << 22)
        for _ in range(zeros // len(chunk)):
            out.append(co.compress(chunk))
        out.append(co.flush())
        return b"".join(out)

    zeros = deflated(b"", BOMB_BYTES)
    yield Case("deflate-bomb-zeros-2GiB", "bomb:deflate", header + zeros)
    plain = _save(good_dataset("deflate-bomb-pixels"))
    body = plain[_meta_end(plain) : plain.rindex(_PIXEL_TAG)]
    pixel_header = _PIXEL_TAG + b"OW\0\0" + struct.pack("<I", BOMB_BYTES)
    name = "deflate-bomb-pixeldata-2GiB"
    yield Case(name, "bomb:deflate", header + deflated(body + pixel_header, BOMB_BYTES))
    yield Case("deflate-bomb-truncated", "bomb:deflate", header + zeros[: len(zeros) // 2])
    yield Case("deflate-garbage", "bomb:deflate", header + bytes(range(256)) * 64)
    small = deflated(body, 256 * 1024**2)
    yield Case("deflate-bomb-zeros-256MiB", "bomb:deflate", header + small)


def _nested() -> Iterator[Case]:
    """ContentSequence (0040,A730) nested thousands deep, before the pixel data."""
    sq = b"\x40\x00\x30\xa7SQ\0\0\xff\xff\xff\xff"
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    item_end = b"\xfe\xff\x0d\xe0\0\0\0\0"
    sq_end = b"\xfe\xff\xdd\xe0\0\0\0\0"
    for depth in (100, 1000, 3000, 10000, 100000):
        for closed in (True, False):
            name = f"nested-{depth}{'' if closed else '-unterminated'}"
            raw = good_file(name)
            at = raw.rindex(_PIXEL_TAG)
            nest = (sq + item) * depth + ((item_end + sq_end) * depth if closed else b"")
            yield Case(name, "bomb:nested", raw[:at] + nest + raw[at:])
    # Defined lengths, inside out.
    for depth in (1000, 10000):
        name = f"nested-defined-{depth}"
        inner = b""
        for _ in range(depth):
            inner = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(inner)) + inner
            inner = b"\x40\x00\x30\xa7SQ\0\0" + struct.pack("<I", len(inner)) + inner
        raw = good_file(name)
        at = raw.rindex(_PIXEL_TAG)
        yield Case(name, "bomb:nested", raw[:at] + inner + raw[at:])
    # Implicit VR: no VR to say it is a sequence; undefined length makes pydicom parse one.
    ds = good_dataset("nested-implicit-5000")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    raw = _save(ds, implicit=True)
    at = raw.rindex(_PIXEL_TAG)
    nest = (b"\x40\x00\x30\xa7\xff\xff\xff\xff" + item) * 5000 + (item_end + sq_end) * 5000
    yield Case("nested-implicit-5000", "bomb:nested", raw[:at] + nest + raw[at:])


def _zip_bombs() -> Iterator[Case]:
    def make(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", method) as zf:
            for name, data in members:
                zf.writestr(name, data)
        return buf.getvalue()

    buf = io.BytesIO()
    with (
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf,
        zf.open("bomb.dcm", "w", force_zip64=True) as member,
    ):
        chunk = bytes(1 << 22)
        for _ in range(ZIP_BOMB_BYTES // len(chunk)):
            member.write(chunk)
    bomb = buf.getvalue()
    yield Case("zip-bomb-1GiB-member", "bomb:zip", bomb, is_zip=True)
    # The same bomb with its sizes rewritten small in both headers: only inflating tells.
    liar = bytearray(bomb)
    for sig, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = liar.find(sig)
        liar[at + size_at : at + size_at + 4] = struct.pack("<I", 1000)
    yield Case("zip-bomb-lying-sizes", "bomb:zip", bytes(liar), is_zip=True)
    yield Case("zip-in-zip-bomb", "bomb:zip", make([("inner.zip", bomb)]), is_zip=True)
    many = make([(f"f{i}.dcm", b"x") for i in range(25000)], zipfile.ZIP_STORED)
    yield Case("zip-25000-members", "bomb:zip", many, is_zip=True)
    good = good_file("zip-traversal")
    names = [("../../etc/passwd.dcm", good), ("/abs/x.dcm", b"not dicom"), ("a\0b.dcm", b"x")]
    yield Case("zip-path-traversal", "bomb:zip", make(names), is_zip=True)
    yield Case("zip-truncated", "bomb:zip", make([("a.dcm", good)])[:-30], is_zip=True)
    yield Case("zip-empty", "bomb:zip", make([]), is_zip=True)
    bad_crc = bytearray(make([("a.dcm", good_file("zip-bad-crc"))], zipfile.ZIP_STORED))
    bad_crc[14] ^= 0xFF
    yield Case("zip-bad-crc", "bomb:zip", bytes(bad_crc), is_zip=True)
    encrypted = bytearray(make([("a.dcm", good_file("zip-encrypted"))]))
    encrypted[6] |= 1
    encrypted[encrypted.find(b"PK\x01\x02") + 8] |= 1
    yield Case("zip-encrypted-flag", "bomb:zip", bytes(encrypted), is_zip=True)


def _not_dicom(rng: random.Random) -> Iterator[Case]:
    jpeg = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffd9")
    pdf = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    cases = {
        "empty": b"",
        "one-byte": b"\0",
        "text": b"hello, this is not DICOM\n" * 40,
        "json": b'{"StudyInstanceUID": "1.2.3"}',
        "html": b"<html><body>nope</body></html>",
        "jpeg": jpeg,
        "pdf": pdf,
        "png": b"\x89PNG\r\n\x1a\n" + bytes(64),
        "gzip": zlib.compress(b"x" * 1000),
        "dicm-only": b"DICM",
        "preamble-dicm": bytes(128) + b"DICM",
        "preamble-dicm-garbage": bytes(128) + b"DICM" + b"\xff" * 512,
        "zeros-4k": bytes(4096),
        "ff-4k": b"\xff" * 4096,
        "utf16-bom": "\ufeffnot dicom".encode("utf-16"),
    }
    for label, data in cases.items():
        yield Case(f"not-dicom-{label}", "not-dicom", data)
    for i in range(10):
        size = rng.choice([16, 132, 500, 4096, 65536])
        data = bytes(rng.randrange(256) for _ in range(size))
        yield Case(f"not-dicom-random-{i}", "not-dicom", data)
        yield Case(f"not-dicom-random-dicm-{i}", "not-dicom", bytes(128) + b"DICM" + data)
    # A good header followed by megabytes of zero-length elements (tag 0, length 0).
    raw = good_file("zero-tail")
    yield Case(
        "zero-element-tail-8MiB", "not-dicom", raw[: raw.rindex(_PIXEL_TAG)] + bytes(8 << 20)
    )


# UID values that break PS3.5 9.1 (issue 15): each in each of the three identifying UIDs.
_BAD_UIDS = {
    "empty": "",
    "script": "<script>alert(1)</script>",
    "text": "study one",
    "leading-zero": "1.2.03.4",
    "empty-component": "1.2..3",
    "trailing-dot": "1.2.3.",
    "too-long": "1." + "2" * 70,
}


def _identity() -> Iterator[Case]:
    """Identity and coded-value shapes: invalid UIDs, free-text codes, and pairs sent in
    order — another patient's instance in a study, the same SOPInstanceUID with other
    content — whose second file must be refused as a conflict."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        for label, value in _BAD_UIDS.items():
            ds = good_dataset(f"identity-{keyword}-{label}")
            ds[keyword].value = value  # bypasses pydicom's own validation of UI values
            yield Case(f"{keyword}-{label}", "identity", _save(ds))
    for label, tags in (
        ("modality-markup", {"Modality": "<b>CT</b>"}),
        ("modality-lower", {"Modality": "cr"}),  # normalised, accepted
        ("photometric-unknown", {"PhotometricInterpretation": "GREEN"}),
    ):
        ds = good_dataset(f"identity-{label}")
        for keyword, value in tags.items():
            ds[keyword].value = value
        yield Case(label, "identity", _save(ds))
    first = good_dataset("identity-patient-a")
    first.PatientID = "IDENTITY-A"
    second = good_dataset("identity-patient-b")
    second.StudyInstanceUID, second.PatientID = first.StudyInstanceUID, "IDENTITY-B"
    yield Case("patient-a", "identity", _save(first))
    yield Case("patient-b-same-study", "identity", _save(second))
    original = good_dataset("identity-sop-original")
    other = good_dataset("identity-sop-other")
    other.PixelData = bytes(255 - b for b in other.PixelData)  # other pixels for certain
    other.StudyInstanceUID, other.SeriesInstanceUID = (
        original.StudyInstanceUID,
        original.SeriesInstanceUID,
    )
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = original.SOPInstanceUID
    yield Case("sop-original", "identity", _save(original))
    yield Case("sop-same-uid-other-pixels", "identity", _save(other))


def build(seed: int = SEED) -> list[Case]:
    """Every case, distinct by content; same bytes on every run."""
    rng = random.Random(seed)
    np.random.seed(seed)
    cases: list[Case] = []
    for family in (
        _reference_files(),
        _truncations(rng),
        _byte_flips(rng),
        _lengths(rng),
        _syntax_swaps(),
        _bombs(),
        _zip_bombs(),
        _not_dicom(rng),
        _identity(),
    ):
        cases.extend(family)
    unique: dict[bytes, Case] = {}
    for case in cases:
        unique.setdefault(case.data, case)
    return list(unique.values())


if __name__ == "__main__":
    import collections
    import time

    t0 = time.perf_counter()
    built = build()
    print(len(built), f"{time.perf_counter() - t0:.1f}s")
    print(collections.Counter(c.family for c in built))
