"""Log records of the DICOM libraries without the values they quote.

pydicom's warnings quote the offending value (``Invalid value for VR DA: '1975-03-14'``),
which may be a name, a birth date or an ID; they reach our logs as records of the
``pydicom`` logger and, once ``logging.captureWarnings`` is on, of ``py.warnings``. The
filter, on every root handler, replaces quoted text in those records by an ellipsis; our
own log lines never quote tag values in the first place.
"""

from __future__ import annotations

import logging
import re

# Quoted text, single or double quotes, with backslash escapes.
_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
# Loggers whose messages may quote a data set's values.
_LIBRARIES = ("pydicom", "py.warnings", "highdicom")
REDACTED = "'…'"


def redact(text: str) -> str:
    return _QUOTED.sub(REDACTED, text)


class PhiFilter(logging.Filter):
    """Redacts quoted values from the DICOM libraries' records (other records pass as is)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings" or record.name.split(".")[0] in _LIBRARIES:
            record.msg = redact(record.getMessage())
            record.args = ()
        return True


def install(root: logging.Logger | None = None) -> None:
    """Route warnings through logging and put the filter on every handler of ``root``."""
    logging.captureWarnings(True)
    for handler in (root or logging.getLogger()).handlers:
        if not any(isinstance(f, PhiFilter) for f in handler.filters):
            handler.addFilter(PhiFilter())
