"""Manifest parts: write/read round trip, merging the first n rows of each part (streaming), the column
check, and the per-split metadata.csv files for Hugging Face imagefolder."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

import synthmed.writers.manifest as manifest_module
from synthmed.writers.manifest import MANIFEST_COLUMNS, merge_parts, read_part, write_part, write_split_metadata

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "manifest_columns.json"


def row(i: int, split: str = "train", png: bool = True, **extra) -> dict:
    r = {c: "" for c in MANIFEST_COLUMNS}
    case_id = f"case-{i:07d}"
    r.update({"case_id": case_id, "index": str(i), "split": split, "seed": str(2**64 - 1 - i),
              "png_path": f"images/{split}/{case_id}.png" if png else "",
              "dicom_path": f"dicom/{split}/{case_id}.dcm",
              "Pneumonia": str(i % 2), "No Finding": str(1 - i % 2),
              "prompt": f'PA chest radiograph, "quoted", comma, 右下肺叶肺炎 #{i}',
              "findings": "pneumonia:right_lower_lobe:mild|pleural_effusion:right:",
              "bboxes": json.dumps({"pneumonia": [1, 2, 3, 4]}, separators=(",", ":"))})
    r["file_name"] = r["png_path"] or r["dicom_path"]
    r.update(extra)
    return r


def test_columns_are_the_schema_columns():
    data = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert MANIFEST_COLUMNS == tuple(c["name"] for c in data["columns"])
    assert len(set(MANIFEST_COLUMNS)) == len(MANIFEST_COLUMNS)


def test_every_chexpert_column_documents_which_findings_set_it():
    """Each CheXpert column's description names exactly the vocabulary findings that set it (it cannot drift)."""
    import re

    from synthmed.vocabulary import CHEXPERT_COLUMNS, get_vocabulary

    vocab = get_vocabulary()
    described = {c["name"]: c["description"] for c in json.loads(SCHEMA.read_text(encoding="utf-8"))["columns"]}
    for column in CHEXPERT_COLUMNS:
        if column == "No Finding":
            assert "Support Devices" in described[column] and "CheXpert labeler" in described[column]
            continue
        named = re.search(r"maps to this column \(([^)]*)\)", described[column]).group(1).split(", ")
        assert named == [k for k, f in vocab.findings.items() if f.chexpert == column], column


def test_write_part_read_part_round_trip(tmp_path):
    rows = [row(i) for i in range(5)]
    rows[3]["qc_flags"] = "a|b"
    path = tmp_path / "part-000000.csv"
    write_part(path, rows)
    assert read_part(path) == rows
    with open(path, newline="", encoding="utf-8") as fh:
        assert next(csv.reader(fh)) == list(MANIFEST_COLUMNS)
    assert [p.name for p in tmp_path.iterdir()] == ["part-000000.csv"]  # no temp file left


@pytest.mark.parametrize("text", ["line one\nline two", "text,\nwatermark\n", "a\r\nb"])
def test_a_cell_with_a_line_break_round_trips(tmp_path, text):
    """A YAML block scalar (template: |) gives prompts with line breaks; the row must stay one row."""
    rows = [row(0, negative_prompt=text, prompt=text), row(1)]
    path = tmp_path / "part.csv"
    write_part(path, rows)
    assert read_part(path) == rows


def test_write_part_is_deterministic(tmp_path):
    rows = [row(i) for i in range(3)]
    write_part(tmp_path / "a.csv", rows)
    write_part(tmp_path / "b.csv", [dict(r) for r in rows])
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    data = (tmp_path / "a.csv").read_bytes()
    assert b"\r" not in data and data.count(b"\n") == len(rows) + 1  # LF line ends (#17 mutation check)


def test_write_part_rejects_an_unknown_column(tmp_path):
    with pytest.raises(ValueError):
        write_part(tmp_path / "p.csv", [row(0, not_a_column="x")])
    assert not (tmp_path / "p.csv").exists()


