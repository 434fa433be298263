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
from pathlib import Path
from typing import Iterable, Iterator

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


def _csv_lines(rows: Iterable[dict], header: bool) -> Iterator[str]:
    fmt = _RowFormatter()
    if header:
        yield fmt.header()
    for row in rows:
        yield fmt.row(row)


def write_part(path: Path, rows: list[dict]) -> None:
    """Write one manifest part (header + rows) atomically."""
    atomic_write_text_lines(path, _csv_lines(rows, header=True))


def read_part(path: Path) -> list[dict]:
    """Rows of a manifest part or of a merged manifest, as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
            raise ValueError(f"{path} does not have the manifest columns of this synthmed version")
        return list(reader)


def merge_parts(parts: Iterable[tuple[Path, int]], out: Path) -> int:
    """Concatenate the first ``n`` rows of each part into ``out`` (streaming, atomic); returns the row count."""
    count = 0

    def rows() -> Iterator[dict]:
        nonlocal count
        for path, n in parts:
            for row in read_part(path)[:n]:
                count += 1
                yield row

    atomic_write_text_lines(out, _csv_lines(rows(), header=True))
    return count


def write_split_metadata(manifest: Path, out: Path) -> list[Path]:
    """Write ``images/<split>/metadata.csv`` for Hugging Face imagefolder, streaming the manifest.

    imagefolder takes splits from folder names and labels from a metadata.csv beside the
    images, whose ``file_name`` is relative to it; images it has no row for (masks) are
    left out. Returns the files written.
    """
    import os

    from ..atomic import _commit, _temp_name

    handles: dict[str, tuple] = {}
    fmt = _RowFormatter()
    try:
        with open(manifest, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if not row["png_path"]:
                    continue
                folder = out / os.path.dirname(row["png_path"])
                key = str(folder)
                if key not in handles:
                    path = folder / "metadata.csv"
                    tmp = _temp_name(path)
                    f = open(tmp, "w", newline="", encoding="utf-8")
                    f.write(fmt.header() + "\n")
                    handles[key] = (path, tmp, f)
                handles[key][2].write(fmt.row({**row, "file_name": os.path.basename(row["png_path"])}) + "\n")
        for path, tmp, f in handles.values():
            _commit(tmp, path, f)
    except BaseException:
        for _, tmp, f in handles.values():
            f.close()
            tmp.unlink(missing_ok=True)
        raise
    return [h[0] for h in handles.values()]
