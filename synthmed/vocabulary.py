"""Findings, locations, severities, views and sexes: their codes, rules and synonyms.

The data lives in ``schemas/vocabulary.yaml``; this module loads it once and answers
questions about it: what a word means, which locations a finding admits, how a location
projects onto a coarser one (right lower lobe -> right lower zone -> right), and where a
location shows on a frontal or a lateral film.

Example:
    >>> vocab = get_vocabulary()
    >>> vocab.resolve("finding", "Pleural Effusions")
    'pleural_effusion'
    >>> vocab.resolve("location", "右下肺叶")
    'right_lower_lobe'
    >>> vocab.project_location("right_lower_lobe", "pleural_effusion")
    'right'
    >>> vocab.view_region("right_lower_lobe", "LL")
    ViewRegion(height='lower', across='posterior')
"""

from __future__ import annotations

import difflib
import functools
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

# The 14 CheXpert observations, named and ordered exactly as in CheXpert's train.csv.
CHEXPERT_COLUMNS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
SECTIONS = ("finding", "location", "severity", "view", "sex")
LOCATION_KINDS = ("lobe", "zone", "side")
PROJECTIONS = ("frontal", "lateral")
# What "across" means per projection: the side on a frontal film, the depth on a lateral one.
REGION_HEIGHTS = ("upper", "middle", "lower", "whole")
REGION_ACROSS = {"frontal": ("right", "left", "bilateral"), "lateral": ("anterior", "posterior", "whole")}


def schemas_dir() -> Path:
    """The folder holding the JSON Schema and vocabulary (inside the wheel, or at the repository top)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "schemas", here.parent / "schemas"):
        if (candidate / "vocabulary.yaml").is_file():
            return candidate
    raise FileNotFoundError("synthmed's schemas/ folder is missing from this installation")


@dataclass(frozen=True)
class Code:
    """A coded concept, e.g. ``Code("SCT", "60046008", "Pleural effusion")``."""

    system: str
    code: str
    display: str

    def __str__(self) -> str:
        return f"{self.system}:{self.code}"


@dataclass(frozen=True)
class Term:
    """One vocabulary entry of any section."""

    id: str
    section: str
    text: str
    code: Code | None
    synonyms: tuple[str, ...]


@dataclass(frozen=True)
class Finding(Term):
    chexpert: str = ""
    parent: str | None = None
    location_kinds: tuple[str, ...] = ()
    bilateral: bool = False
    severity: bool = False
    exclusive: bool = False
    default_location: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ViewRegion:
    """Where a location shows on a film: a band of the lung's height, and a side (frontal) or depth (lateral)."""

    height: str
    across: str


@dataclass(frozen=True)
class Location(Term):
    kind: str = "side"
    parent: str | None = None
    regions: tuple[tuple[str, ViewRegion], ...] = ()  # projection -> region


@dataclass(frozen=True)
class View(Term):
    projection: str = "frontal"
    orientation: tuple[str, str] = ("L", "F")  # DICOM Patient Orientation as displayed (rows, columns)


@dataclass(frozen=True)
class Severity(Term):
    grade: int = 0


def normalise(text: str) -> str:
    """Fold case, width and separators so that 'Right_Lower-Lobe' == 'right lower lobe'."""
    text = unicodedata.normalize("NFKC", str(text)).casefold().strip()
    return re.sub(r"[\s_\-]+", " ", text)


