"""Pure DICOM preprocessing: bytes / Dataset in, model tensors and JPEG previews out.

No database, network, object store or inference server is touched here.
"""

from preprocess.errors import (
    DecodeError,
    DecoderCrashedError,
    DecodeTimeoutError,
    ImageTooLargeError,
    MalformedImageError,
    NoPixelDataError,
    NotAnImageError,
    NotDicomError,
    PreprocessError,
    TruncatedError,
    UnsupportedTransferSyntaxError,
)
from preprocess.pipeline import Preprocessed, PreprocessSpec, preprocess
from preprocess.reader import DEFAULT_MAX_PIXELS, check_image, read_dicom, read_header

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DecodeError",
    "DecodeTimeoutError",
    "DecoderCrashedError",
    "ImageTooLargeError",
    "MalformedImageError",
    "NoPixelDataError",
    "NotAnImageError",
    "NotDicomError",
    "PreprocessError",
    "Preprocessed",
    "PreprocessSpec",
    "TruncatedError",
    "UnsupportedTransferSyntaxError",
    "check_image",
    "preprocess",
    "read_dicom",
    "read_header",
]
