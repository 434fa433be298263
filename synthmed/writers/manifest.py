"""The manifest: one CSV row per image, written as one part per chunk of cases, merged at the end.

Columns are defined (with their meaning) in ``schemas/manifest_columns.json``; the 14 CheXpert
columns are named exactly as in CheXpert's CSV.

Example:
    >>> MANIFEST_COLUMNS[:3]
    ('file_name', 'case_id', 'index')
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Collection, Iterable, Iterator

from ..atomic import atomic_write_text_lines
from ..vocabulary import schemas_dir


def _columns() -> tuple[str, ...]:
    data = json.loads((schemas_dir() / "manifest_columns.json").read_text(encoding="utf-8"))
    return tuple(c["name"] for c in data["columns"])


MANIFEST_COLUMNS = _columns()


class _RowFormatter:
    """One CSV line (without its newline) per row; fields holding \r or \n are quoted."""

    def __init__(self):
        self.buf = io.StringIO()
        # "\r\n" as terminator makes the writer quote fields holding \r or \n; it is cut off each line
        self.writer = csv.DictWriter(self.buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\r\n",
                                     extrasaction="raise")

    def _take(self) -> str:
        line = self.buf.getvalue()[:-2]
        self.buf.seek(0)
        self.buf.truncate()
        return line

    def header(self) -> str:
        self.writer.writeheader()
        return self._take()

    def row(self, row: dict) -> str:
        self.writer.writerow(row)
        return self._take()


def csv_lines(rows: Iterable[dict], header: bool) -> Iterator[str]:
    """Manifest rows as CSV lines (without newlines), the header first when ``header``."""
    fmt = _RowFormatter()
    if header:
        yield fmt.header()
    for row in rows:
        yield fmt.row(row)


def write_part(path: Path, rows: list[dict]) -> None:
    """Write one manifest part (header + rows) atomically."""
    atomic_write_text_lines(path, csv_lines(rows, header=True))


def read_part(path: Path) -> list[dict]:
    """Rows of a manifest part or of a merged manifest, as dicts of strings.

    ValueError names what is wrong: the columns that differ from this version's, or the line of a row with too few
    or too many fields (a spreadsheet's blank ``,,,`` row, a row cut short). A byte-order mark (a spreadsheet's
    "CSV UTF-8") is read past.
    """
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = tuple(reader.fieldnames or ())
        if columns != MANIFEST_COLUMNS:
            missing = [c for c in MANIFEST_COLUMNS if c not in columns]
            extra = [c for c in columns if c not in MANIFEST_COLUMNS]
            why = "; ".join(part for part in (
                f"missing {', '.join(map(repr, missing[:5]))}{', ...' if len(missing) > 5 else ''}" if missing else "",
                f"not of it {', '.join(map(repr, extra[:5]))}{', ...' if len(extra) > 5 else ''}" if extra else "",
                "" if missing or extra else "the same columns in another order"
                                           + (" or twice" if len(columns) != len(set(columns)) else "")) if part)
            raise ValueError(f"{path} does not have the manifest columns of this synthmed version ({why})")
        rows = []
        for row in reader:
            problem = row_length_problem(row, len(columns))
            if problem:
                raise ValueError(f"{path}, line {reader.line_num}: {problem}")
            rows.append(row)
        return rows


def row_length_problem(row: dict, header: int) -> str | None:
    """Why a ``csv.DictReader`` row does not fit its header of ``header`` columns (DictReader fills a short row
    with None and keeps a long row's extra fields under the key None), or None when it fits.

    Example:
        >>> row_length_problem({"a": "1", "b": None}, 2)
        "the row has 1 fields, the header 2 (a spreadsheet's blank row, or a row cut short?); mend or delete it"
    """
    if None not in row and None not in row.values():
        return None
    fields = header - sum(v is None for k, v in row.items() if k is not None) + len(row.get(None) or ())
    return (f"the row has {fields} fields, the header {header} (a spreadsheet's blank row, or a row cut short?); "
            "mend or delete it")


def merge_parts(parts: Iterable[tuple[Path, int]], out: Path) -> int:
    """Concatenate the first ``n`` rows of each part into ``out`` (streaming, atomic); returns the row count."""
    count = 0

    def rows() -> Iterator[dict]:
        nonlocal count
        for path, n in parts:
            for row in read_part(path)[:n]:
                count += 1
                yield row

    atomic_write_text_lines(out, csv_lines(rows(), header=True))
    return count


def _metadata_rel(png_path: str, manifest: Path, n: int) -> str:
    """``images/<split>/metadata.csv`` beside a row's PNG; ValueError when the path leaves the folder."""
    path = Path(png_path)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{manifest} row {n}: png_path {png_path!r} leads outside the output folder")
    return (path.parent / "metadata.csv").as_posix()


def split_metadata_files(manifest: Path) -> list[str]:
    """The ``images/<split>/metadata.csv`` files (relative) the rows of a manifest call for, in first-seen order."""
    found: dict[str, None] = {}
    with open(manifest, newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.DictReader(fh), start=1):
            if row.get("png_path"):
                found.setdefault(_metadata_rel(row["png_path"], manifest, n))
    return list(found)


def write_split_metadata(manifest: Path, out: Path, *, only: Collection[str] | None = None) -> list[Path]:
    """Write ``images/<split>/metadata.csv`` for Hugging Face imagefolder, streaming the manifest.

    imagefolder takes splits from folder names and labels from a metadata.csv beside the
    images, whose ``file_name`` is relative to it; images it has no row for (masks) are
    left out. Every file is written under a temp name (``.metadata.csv.<pid>.tmp``) and renamed.

    Args:
        only: write just these metadata files (paths relative to ``out``); the rows of other folders are skipped.

    Returns:
        The files written.

    Raises:
        ValueError: a row's PNG lies outside ``out`` (by ``..``, an absolute path or a linked folder).
    """
    from ..atomic import commit_temp, open_temp

    handles: dict[str, tuple] = {}
    skipped: set[str] = set()
    base = out.resolve()
    fmt = _RowFormatter()
    try:
        with open(manifest, newline="", encoding="utf-8") as fh:
            for n, row in enumerate(csv.DictReader(fh), start=1):
                if not row["png_path"]:
                    continue
                rel = _metadata_rel(row["png_path"], manifest, n)
                if rel in skipped or (only is not None and rel not in only):
                    skipped.add(rel)
                    continue
                if rel not in handles:
                    path = out / rel
                    if not path.parent.resolve().is_relative_to(base):
                        raise ValueError(f"{manifest} row {n}: the folder of {row['png_path']!r} leads outside {out}")
                    tmp, f = open_temp(path, text=True)
                    f.write(fmt.header() + "\n")
                    handles[rel] = (path, tmp, f)
                handles[rel][2].write(fmt.row({**row, "file_name": os.path.basename(row["png_path"])}) + "\n")
        for path, tmp, f in handles.values():
            commit_temp(tmp, path, f)
    except BaseException:
        for _, tmp, f in handles.values():
            f.close()
            tmp.unlink(missing_ok=True)
        raise
    return [h[0] for h in handles.values()]


def write_split_metadata_claimed(manifest: Path, out: Path, ledger, key: str) -> tuple[list[Path], list[str]]:
    """:func:`write_split_metadata` under the rule that synthmed overwrites only files it recorded as its own.

    Each metadata.csv is claimed in ``ledger`` (a :class:`synthmed.ledger.Ledger` of ``out``) under ``key``
    before it is written, and its sha256 recorded after. One that exists and no claim names (a copied
    dataset, a user's file) is left alone, and so is one whose split folder is gone.

    Returns:
        (files written, messages naming the files left alone and why).
    """
    from ..ledger import ForeignFileError

    wanted, left = [], []
    for rel in split_metadata_files(manifest):
        if not (out / rel).parent.is_dir():
            left.append(f"{rel}: its folder {Path(rel).parent.as_posix()}/ does not exist")
            continue
        try:
            ledger.claim(key, [rel])
        except ForeignFileError as e:  # a user's file, or ours changed since: its own words say which
            left.append(f"{e}: left as it is")
            continue
        wanted.append(rel)
    written = write_split_metadata(manifest, out, only=set(wanted)) if wanted else []
    ledger.record_files(key, wanted)
    return written, left
