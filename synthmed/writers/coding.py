"""The vocabulary's coded concepts as the DICOM SR and SEG writers write them, and back.

One mapping for both objects, so that a finding, its site and its severity read the same in the SR and the SEG:

- finding: the vocabulary's code (SNOMED CT where one exists, else DCM or 99SYNTHMED);
- location: a finding site, ``(anatomic location, laterality)``. Lobes and zones are their own codes, with the
  side they lie on as the laterality; a side alone (right, left, bilateral) is the chest, SCT 816094009, with
  that side (the vocabulary's code: Right 24028007, Left 7771000, Bilateral 51440002; DICOM CID 244) as
  laterality;
- severity: a qualitative evaluation, Severity (SCT 246112005) = mild / moderate / severe (the vocabulary's
  SNOMED CT codes).

Example:
    >>> site, side = finding_site("right_lower_lobe")
    >>> (site.system, site.code), side.display
    (('SCT', '266005'), 'Right')
    >>> location_of(*finding_site("bilateral")), location_of(*finding_site("right_lower_lobe"))
    ('bilateral', 'right_lower_lobe')
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from ..vocabulary import Code, Vocabulary, get_vocabulary

if TYPE_CHECKING:  # pragma: no cover
    from highdicom.sr import CodedConcept

CHEST = Code("SCT", "816094009", "Chest")
SEVERITY = Code("SCT", "246112005", "Severity")
FINDING_SITE = Code("SCT", "363698007", "Finding Site")
LATERALITY = Code("SCT", "272741003", "Laterality")


class UnknownCodeError(ValueError):
    """A code read from a DICOM object that synthmed's vocabulary does not have."""


def coded_concept(code: Code) -> "CodedConcept":
    """A vocabulary Code as a highdicom CodedConcept (Long Code Value for codes over 16 characters).

    Example:
        >>> coded_concept(Code("SCT", "60046008", "Pleural effusion")).value
        '60046008'
    """
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code.code, scheme_designator=code.system, meaning=code.display[:64])


def finding_site(location: str, vocab: Vocabulary | None = None) -> tuple[Code, Code | None]:
    """(anatomic location, laterality) of a vocabulary location; see the module docstring."""
    vocab = vocab or get_vocabulary()
    entry = vocab.locations[location]
    if entry.kind == "side":
        return CHEST, entry.code
    side = entry
    while side.kind != "side" and side.parent is not None:
        side = vocab.locations[side.parent]
    return entry.code, side.code if side.kind == "side" else None


def location_of(anatomic_location: Code | None, laterality: Code | None, vocab: Vocabulary | None = None) -> str:
    """The vocabulary location a finding site names: the inverse of :func:`finding_site`.

    Raises:
        UnknownCodeError: a code synthmed's vocabulary does not have.
    """
    codes = _codes(vocab or get_vocabulary())
    if anatomic_location is not None and _key(anatomic_location) == _key(CHEST):
        if laterality is None:
            raise UnknownCodeError("a finding site of the chest without laterality names no synthmed location")
        return _lookup(codes["location"], laterality, "location (laterality)")
    return _lookup(codes["location"], anatomic_location, "location")


def finding_of(code: Code, vocab: Vocabulary | None = None) -> str:
    """The vocabulary finding of a code (UnknownCodeError if none)."""
    return _lookup(_codes(vocab or get_vocabulary())["finding"], code, "finding")


def severity_of(code: Code, vocab: Vocabulary | None = None) -> str:
    """The vocabulary severity of a code (UnknownCodeError if none)."""
    return _lookup(_codes(vocab or get_vocabulary())["severity"], code, "severity")


def as_code(concept) -> Code:
    """A highdicom CodedConcept (or pydicom Code) as a vocabulary Code."""
    return Code(str(concept.scheme_designator), str(concept.value), str(concept.meaning))


def _key(code: Code) -> tuple[str, str]:
    return code.system, code.code


def _lookup(table: dict, code: Code | None, what: str) -> str:
    if code is None or _key(code) not in table:
        shown = "none" if code is None else f"({code.system}, {code.code}, {code.display!r})"
        raise UnknownCodeError(f"the {what} code {shown} is not in synthmed's vocabulary")
    return table[_key(code)]


@lru_cache(maxsize=4)
def _codes(vocab: Vocabulary) -> dict[str, dict[tuple[str, str], str]]:
    """code -> id for findings, locations and severities; a code two ids share would make reading ambiguous."""
    tables: dict[str, dict[tuple[str, str], str]] = {}
    for section, entries in (("finding", vocab.findings), ("location", vocab.locations),
                             ("severity", vocab.severities)):
        table: dict[tuple[str, str], str] = {}
        for key, entry in entries.items():
            if entry.code is None:
                continue
            other = table.setdefault(_key(entry.code), key)
            if other != key:
                raise ValueError(f"the vocabulary gives {section}s {other!r} and {key!r} the same code {entry.code}")
        tables[section] = table
    return tables