def test_an_empty_part_round_trips(tmp_path):
    write_part(tmp_path / "p.csv", [])
    assert read_part(tmp_path / "p.csv") == []


@pytest.mark.parametrize("header", [
    list(MANIFEST_COLUMNS[:-1]),                    # a column missing
    list(MANIFEST_COLUMNS) + ["extra"],             # a column added
    list(reversed(MANIFEST_COLUMNS)),               # another order
    ["case_id", "file_name"],                       # something else entirely
])
def test_read_part_rejects_other_columns(tmp_path, header):
    path = tmp_path / "other.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerow(["x"] * len(header))
    with pytest.raises(ValueError):
        read_part(path)


def test_read_part_rejects_an_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ValueError):
        read_part(path)


def test_merge_parts_takes_the_first_n_rows_of_each_part(tmp_path):
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    write_part(a, [row(i) for i in range(0, 5)])
    write_part(b, [row(i) for i in range(5, 12)])   # more rows than asked for: a part of a longer earlier run
    write_part(c, [row(i) for i in range(12, 14)])
    out = tmp_path / "manifest.csv"
    n = merge_parts([(a, 5), (b, 4), (c, 2)], out)
    assert n == 11
    got = read_part(out)
    assert [r["case_id"] for r in got] == [f"case-{i:07d}" for i in [*range(0, 5), *range(5, 9), 12, 13]]
    assert got[0] == row(0)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_merge_parts_streams(tmp_path, monkeypatch):
    """Rows of the first part reach the output before the second part is read; parts may be a generator."""
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"part-{k}.csv")
        write_part(paths[-1], [row(10 * k + i) for i in range(4)])
    events: list[tuple[str, str]] = []
    real_read, real_write = manifest_module.read_part, manifest_module.atomic_write_text_lines

    def read(path):
        events.append(("read", Path(path).name))
        return real_read(path)

    def write(path, lines):
        def watched():
            for line in lines:
                events.append(("line", line.split(",")[1] if "," in line else line))
                yield line
        return real_write(path, watched())

    monkeypatch.setattr(manifest_module, "read_part", read)
    monkeypatch.setattr(manifest_module, "atomic_write_text_lines", write)
    out = tmp_path / "manifest.csv"
    assert merge_parts(((p, 4) for p in paths), out) == 12
    first_row = events.index(("line", "case-0000000"))
    assert first_row < events.index(("read", "part-1.csv")) < events.index(("line", "case-0000010"))
    monkeypatch.undo()
    assert len(read_part(out)) == 12


def test_write_split_metadata_one_file_per_split(tmp_path):
    rows = [row(0, "train"), row(1, "val"), row(2, "train"), row(3, "test"), row(4, "train", png=False),
            row(5, "val")]
    manifest = tmp_path / "manifest.csv"
    write_part(manifest, rows)
    for split in ("train", "val", "test"):
        (tmp_path / "images" / split).mkdir(parents=True)
    written = write_split_metadata(manifest, tmp_path)
    assert sorted(written) == sorted(tmp_path / "images" / s / "metadata.csv" for s in ("train", "val", "test"))
    for split in ("train", "val", "test"):
        path = tmp_path / "images" / split / "metadata.csv"
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
            meta = list(reader)
        want = [r for r in rows if r["split"] == split and r["png_path"]]  # DICOM-only rows have no image here
        assert [m["case_id"] for m in meta] == [r["case_id"] for r in want]
        for m, r in zip(meta, want):
            assert m["file_name"] == f"{r['case_id']}.png"  # relative to the metadata.csv
            assert os.path.normpath(path.parent / m["file_name"]) == os.path.normpath(tmp_path / r["png_path"])
            assert {k: v for k, v in m.items() if k != "file_name"} == {k: v for k, v in r.items() if k != "file_name"}
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert not (tmp_path / "dicom").exists()
