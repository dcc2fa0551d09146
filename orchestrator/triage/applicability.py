"""Which model set an image is for: the rules declared beside each set's first model.

A model set is the chain of models one kind of image goes through (chest radiograph: triage,
then analysis). Its rules live in ``model_repository/<first model>/applicability.toml``, as
data, never in code:

```toml
set = "chest_xr"                      # the set's name (reports, metrics)
models = ["triage", "analysis"]       # run in this order
[rules]                               # every listed rule must hold; an unlisted rule is not checked
sop_classes = ["1.2.840.10008.5.1.4.1.1.1"]
modalities = ["CR", "DX"]
body_parts = ["CHEST"]
view_positions = ["AP", "PA"]
photometric = ["MONOCHROME1", "MONOCHROME2"]
age_years = { min = 1, max = 5 }
min_rows = 256
min_columns = 256
[when_absent]                         # a tag the rules need is missing or empty:
body_part = "warn"                    # accept | warn (accept, forces review) | reject
view_position = "warn"
age = "warn"
```

``evaluate`` reads (0008,0016) SOPClassUID, (0008,0060) Modality, (0018,0015)
BodyPartExamined, (0018,5101) ViewPosition, (0028,0004) PhotometricInterpretation,
(0010,1010) PatientAge, else (0010,0030) PatientBirthDate with (0008,0020) StudyDate, and
(0028,0010/0011) Rows/Columns. An image meets a set or it does not, with the failed rules in
words; an image that meets no set is ``not_applicable``, never "normal".
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from pydicom import Dataset

RULES_FILENAME = "applicability.toml"
# What to do when a tag a rule needs is absent or empty.
ACCEPT, WARN, REJECT = "accept", "warn", "reject"
_ABSENT_POLICIES = (ACCEPT, WARN, REJECT)
# The tags a [when_absent] policy may name (absent SOP class, modality, photometric or matrix
# size is always a failure: no image without them can be judged).
_ABSENT_KEYS = ("body_part", "view_position", "age")
_LIST_RULES = ("sop_classes", "modalities", "body_parts", "view_positions", "photometric")
_RULE_KEYS = (*_LIST_RULES, "age_years", "min_rows", "min_columns")
# The warning (preprocessing-warning style) an accepted-but-unknown tag leaves; the gate sends
# any instance that carries one to review.
UNKNOWN_WARNING = "{key}_unknown"
# Days per unit of (0010,1010) PatientAge ("nnnD/W/M/Y").
_AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
_AGE_RE = re.compile(r"^(\d{3})([DWMY])$")


class RulesError(Exception):
    """An applicability rule file that cannot be used: the message names the file and line."""


@dataclass(frozen=True)
class Verdict:
    set: str
    applicable: bool
    # Failed rules in words (empty when applicable).
    reasons: tuple[str, ...] = ()
    # Accepted with these warnings (e.g. body_part_unknown): the gate forces review.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelSet:
    name: str
    # Model names, in the order an image runs through them; the first is the set's triage model.
    models: tuple[str, ...]
    source: Path
    sop_classes: frozenset[str] = frozenset()
    modalities: frozenset[str] = frozenset()
    body_parts: frozenset[str] = frozenset()
    view_positions: frozenset[str] = frozenset()
    photometric: frozenset[str] = frozenset()
    age_min: float | None = None
    age_max: float | None = None
    min_rows: int = 0
    min_columns: int = 0
    when_absent: Mapping[str, str] = field(default_factory=dict)

    def evaluate(self, ds: Dataset) -> Verdict:
        reasons: list[str] = []
        warnings: list[str] = []

        def listed(rule: frozenset[str], value: str, what: str, absent_key: str | None) -> None:
            if not rule:
                return
            if not value:
                policy = self.when_absent.get(absent_key, REJECT) if absent_key else REJECT
                if policy == REJECT:
                    reasons.append(f"{what} is absent (needed: {', '.join(sorted(rule))})")
                elif policy == WARN:
                    warnings.append(UNKNOWN_WARNING.format(key=absent_key))
                return
            if value not in rule:
                reasons.append(f"{what} {value} is not one of {', '.join(sorted(rule))}")

        # The most telling rule first: a reader sees "Modality CT is not one of CR, DX" first.
        listed(self.modalities, _text(ds, "Modality").upper(), "Modality", None)
        listed(self.sop_classes, _text(ds, "SOPClassUID"), "SOP class", None)
        listed(
            self.body_parts, _text(ds, "BodyPartExamined").upper(), "BodyPartExamined", "body_part"
        )
        listed(
            self.view_positions, _text(ds, "ViewPosition").upper(), "ViewPosition", "view_position"
        )
        listed(
            self.photometric,
            _text(ds, "PhotometricInterpretation").upper(),
            "PhotometricInterpretation",
            None,
        )
        if self.age_min is not None or self.age_max is not None:
            age = patient_age_years(ds)
            if age is None:
                policy = self.when_absent.get("age", REJECT)
                if policy == REJECT:
                    reasons.append(f"patient age is unknown (needed: {self._age_range()})")
                elif policy == WARN:
                    warnings.append(UNKNOWN_WARNING.format(key="age"))
            elif (self.age_min is not None and age < self.age_min) or (
                self.age_max is not None and age > self.age_max
            ):
                reasons.append(f"patient age {age:.1f} years is outside {self._age_range()}")
        rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
        if rows < self.min_rows or cols < self.min_columns:
            reasons.append(
                f"matrix {rows}x{cols} is smaller than {self.min_rows}x{self.min_columns}"
            )
        return Verdict(
            self.name,
            not reasons,
            tuple(reasons),
            tuple(warnings) if not reasons else (),
        )

    def _age_range(self) -> str:
        lo = "0" if self.age_min is None else f"{self.age_min:g}"
        hi = "any" if self.age_max is None else f"{self.age_max:g}"
        return f"{lo}-{hi} years"


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - an unreadable value counts as absent
        return ""
    if value is None:
        return ""
    if not isinstance(value, str | bytes) and hasattr(value, "__iter__"):
        value = next(iter(value), "")
    return str(value).strip()


def _int(ds: Dataset, keyword: str) -> int:
    try:
        return int(ds.get(keyword, 0) or 0)
    except (TypeError, ValueError):
        return 0


def _date(text: str) -> date | None:
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8])) if len(text) >= 8 else None
    except ValueError:
        return None


def patient_age_years(ds: Dataset) -> float | None:
    """(0010,1010) PatientAge ("003Y", "018M", …), else StudyDate − PatientBirthDate."""
    match = _AGE_RE.match(_text(ds, "PatientAge").upper())
    if match:
        return int(match.group(1)) * _AGE_UNITS[match.group(2)]
    born, seen = _date(_text(ds, "PatientBirthDate")), _date(_text(ds, "StudyDate"))
    if born is None or seen is None or seen < born:
        return None
    return (seen - born).days / 365.25


def evaluate(sets: Iterable[ModelSet], ds: Dataset) -> list[Verdict]:
    """Every set's verdict on one image, in the sets' order."""
    return [s.evaluate(ds) for s in sets]


def not_applicable_reason(verdicts: list[Verdict]) -> str:
    """Why no set takes an image, in words: each set and its most telling failed rule (the
    rules are checked Modality first), e.g. "chest_xr: Modality CT is not one of CR, DX"."""
    if not verdicts:
        return "no model set is configured"
    return "; ".join(f"{v.set}: {v.reasons[0]}" for v in verdicts if v.reasons)


# --- loading -------------------------------------------------------------------------------


def _line_of(text: str, key: str) -> int:
    """The first line of ``text`` that assigns ``key`` (1-based; 1 when not found)."""
    pattern = re.compile(rf"^\s*\"?{re.escape(key)}\"?\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return 1


def _fail(path: Path, text: str, key: str, reason: str) -> RulesError:
    return RulesError(f"{path}:{_line_of(text, key)}: {reason}")


def _strings(path: Path, text: str, key: str, value: Any) -> frozenset[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(path, text, key, f"{key} must be a non-empty list of strings")
    return frozenset(v.strip().upper() if key != "sop_classes" else v.strip() for v in value)


def load_set(path: Path, known_models: Iterable[str]) -> ModelSet:
    """One rule file; ``RulesError`` (with file and line) for anything wrong in it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"{path}: cannot read: {exc}") from exc
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{path}: not valid TOML: {exc}") from exc
    unknown = sorted(set(doc) - {"set", "models", "rules", "when_absent"})
    if unknown:
        raise _fail(path, text, unknown[0], f"unknown key {unknown[0]!r}")
    name = doc.get("set")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", name):
        raise _fail(path, text, "set", "set must be a short lower-case name ([a-z][a-z0-9_]*)")
    models = doc.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise _fail(path, text, "models", "models must be a non-empty list of model names")
    known = set(known_models)
    missing = [m for m in models if m not in known]
    if missing:
        raise _fail(path, text, "models", f"models {missing} are not in the model repository")
    if models[0] != path.parent.name:
        raise _fail(
            path,
            text,
            "models",
            f"the first model must be this folder's model {path.parent.name!r}",
        )
    rules = doc.get("rules", {})
    if not isinstance(rules, dict) or not rules:
        raise _fail(path, text, "rules", "a [rules] table with at least one rule is required")
    bad = sorted(set(rules) - set(_RULE_KEYS))
    if bad:
        raise _fail(path, text, bad[0], f"unknown rule {bad[0]!r}; known: {', '.join(_RULE_KEYS)}")
    lists = {k: _strings(path, text, k, rules[k]) for k in _LIST_RULES if k in rules}
    age = rules.get("age_years")
    age_min = age_max = None
    if age is not None:
        if not isinstance(age, dict) or not set(age) <= {"min", "max"} or not age:
            raise _fail(path, text, "age_years", "age_years must be { min = N, max = N }")
        for bound in age.values():
            if not isinstance(bound, int | float) or bound < 0:
                raise _fail(path, text, "age_years", "age bounds must be numbers >= 0")
        age_min, age_max = age.get("min"), age.get("max")
        if age_min is not None and age_max is not None and age_min > age_max:
            raise _fail(path, text, "age_years", "age_years min is above max")
    sizes = {}
    for key in ("min_rows", "min_columns"):
        value = rules.get(key, 0)
        if not isinstance(value, int) or value < 0:
            raise _fail(path, text, key, f"{key} must be an integer >= 0")
        sizes[key] = value
    absent = doc.get("when_absent", {})
    if not isinstance(absent, dict):
        raise _fail(path, text, "when_absent", "when_absent must be a table")
    for key, policy in absent.items():
        if key not in _ABSENT_KEYS:
            raise _fail(path, text, key, f"when_absent.{key}: known keys {', '.join(_ABSENT_KEYS)}")
        if policy not in _ABSENT_POLICIES:
            raise _fail(path, text, key, f"when_absent.{key} must be accept, warn or reject")
    return ModelSet(
        name=name,
        models=tuple(models),
        source=path,
        age_min=None if age_min is None else float(age_min),
        age_max=None if age_max is None else float(age_max),
        when_absent=dict(absent),
        sop_classes=lists.get("sop_classes", frozenset()),
        modalities=lists.get("modalities", frozenset()),
        body_parts=lists.get("body_parts", frozenset()),
        view_positions=lists.get("view_positions", frozenset()),
        photometric=lists.get("photometric", frozenset()),
        min_rows=sizes["min_rows"],
        min_columns=sizes["min_columns"],
    )


def load_sets(repo: Path, known_models: Iterable[str]) -> list[ModelSet]:
    """Every rule file of a repository, by folder name; a model in two sets is refused."""
    known = tuple(known_models)
    sets = [
        load_set(p / RULES_FILENAME, known)
        for p in sorted(repo.iterdir())
        if (p / RULES_FILENAME).is_file()
    ]
    seen: dict[str, str] = {}
    for s in sets:
        if s.name in seen.values():
            raise RulesError(f"{s.source}: set name {s.name!r} is used twice")
        for m in s.models:
            if m in seen:
                raise RulesError(f"{s.source}: model {m!r} is already in set {seen[m]!r}")
            seen[m] = s.name
    return sets
