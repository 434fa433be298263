"""Readers of real chest X-ray datasets: a user's own copy of CheXpert, MIMIC-CXR-JPG, NIH ChestX-ray14 or any
CSV, turned into one list of records in synthmed's vocabulary.

Each layout is read from its own files and column names (:func:`read_dataset` tells them apart by their
columns). A record holds the image's absolute path (always inside the dataset's root: a path in a CSV that
is absolute or climbs out with ``..`` is skipped and counted), the patient's sex and age, the view (PA, AP or
LL), the findings as :class:`synthmed.cells.FindingLabel`, the dataset's labels that have no finding in
synthmed's vocabulary (kept, by name), the report's impression where the dataset has one, and the row's id.
Uncertain labels (CheXpert's -1) follow a policy named as in the CheXpert paper (Irvin et al. 2019):
``ignore`` (U-Ignore), ``positive`` (U-Ones), ``negative`` (U-Zeros). :func:`read_image` reads the images
(JPEG, PNG, DICOM) as a viewer shows them. For training on a real set, :func:`training_pairs` turns the records
into (image, prompt) pairs (the labels through synthmed's own prompt templates, or the report's impression) and
:func:`prepare_image` brings an image of any size to a square of the training size. The layouts and label tables
are described in docs/datasets.md.

Example:
    >>> ds = read_dataset("/data/CheXpert-v1.0-small/train.csv", uncertain="positive")  # doctest: +SKIP
    >>> ds.kind, len(ds.records), ds.skipped  # doctest: +SKIP
    ('chexpert', 223414, {})
    >>> ds.records[0].findings, ds.records[0].view  # doctest: +SKIP
    ((FindingLabel(finding='no_finding', location=None, severity=None),), 'AP')
    >>> NIH_LABELS["Effusion"], NIH_LABELS["Hernia"]
    ('pleural_effusion', None)
    >>> mimic_impression("FINDINGS: Clear lungs.\\n\\nIMPRESSION: No acute process.\\n")
    'No acute process.'
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from .cells import FindingLabel
from .vocabulary import CHEXPERT_COLUMNS, Vocabulary, get_vocabulary

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .spec import PromptSpec

__all__ = ["read_dataset", "detect_kind", "read_chexpert", "read_mimic", "read_nih", "read_csv", "load_column_map", "read_image",
           "mimic_impression", "Dataset", "DatasetRecord", "ColumnMap", "DatasetError", "KINDS",
           "UNCERTAIN_POLICIES", "NIH_LABELS", "MIMIC_VIEWS", "CHEXPERT_VIEWS", "training_pairs", "TrainingPair",
           "TrainingPairs", "prepare_image", "PROMPT_SOURCES", "NO_REPORT_POLICIES", "CROPS"]

KINDS = ("chexpert", "mimic", "nih", "csv")
# What to do with an uncertain label (-1), named as in Irvin et al. 2019 (CheXpert): U-Ignore, U-Ones, U-Zeros.
UNCERTAIN_POLICIES = ("ignore", "positive", "negative")
FRONTAL_VIEWS = ("PA", "AP")

# CheXpert's AP/PA column on a frontal row. A row whose Frontal/Lateral is "Lateral" is LL: CheXpert does not say
# which side faced the detector; the left lateral is the standard chest lateral, and synthmed's only lateral view.
CHEXPERT_VIEWS = {"PA": "PA", "AP": "AP", "LL": "LL"}
# MIMIC-CXR's ViewPosition (DICOM View Position). Other values (AP AXIAL, LAO, RAO, XTABLE LATERAL, SWIMMERS,
# PA LLD, blank, ...) are not views synthmed draws: the record keeps view None and the value is counted in
# Dataset.unknown_values. LATERAL is LL as for CheXpert.
MIMIC_VIEWS = {"PA": "PA", "AP": "AP", "LATERAL": "LL", "LL": "LL"}
NIH_VIEWS = {"PA": "PA", "AP": "AP"}

# NIH ChestX-ray14's 14 labels (and "No Finding") -> synthmed finding ids. None: no finding of the vocabulary means
# the same, so the label is kept in the record's `unmapped` (unless a later vocabulary knows the word: a None entry
# is looked up by name there when the dataset is read).
NIH_LABELS: dict[str, str | None] = {
    "No Finding": "no_finding",
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Effusion": "pleural_effusion",
    # "Infiltration" is the older word for a parenchymal opacity; CheXpert's labeler counts "infiltrate" as a
    # mention of Lung Opacity. NIH's own definition is loose, so this mapping is approximate.
    "Infiltration": "lung_opacity",
    "Mass": "mass",
    "Nodule": "nodule",
    # CheXpert's Pleural Other (synthmed's pleural_other) covers pleural thickening, scarring and fibrothorax.
    "Pleural_Thickening": "pleural_other",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "Emphysema": None,
    "Fibrosis": None,
    "Hernia": None,
}
# BBox_List_2017.csv spells one label differently from Data_Entry_2017.csv.
NIH_BOX_LABELS = {"Infiltrate": "Infiltration"}

CHEXPERT_REQUIRED = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
CHEXPERT_SPLITS = ("train", "valid", "test")
# A report's impression, where a CheXpert-style CSV carries one (CheXpert Plus: section_impression).
IMPRESSION_COLUMNS = ("section_impression", "Impression", "impression", "Report Impression")
MIMIC_LABELS_FILE = "mimic-cxr-2.0.0-chexpert.csv"
MIMIC_METADATA_FILE = "mimic-cxr-2.0.0-metadata.csv"
MIMIC_SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
MIMIC_PATIENTS_FILE = "patients.csv"  # MIMIC-IV hosp/patients.csv: gender, anchor_age, anchor_year
NIH_ENTRY_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
NIH_BOX_FILE = "BBox_List_2017.csv"
NIH_SPLIT_FILES = {"train_val_list.txt": "train_val", "test_list.txt": "test"}

# Dataset.skipped reasons
MISSING = "missing image file"
ESCAPES = "path escaping the root"
NO_PATH = "no image path"
LATERAL = "lateral view (frontal_only)"
UNKNOWN_VIEW = "unknown view (frontal_only)"
NO_LABELS = "no label row for its study"

MAX_AGE = 120
MAX_REPORT_BYTES = 1 << 20


class DatasetError(ValueError):
    """A dataset, its column map or an image file that cannot be read; the message names the file (and line)."""


@dataclass(frozen=True, slots=True)
class DatasetRecord:
    """One image of a real dataset, in synthmed's terms.

    Args:
        path: the image file, absolute, inside the dataset's root.
        source_id: the row's id in the dataset (CheXpert: its Path; MIMIC: dicom_id; NIH: Image Index).
        findings: the findings present, in the vocabulary's ids; location and severity only where the dataset says.
        unmapped: the dataset's labels present on the image that no vocabulary finding means.
        uncertain: findings labelled uncertain (-1) and left undecided (policy ``ignore``).
        negative: findings the dataset says are absent (0; -1 under policy ``negative``).
        impression: the report's impression, where the dataset has the report.
        boxes: finding id (or the dataset's label where unmapped) -> boxes [x0, y0, x1, y1] in pixels.
        split: the dataset's own split name, where it has one (train, valid, validate, test, train_val).
    """

    path: Path
    source_id: str
    findings: tuple[FindingLabel, ...] = ()
    sex: str | None = None
    age: int | None = None
    view: str | None = None
    unmapped: tuple[str, ...] = ()
    uncertain: tuple[str, ...] = ()
    negative: tuple[str, ...] = ()
    impression: str | None = None
    boxes: dict[str, list[list[float]]] = field(default_factory=dict, hash=False)
    split: str | None = None

    @property
    def finding_ids(self) -> tuple[str, ...]:
        return tuple(f.finding for f in self.findings)


@dataclass
class Dataset:
    """The records of one real dataset, and what reading it left out.

    Attributes:
        kind: the layout read: chexpert, mimic, nih or csv.
        root: the folder every record's path lies in (relative paths in the dataset start here).
        unmapped: dataset label -> number of records showing it that no vocabulary finding means.
        skipped: reason -> number of rows left out (missing image file, path escaping the root, ...).
        unknown_values: ``"field: value"`` -> count of values read as None because they mean nothing to synthmed
            (a view ``AP AXIAL``, an age ``414``); those records are kept.
        uncertain_policy: how uncertain labels were read: ignore, positive or negative.
    """

    kind: str
    root: Path
    records: list[DatasetRecord]
    unmapped: dict[str, int]
    skipped: dict[str, int]
    unknown_values: dict[str, int]
    sources: tuple[Path, ...]
    uncertain_policy: str = "ignore"

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[DatasetRecord]:
        return iter(self.records)

    def __repr__(self) -> str:
        return f"<Dataset {self.summary()}>"

    def summary(self) -> str:
        """One line: kind, size, root, policy, what was skipped and left unmapped."""
        def counts(c: Mapping[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"

        return (f"{self.kind}: {len(self.records)} records in {self.root} (uncertain: {self.uncertain_policy}); "
                f"skipped: {counts(self.skipped)}; unmapped labels: {counts(self.unmapped)}")

    def to_manifest_rows(self) -> list[dict[str, str]]:
        """The records as rows with synthmed's manifest column names (strings, as a manifest read back).

        ``file_name`` is relative to :attr:`root`; ``case_id`` the source id; ``findings`` the manifest's
        ``finding:location:severity|...``; the 14 CheXpert columns ``1`` (present), ``0`` (said absent) or blank
        (not mentioned, or uncertain under ``ignore``), as in CheXpert's CSV. Impressions, boxes and unmapped
        labels have no manifest column and stay on the records.
        """
        from .writers.manifest import MANIFEST_COLUMNS

        vocab = get_vocabulary()
        rows = []
        for index, rec in enumerate(self.records):
            present = {vocab.findings[f.finding].chexpert for f in rec.findings}
            absent = {vocab.findings[f].chexpert for f in rec.negative}
            row = {
                "file_name": rec.path.relative_to(self.root).as_posix(),
                "case_id": rec.source_id,
                "index": str(index),
                "split": rec.split or "",
                "findings": "|".join(f"{f.finding}:{f.location or ''}:{f.severity or ''}" for f in rec.findings),
                "finding_codes": "|".join(str(vocab.findings[f.finding].code) for f in rec.findings),
                "location": "|".join(f.location or "" for f in rec.findings),
                "severity": "|".join(f.severity or "" for f in rec.findings),
                **{c: "1" if c in present else "0" if c in absent else "" for c in CHEXPERT_COLUMNS},
                "sex": rec.sex or "",
                "age": "" if rec.age is None else str(rec.age),
                "view": rec.view or "",
            }
            rows.append({c: row[c] for c in MANIFEST_COLUMNS if c in row})
        return rows


# ----------------------------------------------------------------------------- the entry point

def read_dataset(path_or_csv: str | os.PathLike, kind: str | None = None, *, uncertain: str = "ignore",
                 frontal_only: bool = False, column_map: str | os.PathLike | Mapping | None = None) -> Dataset:
    """Read a real chest X-ray dataset into records in synthmed's vocabulary.

    Args:
        path_or_csv: the dataset's folder, or its CSV (CheXpert's train.csv, MIMIC's mimic-cxr-2.0.0-chexpert.csv,
            NIH's Data_Entry_2017.csv, or any CSV with ``column_map``).
        kind: chexpert, mimic, nih or csv; None tells the layout from the files' column names.
        uncertain: how to read an uncertain label (-1): ``ignore`` (U-Ignore: neither present nor absent, listed
            in the record's ``uncertain``), ``positive`` (U-Ones) or ``negative`` (U-Zeros).
        frontal_only: keep PA and AP images only (laterals and unknown views are skipped and counted).
        column_map: for ``kind="csv"``: a YAML file (or text, or a mapping) naming the CSV's columns;
            see :func:`load_column_map`.

    Raises:
        DatasetError: the layout cannot be told or a file does not hold what its layout says.

    Example:
        >>> read_dataset("/data/mimic-cxr-jpg/2.0.0", frontal_only=True).kind  # doctest: +SKIP
        'mimic'
    """
    # 1. Check the arguments
    path = Path(os.path.abspath(os.fspath(path_or_csv)))
    if uncertain not in UNCERTAIN_POLICIES:
        raise DatasetError(f"uncertain={uncertain!r} is not a policy; use one of {', '.join(UNCERTAIN_POLICIES)} "
                           "(U-Ignore, U-Ones, U-Zeros of the CheXpert paper)")
    if kind is not None and kind not in KINDS:
        raise DatasetError(f"kind={kind!r} is not a layout synthmed reads; use one of {', '.join(KINDS)} "
                           "(or None to tell it from the column names)")
    if not path.exists():
        raise DatasetError(f"no such file or folder: {path}")
    if column_map is not None and kind not in (None, "csv"):
        raise DatasetError(f"column_map is for kind='csv'; the {kind} layout names its own columns")
    # 2. Tell the layout
    if kind is None:
        kind = "csv" if column_map is not None else detect_kind(path)
    # 3. Read it
    if kind == "csv":
        if column_map is None:
            raise DatasetError(f"kind='csv' needs column_map= (a YAML file naming the columns of {path.name})")
        return read_csv(path, column_map, uncertain=uncertain, frontal_only=frontal_only)
    reader = {"chexpert": read_chexpert, "mimic": read_mimic, "nih": read_nih}[kind]
    return reader(path, uncertain=uncertain, frontal_only=frontal_only)


def _layouts_known() -> str:
    return ("chexpert (train.csv/valid.csv with Path, Sex, Age, Frontal/Lateral, AP/PA and the 14 CheXpert labels), "
            f"mimic ({MIMIC_LABELS_FILE}[.gz] with subject_id, study_id and the 14 labels, beside "
            f"{MIMIC_METADATA_FILE}[.gz]), nih ({NIH_ENTRY_FILES[0]} with Image Index and Finding Labels), "
            "csv (any CSV, with column_map= naming its columns)")


def detect_kind(path: Path) -> str:
    """The layout of a dataset folder or CSV, from its file and column names; DatasetError when none fits."""
    path = Path(path)
    if path.is_dir():
        if _find(path, MIMIC_LABELS_FILE):
            return "mimic"
        if any((path / name).is_file() for name in NIH_ENTRY_FILES):
            return "nih"
        if any((path / f"{s}.csv").is_file() for s in ("train", "valid")):
            return "chexpert"
        raise DatasetError(f"cannot tell which dataset {path} holds: none of its files is one synthmed knows. "
                           f"Known layouts: {_layouts_known()}. Give the CSV, or kind=")
    columns = set(_csv_header(path))
    labels = set(CHEXPERT_COLUMNS) <= columns
    if labels and set(CHEXPERT_REQUIRED) <= columns:
        return "chexpert"
    if (labels and {"subject_id", "study_id"} <= columns) or {"dicom_id", "subject_id", "study_id"} <= columns:
        return "mimic"
    if {"Image Index", "Finding Labels"} <= columns:
        return "nih"
    shown = ", ".join(sorted(columns)[:20]) + (", ..." if len(columns) > 20 else "")
    raise DatasetError(f"cannot tell the layout of {path} from its columns ({shown}). "
                       f"Known layouts: {_layouts_known()}")


# ----------------------------------------------------------------------------- shared parts

def _find(folder: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` in ``folder`` (MIMIC ships its tables gzipped)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _open_text(path: Path):
    try:
        if path.name.endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
        return open(path, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None


def _not_utf8(path: Path, e: UnicodeDecodeError) -> DatasetError:
    """A CSV that is not UTF-8, named by the line of its first such byte (text reads in blocks, so the decoder's
    position is not the file's)."""
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as fh:
            raw = fh.read(MAX_CSV_SCAN_BYTES)
        raw.decode("utf-8")
    except UnicodeDecodeError as found:
        line = raw.count(b"\n", 0, found.start) + 1
        return DatasetError(f"{path}, line {line}: byte 0x{raw[found.start]:02x} is not UTF-8 (a spreadsheet's "
                            "Latin-1 or Windows-1252 export?); save the file as UTF-8")
    except (OSError, EOFError, gzip.BadGzipFile):
        pass
    return DatasetError(f"{path}: not UTF-8 text ({e}); save the file as UTF-8")


MAX_CSV_SCAN_BYTES = 1 << 30  # read this much at most to find the line of a byte that is not UTF-8


def _csv_header(path: Path) -> list[str]:
    if path.is_dir():
        raise DatasetError(f"{path} is a folder; a CSV file is needed here")
    with _open_text(path) as fh:
        try:
            return [c.strip() for c in next(csv.reader(fh), [])]
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
        except (gzip.BadGzipFile, EOFError, csv.Error) as e:
            raise DatasetError(f"{path}: not a CSV file synthmed can read ({e})") from None


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line, row) of a CSV (or .csv.gz) with stripped column names; errors name the file and line."""
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        line = 0
        try:
            header = [c.strip() for c in next(reader, [])]
            for values in reader:
                line = reader.line_num
                if any(v.strip() for v in values):  # a blank line is no row
                    yield line, dict(zip(header, values))
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
        except (gzip.BadGzipFile, EOFError) as e:
            raise DatasetError(f"{path}: not a readable CSV after line {line} ({e})") from None
        except csv.Error as e:
            raise DatasetError(f"{path}:{reader.line_num}: {e}") from None


def _require_columns(path: Path, columns: Iterable[str], layout: str) -> list[str]:
    header = _csv_header(path)
    missing = [c for c in columns if c not in header]
    if missing:
        raise DatasetError(f"{path} lacks the {layout} column(s) {', '.join(map(repr, missing))} "
                           f"(its columns: {', '.join(header) or 'none'})")
    return header


def relative_parts(text: str) -> tuple[str, ...] | None:
    """The parts of a path written in a dataset's CSV, or None when it is absolute or climbs out with '..'.

    Example:
        >>> relative_parts("train/p1/./view1.jpg"), relative_parts("../x.png"), relative_parts("/data/x.png")
        (('train', 'p1', 'view1.jpg'), None, None)
    """
    text = text.replace("\\", "/")
    if text.startswith("/") or PureWindowsPath(text).drive or "\x00" in text:
        return None
    parts = tuple(p for p in text.split("/") if p not in ("", "."))
    if ".." in parts:
        return None
    return parts


def _label_value(text: str | None, where: str, column: str) -> int | None:
    value = (text or "").strip()
    if not value:
        return None
    try:
        number = float(value)
    except ValueError:
        number = None
    if number not in (1.0, 0.0, -1.0):
        raise DatasetError(f"{where}: column {column!r} holds {value!r}; a label is 1, 0, -1 (uncertain) "
                           "or blank (not mentioned)")
    return int(number)


def _decide(labels: Iterable[tuple[str, int | None]], policy: str) -> tuple[list[str], list[str], list[str]]:
    """(present, uncertain, negative) finding ids from (finding, 1/0/-1/None) pairs under an uncertain policy."""
    present: dict[str, None] = {}
    uncertain: dict[str, None] = {}
    negative: dict[str, None] = {}
    for finding, value in labels:
        if value == 1 or (value == -1 and policy == "positive"):
            present[finding] = None
        elif value == -1 and policy == "ignore":
            uncertain[finding] = None
        elif value is not None:
            negative[finding] = None
    return (list(present), [f for f in uncertain if f not in present],
            [f for f in negative if f not in present and f not in uncertain])


def _parse_age(text: str | None) -> tuple[int | None, bool]:
    """(age in whole years or None, whether the text was understood). Reads 58, 58.0 and DICOM's 058Y/011M/020D."""
    value = (text or "").strip()
    if not value:
        return None, True
    m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([YyMmWwDd])?", value)
    if not m:
        return None, False
    per_year = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}[(m.group(2) or "Y").upper()]
    years = float(m.group(1)) / per_year
    return (int(years), True) if years < MAX_AGE + 1 else (None, False)  # also refuses 1e400 (inf)


_SEXES = {"F": "F", "FEMALE": "F", "M": "M", "MALE": "M"}
_NO_SEX = ("", "UNKNOWN", "U", "NAN")


def _parse_sex(text: str | None, vocab: Vocabulary) -> tuple[str | None, bool]:
    value = (text or "").strip()
    if value.upper() in _SEXES:
        return _SEXES[value.upper()], True
    if value.upper() in _NO_SEX:
        return None, True
    resolved = vocab.resolve("sex", value)
    return resolved, resolved is not None


class _Collector:
    """Gathers one reading's records and counts what it left out."""

    def __init__(self, kind: str, root: Path, policy: str, frontal_only: bool):
        self.kind, self.root, self.policy, self.frontal_only = kind, Path(os.path.abspath(root)), policy, frontal_only
        self.vocab = get_vocabulary()
        self.records: list[DatasetRecord] = []
        self.unmapped: Counter = Counter()
        self.skipped: Counter = Counter()
        self.unknown_values: Counter = Counter()
        self.sources: list[Path] = []

    def unknown(self, what: str, raw: str) -> None:
        self.unknown_values[f"{what}: {raw.strip() or '(blank)'}"] += 1

    def sex(self, raw: str | None) -> str | None:
        """F, M or None from a dataset's text; a text that names no sex is counted."""
        sex, known = _parse_sex(raw, self.vocab)
        if not known:
            self.unknown("sex", raw or "")
        return sex

    def age(self, raw: str | None) -> int | None:
        """Years from a dataset's text, or None; a text that gives no age is counted."""
        age, known = _parse_age(raw)
        if not known:
            self.unknown("age", raw or "")
        return age

    def wants_view(self, view: str | None) -> bool:
        """False (and counted) when ``frontal_only`` leaves this view out."""
        if not self.frontal_only or view in FRONTAL_VIEWS:
            return True
        self.skipped[LATERAL if view == "LL" else UNKNOWN_VIEW] += 1
        return False

    def locate(self, text: str | None, *, strip_first: bool = False) -> Path | None:
        """The image file a CSV path names, inside the root; None (counted) when blank, escaping or missing.

        With ``strip_first`` a path whose first part is the dataset folder's own name (CheXpert's
        ``CheXpert-v1.0-small/train/...``) is found whatever the folder is called now.
        """
        text = (text or "").strip()
        if not text:
            self.skipped[NO_PATH] += 1
            return None
        parts = relative_parts(text)
        if parts is None:
            self.skipped[ESCAPES] += 1
            return None
        candidates = [parts] + ([parts[1:]] if strip_first and len(parts) > 1 else [])
        for candidate in candidates:
            path = self.root.joinpath(*candidate)
            if path.is_file():
                return path
        self.skipped[MISSING] += 1
        return None

    def add(self, record: DatasetRecord) -> None:
        self.unmapped.update(dict.fromkeys(record.unmapped, 1))
        self.records.append(record)

    def dataset(self) -> Dataset:
        return Dataset(self.kind, self.root, self.records, dict(self.unmapped), dict(self.skipped),
                       dict(self.unknown_values), tuple(self.sources), self.policy)


def _chexpert_findings(vocab: Vocabulary) -> dict[str, str]:
    """CheXpert column -> the vocabulary's finding of that name that has no parent (Lung Lesion -> lung_lesion)."""
    out: dict[str, str] = {}
    for finding in vocab.findings.values():
        if finding.parent is None and finding.chexpert in CHEXPERT_COLUMNS:
            out.setdefault(finding.chexpert, finding.id)
    return out


def _chexpert_labels(row: Mapping[str, str], where: str, columns: Mapping[str, str], policy: str,
                     ) -> tuple[list[str], list[str], list[str], list[str]]:
    """(present, uncertain, negative, unmapped) of a row holding the 14 CheXpert columns."""
    pairs, unmapped = [], []
    for column in CHEXPERT_COLUMNS:
        value = _label_value(row.get(column), where, column)
        if column in columns:
            pairs.append((columns[column], value))
        elif value == 1 or (value == -1 and policy == "positive"):
            unmapped.append(column)
    return (*_decide(pairs, policy), unmapped)


def _labels(ids: Iterable[str]) -> tuple[FindingLabel, ...]:
    return tuple(FindingLabel(f) for f in ids)


# ----------------------------------------------------------------------------- CheXpert

def read_chexpert(path: str | os.PathLike, *, uncertain: str = "ignore", frontal_only: bool = False) -> Dataset:
    """CheXpert (or CheXpert Plus) ``train.csv`` / ``valid.csv``, or the folder holding them (both are read).

    ``Path`` is read against the CSV's folder, and with its first part (the dataset folder's own name,
    ``CheXpert-v1.0-small/``) taken off, which is CheXpert's convention. Sex Female/Male -> F/M; Frontal rows take
    their view from AP/PA; Lateral rows are LL. A CSV holding a ``section_impression`` column (CheXpert Plus)
    gives the impression. The split is the CSV's name (train, valid, test).
    """
    path = Path(os.path.abspath(path))
    if path.is_dir():
        csvs = [path / f"{s}.csv" for s in CHEXPERT_SPLITS if (path / f"{s}.csv").is_file()]
        if not csvs:
            raise DatasetError(f"no train.csv or valid.csv in {path}; give CheXpert's CSV itself")
        root = path
    else:
        csvs, root = [path], path.parent
    out = _Collector("chexpert", root, uncertain, frontal_only)
    vocab = out.vocab
    columns = _chexpert_findings(vocab)
    for csv_path in csvs:
        header = _require_columns(csv_path, (*CHEXPERT_REQUIRED, *CHEXPERT_COLUMNS), "CheXpert")
        out.sources.append(csv_path)
        impression_column = next((c for c in IMPRESSION_COLUMNS if c in header), None)
        split = csv_path.stem if csv_path.stem in CHEXPERT_SPLITS else None
        for line, row in _csv_rows(csv_path):
            where = f"{csv_path}:{line}"
            frontal_lateral = (row.get("Frontal/Lateral") or "").strip()
            ap_pa = (row.get("AP/PA") or "").strip()
            if frontal_lateral.lower() == "lateral":
                view = "LL"
            elif frontal_lateral.lower() == "frontal" and ap_pa.upper() in CHEXPERT_VIEWS:
                view = CHEXPERT_VIEWS[ap_pa.upper()]
            else:
                view = None
                out.unknown("view", f"{frontal_lateral}/{ap_pa}")
            present, unsure, negative, unmapped = _chexpert_labels(row, where, columns, uncertain)
            if not out.wants_view(view):
                continue
            image = out.locate(row.get("Path"), strip_first=True)
            if image is None:
                continue
            sex, age = out.sex(row.get("Sex")), out.age(row.get("Age"))
            impression = ((row.get(impression_column) or "").strip() or None) if impression_column else None
            out.add(DatasetRecord(image, (row.get("Path") or "").strip(), _labels(present), sex, age, view,
                                  tuple(unmapped), tuple(unsure), tuple(negative), impression, {}, split))
    return out.dataset()


# ----------------------------------------------------------------------------- MIMIC-CXR-JPG

_SECTION_HEADER = re.compile(r"^[ \t]*[A-Z][A-Z0-9 /&(),'-]*:", re.MULTILINE)
_IMPRESSION = re.compile(r"^[ \t]*IMPRESSION[ \t]*:", re.MULTILINE)


def mimic_impression(report: str) -> str | None:
    """The impression of a MIMIC-CXR free-text report: the text after ``IMPRESSION:`` up to the next section
    header (a line starting with capitals and a colon, e.g. ``RECOMMENDATION(S):``), whitespace folded; None
    when the report has no impression section or it is empty.

    Example:
        >>> mimic_impression("IMPRESSION:\\n 1. Small left effusion.\\n 2. No pneumothorax.\\n\\nNOTIFICATION: called")
        '1. Small left effusion. 2. No pneumothorax.'
    """
    match = _IMPRESSION.search(report)
    if match is None:
        return None
    rest = report[match.end():]
    following = _SECTION_HEADER.search(rest)
    text = " ".join((rest[:following.start()] if following else rest).split())
    return text or None


def _read_report(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_REPORT_BYTES)
    except OSError:
        return None
    return raw.decode("utf-8", errors="replace")


def read_mimic(path: str | os.PathLike, *, uncertain: str = "ignore", frontal_only: bool = False) -> Dataset:
    """MIMIC-CXR-JPG: ``mimic-cxr-2.0.0-chexpert.csv`` joined with ``mimic-cxr-2.0.0-metadata.csv`` (either may be
    ``.gz``) on (subject_id, study_id), one record per image of the metadata.

    Images are ``files/p<first two digits of subject_id>/p<subject_id>/s<study_id>/<dicom_id>.jpg`` under the
    folder of the CSVs. Where the MIMIC-CXR report files are there too (``files/p../p<subject>/s<study>.txt``),
    the impression is read from them (:func:`mimic_impression`). ViewPosition maps by :data:`MIMIC_VIEWS`.
    Where ``mimic-cxr-2.0.0-split.csv`` lies beside, records take its split; where MIMIC-IV's ``patients.csv``
    does, sex (gender) and age (anchor_age moved to the study's year) come from it; otherwise both are None.
    An image whose study has no label row is skipped and counted.
    """
    path = Path(os.path.abspath(path))
    folder = path if path.is_dir() else path.parent
    # 1. Find the two tables (the path may name either)
    labels_csv = metadata_csv = None
    if path.is_file():
        header = set(_csv_header(path))
        if "dicom_id" in header:
            metadata_csv = path
        else:
            labels_csv = path
    labels_csv = labels_csv or _find(folder, MIMIC_LABELS_FILE)
    metadata_csv = metadata_csv or _find(folder, MIMIC_METADATA_FILE)
    if labels_csv is None or metadata_csv is None:
        missing = MIMIC_LABELS_FILE if labels_csv is None else MIMIC_METADATA_FILE
        raise DatasetError(f"MIMIC-CXR-JPG needs {missing} (or .gz) in {folder}: the labels are per study, the "
                           "images per row of the metadata, joined on subject_id and study_id")
    _require_columns(labels_csv, ("subject_id", "study_id", *CHEXPERT_COLUMNS), "MIMIC-CXR-JPG labels")
    _require_columns(metadata_csv, ("dicom_id", "subject_id", "study_id", "ViewPosition"), "MIMIC-CXR-JPG metadata")
    out = _Collector("mimic", folder, uncertain, frontal_only)
    out.sources += [labels_csv, metadata_csv]
    columns = _chexpert_findings(out.vocab)
    # 2. Labels per study
    studies: dict[tuple[str, str], tuple] = {}
    for line, row in _csv_rows(labels_csv):
        key = ((row.get("subject_id") or "").strip(), (row.get("study_id") or "").strip())
        studies[key] = _chexpert_labels(row, f"{labels_csv}:{line}", columns, uncertain)
    # 3. The optional tables: splits and patients
    splits: dict[str, str] = {}
    split_csv = _find(folder, MIMIC_SPLIT_FILE)
    if split_csv is not None:
        out.sources.append(split_csv)
        splits = {(r.get("dicom_id") or "").strip(): (r.get("split") or "").strip() or None
                  for _, r in _csv_rows(split_csv)}
    patients: dict[str, tuple[str, str, str]] = {}
    patients_csv = _find(folder, MIMIC_PATIENTS_FILE)
    if patients_csv is not None:
        out.sources.append(patients_csv)
        patients = {(r.get("subject_id") or "").strip(): (r.get("gender") or "", r.get("anchor_age") or "",
                                                          r.get("anchor_year") or "")
                    for _, r in _csv_rows(patients_csv)}
    # 4. One record per image
    impressions: dict[tuple[str, str], str | None] = {}
    for line, row in _csv_rows(metadata_csv):
        subject, study = (row.get("subject_id") or "").strip(), (row.get("study_id") or "").strip()
        dicom_id = (row.get("dicom_id") or "").strip()
        raw_view = (row.get("ViewPosition") or "").strip()
        view = MIMIC_VIEWS.get(raw_view.upper())
        if view is None:
            out.unknown("view", raw_view)
        labels = studies.get((subject, study))
        if labels is None:
            out.skipped[NO_LABELS] += 1
            continue
        if not out.wants_view(view):
            continue
        study_dir = f"files/p{subject[:2]}/p{subject}"
        image = out.locate(f"{study_dir}/s{study}/{dicom_id}.jpg") if dicom_id else out.locate("")
        if image is None:
            continue
        if (subject, study) not in impressions:
            parts = relative_parts(f"{study_dir}/s{study}.txt")
            report = _read_report(out.root.joinpath(*parts)) if parts else None
            impressions[(subject, study)] = mimic_impression(report) if report else None
        sex = age = None
        if subject in patients:
            gender, anchor_age, anchor_year = patients[subject]
            sex = out.sex(gender)
            age, known = _parse_age(anchor_age)
            study_date = (row.get("StudyDate") or "").strip()
            if age is not None and anchor_year.strip().isdigit() and re.fullmatch(r"\d{8}(\.0)?", study_date):
                age = age + int(study_date[:4]) - int(anchor_year)
                known = 0 <= age <= MAX_AGE
                age = age if known else None
            if not known:
                out.unknown("age", anchor_age)
        present, unsure, negative, unmapped = labels
        out.add(DatasetRecord(image, dicom_id, _labels(present), sex, age, view, tuple(unmapped), tuple(unsure),
                              tuple(negative), impressions[(subject, study)], {}, splits.get(dicom_id)))
    return out.dataset()


# ----------------------------------------------------------------------------- NIH ChestX-ray14

def _nih_finding(label: str, vocab: Vocabulary) -> str | None:
    if label in NIH_LABELS:
        return NIH_LABELS[label] or vocab.resolve("finding", label)
    return vocab.resolve("finding", label)


def _nih_images(root: Path) -> dict[str, Path]:
    """File name -> path of every file in ``images/`` and ``images_*/images/`` (the first found wins)."""
    folders = [root / "images", *sorted(root.glob("images_*/images"))]
    found: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.is_file():
                    found.setdefault(entry.name, Path(entry.path))
    return found


def _nih_boxes(path: Path, vocab: Vocabulary) -> dict[str, dict[str, list[list[float]]]]:
    """Image Index -> finding -> boxes [x0, y0, x1, y1] from BBox_List_2017.csv (whose header splits its box
    column in four: ``Bbox [x``, ``y``, ``w``, ``h]``)."""
    boxes: dict[str, dict[str, list[list[float]]]] = {}
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        header = [c.strip() for c in next(reader, [])]
        try:
            image_col, label_col = header.index("Image Index"), header.index("Finding Label")
            x_col = next(i for i, c in enumerate(header) if c.lower().startswith("bbox"))
        except (ValueError, StopIteration):
            raise DatasetError(f"{path} lacks the columns Image Index, Finding Label and Bbox [x, y, w, h] "
                               f"(its columns: {', '.join(header)})") from None
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            try:
                x, y, w, h = (float(v) for v in values[x_col:x_col + 4])
            except ValueError:
                raise DatasetError(f"{path}:{reader.line_num}: the box {values[x_col:x_col + 4]} is not four "
                                   "numbers x, y, w, h") from None
            label = values[label_col].strip()
            label = NIH_BOX_LABELS.get(label, label)
            key = _nih_finding(label, vocab) or label
            boxes.setdefault(values[image_col].strip(), {}).setdefault(key, []).append([x, y, x + w, y + h])
    return boxes


def read_nih(path: str | os.PathLike, *, uncertain: str = "ignore", frontal_only: bool = False) -> Dataset:
    """NIH ChestX-ray14: ``Data_Entry_2017.csv`` (or its folder), images in ``images/`` or ``images_*/images/``.

    ``Finding Labels`` is split at ``|`` and mapped by :data:`NIH_LABELS`; a label NIH lists but no vocabulary
    finding means (Hernia, Emphysema, Fibrosis) is kept in the record's ``unmapped``. NIH labels every image
    with all 14, so a mapped finding not listed is negative. ``BBox_List_2017.csv`` beside gives boxes in pixels,
    ``train_val_list.txt`` / ``test_list.txt`` the split. NIH has no uncertain labels (``uncertain`` is unused).
    """
    path = Path(os.path.abspath(path))
    if path.is_dir():
        entry = next((path / n for n in NIH_ENTRY_FILES if (path / n).is_file()), None)
        if entry is None:
            raise DatasetError(f"no {NIH_ENTRY_FILES[0]} in {path}")
    else:
        entry = path
    _require_columns(entry, ("Image Index", "Finding Labels"), "NIH ChestX-ray14")
    out = _Collector("nih", entry.parent, uncertain, frontal_only)
    out.sources.append(entry)
    vocab = out.vocab
    images = _nih_images(out.root)
    boxes: dict[str, dict[str, list[list[float]]]] = {}
    if (out.root / NIH_BOX_FILE).is_file():
        out.sources.append(out.root / NIH_BOX_FILE)
        boxes = _nih_boxes(out.root / NIH_BOX_FILE, vocab)
    splits: dict[str, str] = {}
    for name, split in NIH_SPLIT_FILES.items():
        if (out.root / name).is_file():
            out.sources.append(out.root / name)
            for line in (out.root / name).read_text(encoding="utf-8", errors="replace").splitlines():
                splits.setdefault(line.strip(), split)
    # NIH labels every image for all of its labels: a mapped finding not listed is absent
    known = [f for f in dict.fromkeys(_nih_finding(label, vocab) for label in NIH_LABELS) if f]
    for line, row in _csv_rows(entry):
        index = (row.get("Image Index") or "").strip()
        raw_view = (row.get("View Position") or "").strip()
        view = NIH_VIEWS.get(raw_view.upper())
        if view is None:
            out.unknown("view", raw_view)
        if not out.wants_view(view):
            continue
        if not index:
            out.skipped[NO_PATH] += 1
            continue
        parts = relative_parts(index)
        if parts is None:
            out.skipped[ESCAPES] += 1
            continue
        if len(parts) != 1 or parts[0] not in images:
            out.skipped[MISSING] += 1
            continue
        present: dict[str, None] = {}
        unmapped: dict[str, None] = {}
        for label in (s.strip() for s in (row.get("Finding Labels") or "").split("|")):
            if not label:
                continue
            finding = _nih_finding(label, vocab)
            if finding is None:
                unmapped[label] = None
            else:
                present[finding] = None
        negative = [f for f in known if f not in present]
        sex, age = out.sex(row.get("Patient Gender")), out.age(row.get("Patient Age"))
        out.add(DatasetRecord(images[parts[0]], index, _labels(present), sex, age, view, tuple(unmapped), (),
                              tuple(negative), None, boxes.get(index, {}), splits.get(index)))
    return out.dataset()


# ----------------------------------------------------------------------------- any CSV, with a column map

COLUMN_MAP_KEYS = ("path", "root", "id", "sex", "age", "view", "report", "findings", "labels", "values")
_COLUMN_KEYS = ("path", "id", "sex", "age", "view", "report")
_VALUE_TARGETS = {"sex": ("F", "M"), "view": ("PA", "AP", "LL")}


@dataclass(frozen=True)
class ColumnMap:
    """Which column of a plain CSV holds what. Build with :func:`load_column_map`.

    Attributes:
        columns: key (path, id, sex, age, view, report) -> CSV column.
        findings: (column, separator) of one column listing the findings, or None.
        labels: CSV column -> finding id (None: the column's label is kept as unmapped), values 1/0/-1/blank.
        values: sex / view / findings -> the CSV's value -> synthmed's (None: no value).
        root: the folder image paths start from, relative to the CSV's folder ('' = the CSV's folder).
        source: the YAML file (for messages).
    """

    columns: dict[str, str]
    findings: tuple[str, str] | None
    labels: dict[str, str | None]
    values: dict[str, dict[str, str | None]]
    root: str = ""
    source: str = "<column map>"
    positions: dict = field(default_factory=dict, repr=False)  # key path -> (line, column) in the YAML

    def where(self, *keys: Any) -> str:
        """``file:line:column`` of a key of the map (or of the nearest key above it), as far as it is known."""
        keys = tuple(keys)
        while keys and keys not in self.positions:
            keys = keys[:-1]
        pos = self.positions.get(keys)
        return f"{self.source}:{pos[0]}:{pos[1]}" if pos else self.source


def load_column_map(column_map: str | os.PathLike | Mapping) -> ColumnMap:
    """Read and check a plain CSV's column map (a YAML file, YAML text or a mapping), every problem at once.

    Keys: ``path`` (required: the image column), ``id``, ``sex``, ``age``, ``view``, ``report`` (columns);
    ``findings: {column: labels, separator: "|"}`` (one column listing findings by id, name or synonym, or as
    ``finding:location:severity``); ``labels: {CSV column: finding id}`` (columns holding 1/0/-1/blank; a null
    finding keeps the column's label as unmapped); ``values: {sex: {Female: F}, view: {Frontal: PA},
    findings: {Effusion: pleural_effusion}}``; ``root`` (the images' folder, relative to the CSV's).

    Raises:
        DatasetError: naming each bad key, with its line and column in the YAML.

    Example:
        >>> m = load_column_map("path: image\\nsex: gender\\nfindings: {column: labels, separator: ';'}")
        >>> m.columns, m.findings
        ({'path': 'image', 'sex': 'gender'}, ('labels', ';'))
    """
    from .strict_yaml import StrictYamlError, load_strict_yaml

    # 1. Parse (positions kept for the messages)
    if isinstance(column_map, Mapping):
        data, source, doc = dict(column_map), "<column map>", None
    else:
        try:
            doc = load_strict_yaml(Path(column_map) if isinstance(column_map, os.PathLike) else column_map)
        except StrictYamlError as e:
            raise DatasetError(f"column map: {e}") from None
        data, source = doc.data, doc.source
    problems: list[str] = []

    def where(*keys: Any) -> str:
        pos = doc.position(keys, key=True) if doc is not None else None
        return f"{source}:{pos[0]}:{pos[1]}" if pos else source

    def text(value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())

    vocab = get_vocabulary()

    def finding_id(value: Any, *keys: Any) -> str | None:
        if value is None or (isinstance(value, str) and value in vocab.findings):
            return value
        hint = vocab.suggest("finding", str(value))
        problems.append(f"{where(*keys)}: {'.'.join(map(str, keys))}: {value!r} is not a finding of synthmed's "
                        f"vocabulary" + (f" (did you mean {', '.join(hint)}?)" if hint else
                                         " (see schemas/vocabulary.yaml)"))
        return None

    # 2. Check each key
    for key in data:
        if key not in COLUMN_MAP_KEYS:
            problems.append(f"{where(key)}: unknown key {key!r} (known keys: {', '.join(COLUMN_MAP_KEYS)})")
    columns: dict[str, str] = {}
    for key in _COLUMN_KEYS:
        if key in data and data[key] is not None:
            if text(data[key]):
                columns[key] = data[key]
            else:
                problems.append(f"{where(key)}: {key}: give a column name (text), not {data[key]!r}")
    if "path" not in columns and "path" not in data:
        problems.append(f"{source}: key 'path' (the column holding each image's path) is required")
    findings = None
    if data.get("findings") is not None:
        spec = data["findings"]
        if text(spec):
            findings = (spec, "|")
        elif isinstance(spec, dict):
            for sub in spec:
                if sub not in ("column", "separator"):
                    problems.append(f"{where('findings', sub)}: unknown key findings.{sub} (known: column, separator)")
            separator = spec.get("separator", "|")
            if not text(spec.get("column")):
                problems.append(f"{where('findings')}: findings.column: give the column listing the findings")
            elif not isinstance(separator, str) or not separator:
                problems.append(f"{where('findings', 'separator')}: findings.separator: give the text between "
                                f"findings (e.g. '|'), not {separator!r}")
            else:
                findings = (spec["column"], separator)
        else:
            problems.append(f"{where('findings')}: findings: give {{column: ..., separator: ...}}")
    labels: dict[str, str | None] = {}
    if data.get("labels") is not None:
        if not isinstance(data["labels"], dict):
            problems.append(f"{where('labels')}: labels: give a mapping of CSV column -> finding id")
        else:
            for column, finding in data["labels"].items():
                labels[column] = finding_id(finding, "labels", column)
    if "path" in columns and not (findings or labels):
        problems.append(f"{source}: give 'findings' (one column listing them) or 'labels' (a column per finding)")
    values: dict[str, dict[str, str | None]] = {}
    if data.get("values") is not None:
        if not isinstance(data["values"], dict):
            problems.append(f"{where('values')}: values: give a mapping such as {{sex: {{Female: F, Male: M}}}}")
        else:
            for field_name, table in data["values"].items():
                if field_name not in ("sex", "view", "findings"):
                    problems.append(f"{where('values', field_name)}: unknown key values.{field_name} "
                                    "(known: sex, view, findings)")
                    continue
                if not isinstance(table, dict):
                    problems.append(f"{where('values', field_name)}: values.{field_name}: give a mapping of the "
                                    "CSV's value -> synthmed's")
                    continue
                values[field_name] = {}
                for raw, target in table.items():
                    if field_name == "findings":
                        values[field_name][raw] = finding_id(target, "values", "findings", raw)
                    elif target is None or target in _VALUE_TARGETS[field_name]:
                        values[field_name][raw] = target
                    else:
                        problems.append(f"{where('values', field_name, raw)}: values.{field_name}.{raw}: {target!r} "
                                        f"is not one of {', '.join(_VALUE_TARGETS[field_name])} (or null)")
    root = data.get("root") or ""
    if not isinstance(root, str):
        problems.append(f"{where('root')}: root: give a folder (text), not {root!r}")
        root = ""
    if problems:
        raise DatasetError("column map:\n" + "\n".join(problems))
    return ColumnMap(columns, findings, labels, values, root, source, dict(doc.key_marks) if doc else {})


def _parse_item(item: str, mapping: Mapping[str, str | None], vocab: Vocabulary) -> FindingLabel | None:
    """A findings-column item: a word the map names, a finding id/name/synonym, or ``finding:location:severity``."""
    if item in mapping:
        return FindingLabel(mapping[item]) if mapping[item] else None
    if ":" in item:
        name, location, severity = (item.split(":") + ["", ""])[:3]
        finding = vocab.resolve("finding", name)
        loc = vocab.resolve("location", location) if location.strip() else None
        sev = vocab.resolve("severity", severity) if severity.strip() else None
        if finding is None or (location.strip() and loc is None) or (severity.strip() and sev is None):
            return None
        return FindingLabel(finding, loc, sev)
    finding = vocab.resolve("finding", item)
    return FindingLabel(finding) if finding else None


def read_csv(path: str | os.PathLike, column_map: str | os.PathLike | Mapping | ColumnMap, *,
             uncertain: str = "ignore", frontal_only: bool = False) -> Dataset:
    """Any CSV of chest X-rays, its columns named by a column map (:func:`load_column_map`).

    Paths are relative to the CSV's folder (or the map's ``root``). Sex and view go through the map's
    ``values`` first, then synthmed's own words (F/M, female/male; PA/AP/LL, lateral). Findings not in the
    vocabulary are kept as unmapped. An id column is optional (the default id is ``line <n>``).

    Raises:
        DatasetError: a bad map, a column the CSV lacks (named with the map's line), or a bad label value.
    """
    path = Path(os.path.abspath(path))
    cmap = column_map if isinstance(column_map, ColumnMap) else load_column_map(column_map)
    header = _csv_header(path)
    # 1. Every column the map names must be in the CSV
    problems = []
    named = [((key,), column) for key, column in cmap.columns.items()]
    named += [(("findings", "column"), cmap.findings[0])] if cmap.findings else []
    named += [(("labels", column), column) for column in cmap.labels]
    for keys, column in named:
        if column not in header:
            problems.append(f"{cmap.where(*keys)}: {'.'.join(keys)}: column {column!r} is not in {path} "
                            f"(its columns: {', '.join(header) or 'none'})")
    if problems:
        raise DatasetError("column map:\n" + "\n".join(problems))
    root = Path(os.path.abspath(path.parent / cmap.root))
    out = _Collector("csv", root, uncertain, frontal_only)
    out.sources.append(path)
    vocab = out.vocab
    sexes, views = cmap.values.get("sex", {}), cmap.values.get("view", {})
    finding_words = cmap.values.get("findings", {})
    col = cmap.columns
    # 2. One record per row
    for line, row in _csv_rows(path):
        where = f"{path}:{line}"
        raw_view = (row.get(col["view"]) or "").strip() if "view" in col else ""
        if raw_view in views:
            view = views[raw_view]
        else:
            view = {"PA": "PA", "AP": "AP", "LL": "LL", "LATERAL": "LL"}.get(raw_view.upper()) \
                or vocab.resolve("view", raw_view)
            if view is None and "view" in col:
                out.unknown("view", raw_view)
        if not out.wants_view(view):
            continue
        image = out.locate(row.get(col["path"]))
        if image is None:
            continue
        present: dict[FindingLabel, None] = {}
        unmapped: dict[str, None] = {}
        if cmap.findings:
            column, separator = cmap.findings
            for item in (s.strip() for s in (row.get(column) or "").split(separator)):
                if item:
                    label = _parse_item(item, finding_words, vocab)
                    if label is None:
                        unmapped[item] = None
                    else:
                        present[label] = None
        pairs = []
        for column, finding in cmap.labels.items():
            value = _label_value(row.get(column), where, column)
            if finding is not None:
                pairs.append((finding, value))
            elif value == 1 or (value == -1 and uncertain == "positive"):
                unmapped[column] = None
        listed, unsure, negative = _decide(pairs, uncertain)
        have = {f.finding for f in present}
        for finding in listed:
            if finding not in have:
                present[FindingLabel(finding)] = None
        have = {f.finding for f in present}
        raw_sex = (row.get(col["sex"]) or "").strip() if "sex" in col else ""
        sex = sexes[raw_sex] if raw_sex in sexes else out.sex(raw_sex)
        age = out.age(row.get(col["age"]) if "age" in col else "")
        impression = ((row.get(col["report"]) or "").strip() or None) if "report" in col else None
        source_id = (row.get(col["id"]) or "").strip() if "id" in col else ""
        out.add(DatasetRecord(image, source_id or f"line {line}", tuple(present), sex, age, view, tuple(unmapped),
                              tuple(f for f in unsure if f not in have), tuple(f for f in negative if f not in have),
                              impression, {}, None))
    return out.dataset()


# ----------------------------------------------------------------------------- images

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's convert("L")


def read_image(path: str | os.PathLike) -> "np.ndarray":
    """An image of a real dataset as float32 [H, W] in [0, 1], 0 black, as a viewer shows it.

    JPEG and PNG (8 or 16 bit; grey, RGB or palette) through Pillow: 8-bit samples / 255, 16-bit / 65535,
    colour to grey by BT.601 luma. DICOM through pydicom: the Modality LUT (rescale or LUT), then the VOI LUT
    (its LUT if present, else the first window), scaled over that output's range (the LUT's bit depth; the
    window's output range; with neither, the stored bits' range after the Modality LUT); MONOCHROME1 (or a
    Presentation LUT Shape INVERSE) inverted so that 1 is white; RGB DICOM to grey.

    Raises:
        DatasetError: the file is missing, not an image, or its pixels cannot be decoded (naming the file).

    Example:
        >>> read_image("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg").shape  # doctest: +SKIP
        (320, 390)
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no image file {path}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e.strerror or e}") from None
    if head[128:132] == b"DICM":
        return _read_dicom(path, force=False)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return _pillow_pixels(im)
    except UnidentifiedImageError:
        if path.suffix.lower() in (".dcm", ".dicom"):  # a DICOM file without its 128-byte preamble
            return _read_dicom(path, force=True)
        raise DatasetError(f"{path} is not an image synthmed reads (JPEG, PNG or DICOM)") from None
    except Image.DecompressionBombError as e:  # not an OSError: Pillow refuses it before decoding
        raise DatasetError(f"{path}: the image is larger than Pillow's safety limit ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: cannot decode the image ({e})") from None


def _pillow_pixels(im) -> "np.ndarray":
    import numpy as np

    if im.mode.startswith("I;16") or im.mode == "I":
        pixels, full = np.asarray(im).astype(np.float32), 65535.0
    elif im.mode == "F":
        pixels, full = np.asarray(im).astype(np.float32), 1.0
    elif im.mode == "1":
        pixels, full = np.asarray(im).astype(np.float32), 1.0
    elif im.mode in ("L", "LA"):
        pixels, full = np.asarray(im.getchannel(0)).astype(np.float32), 255.0
    else:
        rgb = np.asarray(im.convert("RGB")).astype(np.float32)
        pixels, full = rgb @ np.asarray(_LUMA, dtype=np.float32), 255.0
    return (pixels / np.float32(full)).clip(0.0, 1.0).astype(np.float32)


def _read_dicom(path: Path, *, force: bool) -> "np.ndarray":
    import numpy as np
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    # 1. The file and its pixels
    try:
        ds = pydicom.dcmread(path, force=force)
    except Exception as e:  # pydicom raises many kinds on a damaged file
        raise DatasetError(f"{path}: not a readable DICOM file ({e})") from None
    if "PixelData" not in ds:
        raise DatasetError(f"{path} is a DICOM object without an image (no Pixel Data; an SR or a presentation "
                           "state?)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DatasetError(f"{path} holds {frames} frames; a radiograph has one")
    try:
        stored = ds.pixel_array
    except Exception as e:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        hint = (" Compressed DICOM needs a decoder: pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"
                if getattr(syntax, "is_compressed", True) else " The file may be cut short or damaged.")
        raise DatasetError(f"{path}: cannot decode its pixel data ({getattr(syntax, 'name', syntax)}): {e}.{hint}"
                           ) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    bits = int(ds.get("BitsStored", 8 * stored.dtype.itemsize))
    # 2. Colour: to grey
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):  # pydicom gives these as RGB
        if stored.ndim != 3 or stored.shape[-1] != 3:
            raise DatasetError(f"{path}: {photometric} pixels of shape {stored.shape}, expected [H, W, 3]")
        grey = stored.astype(np.float64) @ np.asarray(_LUMA)
        return (grey / (2 ** bits - 1)).clip(0.0, 1.0).astype(np.float32)
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or stored.ndim != 2:
        raise DatasetError(f"{path}: photometric interpretation {photometric} with pixels of shape {stored.shape} "
                           "is not a greyscale radiograph synthmed reads")
    # 3. Greyscale: Modality LUT, then VOI LUT, scaled over the VOI's output range
    values = apply_modality_lut(stored, ds)
    voi_lut = ds.get("VOILUTSequence")
    voi_lut = voi_lut if voi_lut and voi_lut[0].get("LUTDescriptor") and "LUTData" in voi_lut[0] else None
    out = None
    if voi_lut is not None:
        if values.dtype.kind == "f" and np.array_equal(values, np.round(values)):
            values = values.astype(np.int64)  # a rescale of 1/0 gives floats; the LUT indexes by integers
        out = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
        lo, hi = 0.0, float(2 ** int(voi_lut[0].LUTDescriptor[2]) - 1)
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        try:
            out = apply_voi_lut(values, ds, index=0, prefer_lut=False)
            # the window's output range, as pydicom computes it: the ends it maps -inf and +inf to
            lo, hi = apply_voi_lut(np.array([-np.inf, np.inf]), ds, index=0, prefer_lut=False).tolist()
        except ValueError:  # a window of width < 1 and the like: show the image unwindowed, as viewers do
            out = None
    if out is None:
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        ends = np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2 ** bits - 1],
                        dtype=stored.dtype)
        lo, hi = sorted(np.asarray(apply_modality_lut(ends, ds), dtype=np.float64).tolist())
        out = np.asarray(values, dtype=np.float64)
    scaled = (out - lo) / (hi - lo) if hi > lo else np.zeros(out.shape)
    # 4. MONOCHROME1 shows its lowest value white
    inverse = str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE"
    if photometric == "MONOCHROME1" or inverse:
        scaled = 1.0 - scaled
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- training on a real set

# Where a training prompt comes from: the record's labels through a synthmed template, or its report's impression.
PROMPT_SOURCES = ("labels", "reports")
# A record without an impression under prompts="reports": left out (counted), or prompted from its labels.
NO_REPORT_POLICIES = ("skip", "labels")
CROPS = ("center", "random")

# TrainingPairs.skipped reasons (besides LATERAL and UNKNOWN_VIEW, as for Dataset.skipped)
NO_REPORT = "no report impression"
NO_FINDINGS = "no finding to prompt (labels blank, uncertain or unmapped)"
# TrainingPairs.notes: records kept whose prompt says less than the dataset's labels
NOTE_UNCERTAIN = "uncertain finding left out of the prompt"
NOTE_NO_FINDING = "No Finding beside a finding: no_finding left out of the prompt"
NOTE_LABELS_FOR_REPORT = "no report impression: prompt from the labels"


@dataclass(frozen=True, slots=True)
class TrainingPair:
    """One image of a real dataset and the prompt to train on.

    Args:
        path: the image file (the record's, absolute).
        prompt: the text: the labels filled into a synthmed template, or the report's impression.
        case_id: the record's source id.
        split: the record's split; ``train`` where the dataset names none (as a blank split in a manifest).
        source: what the prompt was made from: ``labels`` or ``report``.
    """

    path: Path
    prompt: str
    case_id: str
    split: str
    source: str = "labels"


@dataclass
class TrainingPairs:
    """The pairs :func:`training_pairs` made, and what it left out or shortened.

    Attributes:
        pairs: the (image, prompt) pairs, in the dataset's order.
        prompts: ``labels`` or ``reports``.
        template_id: the template the label prompts were filled into (a built-in name or ``custom-<sha256[:8]>``).
        skipped: reason -> records left out (no report impression, no finding to prompt, no age for a template
            that needs one, another split, a lateral under ``frontal_only``, ...).
        notes: what -> records kept whose prompt leaves out part of their labels (an unmapped label, an uncertain
            finding, No Finding beside a finding) or that fell back to their labels for want of a report.
    """

    pairs: list[TrainingPair]
    prompts: str
    template_id: str
    skipped: dict[str, int]
    notes: dict[str, int]

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[TrainingPair]:
        return iter(self.pairs)

    def __getitem__(self, index: int) -> TrainingPair:
        return self.pairs[index]

    def summary(self) -> str:
        """One line: how many pairs, from what, what was left out and what shortened."""
        def counts(c: Mapping[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"

        source = "report impressions" if self.prompts == "reports" else f"labels (template {self.template_id})"
        return (f"{len(self.pairs)} training pairs, prompts from {source}; skipped: {counts(self.skipped)}; "
                f"notes: {counts(self.notes)}")


def _prompt_spec(template: "str | PromptSpec") -> "PromptSpec":
    """A built-in template's name, a template text or a PromptSpec, checked as a spec's ``prompt.template`` is."""
    from .spec import BUILTIN_TEMPLATES, PromptSpec, check_template

    if isinstance(template, PromptSpec):
        text, template_id = template.template, template.template_id
        if template_id in BUILTIN_TEMPLATES:
            return template
    elif not isinstance(template, str):
        raise DatasetError(f"template={template!r}: give a built-in template's name "
                           f"({', '.join(BUILTIN_TEMPLATES)}), a template text or a PromptSpec")
    elif template in BUILTIN_TEMPLATES:
        return PromptSpec(template=BUILTIN_TEMPLATES[template], template_id=template)
    else:
        by_text = {t: name for name, t in BUILTIN_TEMPLATES.items()}
        if template in by_text:  # a built-in written out keeps its version id
            return PromptSpec(template=template, template_id=by_text[template])
        text, template_id = template, "custom-" + hashlib.sha256(template.encode("utf-8")).hexdigest()[:8]
    problems = check_template(text)
    if problems:
        raise DatasetError(f"template={text!r}: " + "; ".join(problems)
                           + f" (built-in templates: {', '.join(BUILTIN_TEMPLATES)})")
    if isinstance(template, str):
        return PromptSpec(template=text, template_id=template_id)
    return template


# The template placeholders that need a value of the record (findings always have one, possibly empty)
_PLACEHOLDER_FIELDS = {"view": "view", "view_long": "view", "age": "age", "sex": "sex"}


def training_pairs(dataset: Dataset, *, prompts: str = "labels", template: "str | PromptSpec" = "synthmed-v1",
                   split: str | None = None, frontal_only: bool = False, no_report: str = "skip") -> TrainingPairs:
    """Turn a real dataset's records into (image, prompt) pairs to fine-tune a model on.

    With ``prompts="labels"`` each record becomes a :class:`synthmed.sampler.Case` (its findings, sex, age and
    view) filled into a synthmed template by :func:`synthmed.prompts.build_prompt`, so a model fine-tuned on real
    images answers to the prompts a spec writes. With ``prompts="reports"`` the prompt is the report's impression,
    whitespace folded (RoentGen's recipe, Chambon et al. 2022); a record without one is left out and counted
    (``no_report="skip"``) or prompted from its labels (``no_report="labels"``, counted in ``notes``).

    Nothing is dropped silently. Left out and counted in ``skipped``: a record with no finding to prompt (every
    label blank, uncertain under ``ignore``, or unmapped), one lacking the sex, age or view its template names
    (``roentgen-v1`` names none), one of another split, a lateral or unknown view under ``frontal_only``. Kept and
    counted in ``notes``: a record whose prompt leaves out an unmapped label (NIH's Hernia) or an uncertain
    finding, or No Finding beside a finding (CheXpert's No Finding with Support Devices is synthmed's
    ``support_devices`` alone; beside a disease it is the labeler's contradiction, and the disease is kept).

    Args:
        dataset: what :func:`read_dataset` read (its ``frontal_only`` and ``uncertain`` policy already applied).
        prompts: ``labels`` or ``reports``.
        template: a built-in template's name (``synthmed-v1``, ``roentgen-v1``), a template text with
            ``{findings}`` (and ``{view}``, ``{view_long}``, ``{age}``, ``{sex}``), or a spec's PromptSpec.
        split: keep the records of this split only (a record without one counts as ``train``); None keeps all.
        frontal_only: keep PA and AP only, as ``read_dataset(frontal_only=True)`` does.
        no_report: under ``prompts="reports"``: ``skip`` or ``labels``.

    Raises:
        DatasetError: an unknown ``prompts``/``no_report`` or a template with problems (every one named).

    Example:
        >>> pairs = training_pairs(read_dataset("/data/CheXpert-v1.0-small"), split="train")  # doctest: +SKIP
        >>> pairs[0].prompt  # doctest: +SKIP
        'AP chest radiograph of a 68 year old female. Pneumonia.'
    """
    from .prompts import build_prompt
    from .sampler import Case

    # 1. Check the arguments
    if prompts not in PROMPT_SOURCES:
        raise DatasetError(f"prompts={prompts!r}: use one of {', '.join(PROMPT_SOURCES)}")
    if no_report not in NO_REPORT_POLICIES:
        raise DatasetError(f"no_report={no_report!r}: use one of {', '.join(NO_REPORT_POLICIES)}")
    prompt_spec = _prompt_spec(template)
    needs = {_PLACEHOLDER_FIELDS[name] for _, name, _, _ in string.Formatter().parse(prompt_spec.template)
             if name in _PLACEHOLDER_FIELDS}
    vocab = get_vocabulary()
    devices = {f.id for f in vocab.findings.values() if f.chexpert == "Support Devices"}
    pairs: list[TrainingPair] = []
    skipped: Counter = Counter()
    notes: Counter = Counter()
    # 2. One pair per record that can have one
    for index, record in enumerate(dataset.records):
        if frontal_only and record.view not in FRONTAL_VIEWS:
            skipped[LATERAL if record.view == "LL" else UNKNOWN_VIEW] += 1
            continue
        record_split = record.split or "train"
        if split is not None and record_split != split:
            skipped[f"split {record_split} (not {split})"] += 1
            continue
        if prompts == "reports":
            impression = " ".join((record.impression or "").split())
            if impression:
                pairs.append(TrainingPair(record.path, impression, record.source_id, record_split, "report"))
                continue
            if no_report == "skip":
                skipped[NO_REPORT] += 1
                continue
        # 3. The labels, as a case of synthmed's
        findings = list(record.findings)
        if len(findings) > 1 and any(f.finding == "no_finding" for f in findings):
            findings = [f for f in findings if f.finding != "no_finding"]
            if any(f.finding not in devices for f in findings):
                notes[NOTE_NO_FINDING] += 1
        if not findings:
            skipped[NO_FINDINGS] += 1
            continue
        missing = sorted(name for name in needs if getattr(record, name) is None)
        if missing:
            skipped[f"no {' or '.join(missing)} (template {prompt_spec.template_id} needs it)"] += 1
            continue
        case = Case(record.source_id, index, record_split, None, tuple(findings), record.sex, record.age, record.view)
        try:
            text = build_prompt(case, prompt_spec, vocab).text
        except (KeyError, ValueError) as e:  # a value the vocabulary lacks: counted, not fatal
            skipped[f"cannot fill the template ({e})"] += 1
            continue
        for label in record.unmapped:
            notes[f"unmapped label left out of the prompt: {label}"] += 1
        if record.uncertain:
            notes[NOTE_UNCERTAIN] += 1
        if prompts == "reports":
            notes[NOTE_LABELS_FOR_REPORT] += 1
        pairs.append(TrainingPair(record.path, text, record.source_id, record_split, "labels"))
    return TrainingPairs(pairs, prompts, prompt_spec.template_id, dict(skipped), dict(notes))


def prepare_image(image: "str | os.PathLike | np.ndarray", size: int, *, crop: str = "center",
                  rng: "np.random.Generator | None" = None) -> "np.ndarray":
    """An image of any size as a ``size`` x ``size`` training image: shorter side to ``size``, aspect kept, then
    a square crop across the longer side.

    The file is read by :func:`read_image` (DICOM's VOI LUT and MONOCHROME1, 16-bit PNG, JPEG) and resized from
    its float values, not from 8 bits, with Pillow's Lanczos filter (antialiased when shrinking; it rings a
    little at hard edges, so the result is clipped to [0, 1]). An image whose shorter side is below ``size`` is
    enlarged the same way: no padding, and no detail is added. ``crop="center"`` takes the middle;
    ``crop="random"`` draws the offset along the longer side from ``rng`` (one integer per image, so the same
    seed gives the same crop). A square image has no offset to draw: both crops are the whole image.

    An array is taken as it stands only when it says its own scale: float values in [0, 1] (as :func:`read_image`
    returns), or uint8 (divided by 255, as ``np.asarray(Image.open(f))`` gives an 8-bit image). Any other integer
    array is refused: its full scale (65535 for a 16-bit PNG, 4095 for 12 bits stored, a signed CT's range) is not
    in the array, and a guess gives a dark or an all-white image without a word. Give the file instead (its bit
    depth is read), or divide by the full scale yourself. NaN, infinity and floats outside [0, 1] are refused too.

    Args:
        image: an image file, or an array [H, W]: float in [0, 1], or uint8.
        size: the training size in pixels.
        crop: ``center`` or ``random``.
        rng: a ``numpy.random.Generator``; required for ``crop="random"``.

    Returns:
        float32 [size, size] in [0, 1], 0 black.

    Raises:
        DatasetError: a bad argument, an array that does not say its scale, or an image file that cannot be read
            (naming it).

    Example:
        >>> import numpy as np
        >>> prepare_image(np.zeros((390, 320), np.float32), 256).shape
        (256, 256)
    """
    import numpy as np
    from PIL import Image

    # 1. Check the arguments
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise DatasetError(f"size={size!r}: give the training size in pixels, a positive whole number")
    if crop not in CROPS:
        raise DatasetError(f"crop={crop!r}: use one of {', '.join(CROPS)}")
    if crop == "random" and not isinstance(rng, np.random.Generator):
        raise DatasetError(f"crop='random' draws its offset from rng=, a numpy.random.Generator "
                           f"(numpy.random.default_rng(seed)); got {rng!r}")
    # 2. The pixels, as floats
    if isinstance(image, np.ndarray):
        pixels = image
        if pixels.ndim != 2 or pixels.size == 0:
            raise DatasetError(f"image: give a 2-D array [H, W], not one of shape {pixels.shape}")
        if pixels.dtype == np.uint8:
            pixels = pixels / np.float32(255)
        elif pixels.dtype.kind in "biu":
            raise DatasetError(f"image: an array of {pixels.dtype} (values {pixels.min()} to {pixels.max()}) does not "
                               "say its full scale; divide it by that (65535 for a 16-bit PNG, 4095 for 12 bits "
                               "stored) to give floats in [0, 1], or give the image file (its bit depth is read)")
        elif pixels.dtype.kind != "f":
            raise DatasetError(f"image: give a float array in [0, 1] or a uint8 one, not one of dtype {pixels.dtype}")
        elif not np.isfinite(pixels).all():
            raise DatasetError(f"image: the array holds NaN or infinity ({np.count_nonzero(~np.isfinite(pixels))} "
                               "values); give floats in [0, 1]")
        elif pixels.min() < 0 or pixels.max() > 1:
            raise DatasetError(f"image: values from {pixels.min():g} to {pixels.max():g}; give floats in [0, 1] "
                               "(0 black), or uint8")
    else:
        pixels = read_image(image)
    pixels = np.asarray(pixels, dtype=np.float32)
    height, width = pixels.shape
    # 3. Shorter side to size, aspect kept
    scale = size / min(height, width)
    new_h = size if height <= width else max(size, int(height * scale + 0.5))
    new_w = size if width <= height else max(size, int(width * scale + 0.5))
    if (new_h, new_w) != (height, width):
        resized = Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.LANCZOS)
        pixels = np.asarray(resized, dtype=np.float32)
    # 4. The square: the middle, or an offset drawn along the longer side
    extra_h, extra_w = new_h - size, new_w - size
    if crop == "center":
        top, left = extra_h // 2, extra_w // 2
    else:
        offset = int(rng.integers(0, max(extra_h, extra_w) + 1))
        top, left = (offset, 0) if extra_h else (0, offset)
    out = pixels[top:top + size, left:left + size]
    return np.ascontiguousarray(np.clip(out, 0.0, 1.0), dtype=np.float32)