class Vocabulary:
    """Lookup over the vocabulary data. Build with :func:`get_vocabulary`."""

    def __init__(self, data: dict):
        self.version = data.get("vocabulary_version", 1)
        self.code_systems = data.get("code_systems", {})
        self.findings: dict[str, Finding] = {}
        self.locations: dict[str, Location] = {}
        self.severities: dict[str, Severity] = {}
        self.views: dict[str, View] = {}
        self.sexes: dict[str, Term] = {}
        for key, entry in data["findings"].items():
            self.findings[key] = Finding(
                id=key, section="finding", text=entry["text"], code=_code(entry.get("code")),
                synonyms=_synonyms(entry), chexpert=entry["chexpert"], parent=entry.get("parent"),
                location_kinds=tuple(entry.get("locations") or ()), bilateral=bool(entry.get("bilateral")),
                severity=bool(entry.get("severity")), exclusive=bool(entry.get("exclusive")),
                default_location=tuple((k, float(v)) for k, v in (entry.get("default_location") or {}).items()))
        for key, entry in data["locations"].items():
            self.locations[key] = Location(id=key, section="location", text=entry["text"], code=_code(entry.get("code")),
                                           synonyms=_synonyms(entry), kind=entry["kind"], parent=entry.get("parent"),
                                           regions=_regions(key, entry.get("regions") or {}))
        for key, entry in data["severities"].items():
            self.severities[key] = Severity(id=key, section="severity", text=key, code=_code(entry.get("code")),
                                            synonyms=_synonyms(entry), grade=int(entry["grade"]))
        for key, entry in data["views"].items():
            self.views[key] = View(key, "view", entry.get("text", key), _code(entry.get("code")), _synonyms(entry),
                                   projection=entry.get("projection", "frontal"),
                                   orientation=tuple(entry.get("orientation") or ("L", "F")))
        for key, entry in data["sexes"].items():
            self.sexes[key] = Term(key, "sex", entry.get("text", key), _code(entry.get("code")), _synonyms(entry))
        self._index: dict[str, dict[str, str]] = {}
        for section in SECTIONS:
            index: dict[str, str] = {}
            for term in self.section(section).values():
                for word in (term.id, term.text, *term.synonyms):
                    index.setdefault(normalise(word), term.id)
            self._index[section] = index

    def section(self, name: str) -> dict[str, Term]:
        """All entries of one section: finding, location, severity, view or sex."""
        return {"finding": self.findings, "location": self.locations, "severity": self.severities,
                "view": self.views, "sex": self.sexes}[name]

    def resolve(self, section: str, word: str) -> str | None:
        """The canonical id a word (id, text or any synonym, any language) stands for, or None."""
        return self._index[section].get(normalise(word))

    def suggest(self, section: str, word: str) -> list[str]:
        """Up to three canonical ids close to a misspelt word."""
        index = self._index[section]
        close = difflib.get_close_matches(normalise(word), list(index), n=6, cutoff=0.6)
        ids: list[str] = []
        for match in close:
            if index[match] not in ids:
                ids.append(index[match])
        return ids[:3]

    def words(self, section: str) -> dict[str, str]:
        """Every normalised word of a section mapped to its id."""
        return self._index[section]

    def admitted_locations(self, finding: str) -> list[str]:
        """Location ids a finding admits directly, in vocabulary order."""
        f = self.findings[finding]
        return [loc.id for loc in self.locations.values()
                if loc.kind in f.location_kinds and (loc.id != "bilateral" or f.bilateral)]

    def project_location(self, location: str, finding: str) -> str | None:
        """The finest location at or above ``location`` that ``finding`` admits, or None.

        A lobe projects to its zone, a zone to its side: a right lower lobe location given
        to a finding that only has laterality (an effusion) becomes ``right``.
        """
        f = self.findings[finding]
        current: str | None = location
        while current is not None:
            loc = self.locations[current]
            if loc.kind in f.location_kinds and (current != "bilateral" or f.bilateral):
                return current
            current = loc.parent
        return None

    def view_region(self, location: str, view: str | None) -> ViewRegion:
        """Where ``location`` shows on a film of ``view`` (None means PA).

        A frontal film (PA, AP) shows height and side; a lateral (LL) shows height and depth, never the side:
        the two lungs superimpose, so a right and a left lower lobe finding both show posteroinferiorly.

        Example:
            >>> get_vocabulary().view_region("right_middle_lobe", "PA")
            ViewRegion(height='middle', across='right')
        """
        projection = self.views[view or "PA"].projection
        regions = dict(self.locations[location].regions)
        if projection not in regions:
            raise KeyError(f"location '{location}' has no {projection} region in the vocabulary")
        return regions[projection]

    def chexpert_column(self, finding: str) -> str:
        return self.findings[finding].chexpert


def _code(entry: dict | None) -> Code | None:
    if not entry:
        return None
    return Code(str(entry["system"]), str(entry["code"]), str(entry.get("display", "")))


def _regions(location: str, entry: dict) -> tuple[tuple[str, ViewRegion], ...]:
    out = []
    for projection, value in entry.items():
        height, across = value
        if projection not in PROJECTIONS or height not in REGION_HEIGHTS or across not in REGION_ACROSS[projection]:
            raise ValueError(f"location '{location}': bad region {projection}: {value!r} (projections "
                             f"{PROJECTIONS}, heights {REGION_HEIGHTS}, across {REGION_ACROSS})")
        out.append((projection, ViewRegion(str(height), str(across))))
    return tuple(out)


def _synonyms(entry: dict) -> tuple[str, ...]:
    syn = entry.get("synonyms") or {}
    if isinstance(syn, dict):
        return tuple(str(w) for words in syn.values() for w in (words or ()))
    return tuple(str(w) for w in syn)


@functools.lru_cache(maxsize=None)
def get_vocabulary(path: str | None = None) -> Vocabulary:
    """Load (once) and return the vocabulary; ``path`` overrides the shipped file."""
    from .strict_yaml import load_strict_yaml

    doc = load_strict_yaml(Path(path) if path else schemas_dir() / "vocabulary.yaml")
    return Vocabulary(doc.data)
