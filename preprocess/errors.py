"""Errors of ``preprocess``: every failure is one of these, with a stable category.

Tree::

    PreprocessError (422)                          category
    ├── NotDicomError (415)                        not_dicom
    ├── NoPixelDataError (422)                     no_pixel_data
    ├── NotAnImageError (422)                      not_an_image   (SR, RT plan, PDF, ...)
    ├── MalformedImageError (422)                  malformed      (missing/inconsistent image tags)
    ├── ImageTooLargeError (413)                   too_large      (refused before decoding)
    ├── UnsupportedTransferSyntaxError (422)       unsupported_transfer_syntax
    ├── TruncatedError (422)                       truncated
    └── DecodeError (422)                          decode_failed
        ├── DecodeTimeoutError (422)               decode_timeout   (stopped by the sandbox)
        └── DecoderCrashedError (422)              decoder_crashed  (codec crash / memory limit)

pydicom's and the codecs' exceptions are translated once, where they are raised, with
``raise ... from exc``; callers catch ``PreprocessError`` only.
"""

from __future__ import annotations


class PreprocessError(Exception):
    category = "preprocess_failed"
    http_status = 422

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotDicomError(PreprocessError):
    category = "not_dicom"
    http_status = 415


class NoPixelDataError(PreprocessError):
    category = "no_pixel_data"


class NotAnImageError(PreprocessError):
    category = "not_an_image"


class MalformedImageError(PreprocessError):
    category = "malformed"


class ImageTooLargeError(PreprocessError):
    category = "too_large"
    http_status = 413


class UnsupportedTransferSyntaxError(PreprocessError):
    category = "unsupported_transfer_syntax"


class TruncatedError(PreprocessError):
    category = "truncated"


class DecodeError(PreprocessError):
    category = "decode_failed"


class DecodeTimeoutError(DecodeError):
    category = "decode_timeout"


class DecoderCrashedError(DecodeError):
    category = "decoder_crashed"
