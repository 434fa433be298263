"""The ``manifest_consistency`` check: every row says what the build's plan (cases.jsonl) says of its case.

And what the spec allows: splits, sexes, views, ages, finding cells, image size and bit depth, the spec hash.
Every case of cases.jsonl has a row. Without cases.jsonl the plan is drawn again from the card's spec; rows
that disagree with it fail with that reason (a redrawn plan is not the build's record).

Example:
    >>> section = manifest_consistency_report(spec, rows, cases)  # doctest: +SKIP
    >>> section["status"], section["rows_failed"]  # doctest: +SKIP
    ('pass', 0)
"""

from __future__ import annotations

from typing import Mapping

from .check_table import set_row
from .inputs import CheckInputs
from .registry import get
from .spec_fidelity import planned_count

MAX_PROBLEMS = 50            # the report lists this many rows


def _case_columns(case, vocab) -> dict[str, str]:
    """The manifest columns that say what a case is, as generate writes them."""
    labels = case.chexpert_labels(vocab)
    values = {"index": case.index, "split": case.split, "seed": case.seed,
              "findings": "|".join(f"{f.finding}:{f.location or ''}:{f.severity or ''}" for f in case.findings),
              "finding_codes": "|".join(str(vocab.findings[f.finding].code) for f in case.findings),
              "location": "|".join(f.location or "" for f in case.findings),
              "severity": "|".join(f.severity or "" for f in case.findings),
              **labels, "sex": case.sex, "age": case.age, "view": case.view}
    return {k: "" if v is None else str(v) for k, v in values.items()}


def _path_problems(spec, case, row, backend: str | None = None) -> list[str]:
    """The row's file columns against the files generate writes for its case: a row that names another case's files
    (rows swapped by hand) or leaves out masks a procedural backend draws would give a loader the wrong pictures.
    ``backend``: the set's (its card's), which decides the mask rule; else the row's own."""
    from ..backends import MASK_BACKENDS

    stem = f"{case.split}/{case.case_id}"
    formats = spec.image.formats
    findings = [f.finding for f in case.findings if f.finding != "no_finding"]
    masks = [f"masks/{stem}_mask_{finding}.png" for finding in findings]
    listed = [m for m in (row.get("mask_paths") or "").split("|") if m]
    if (backend or row.get("backend") or "") in MASK_BACKENDS:
        want_masks = masks
    else:  # another backend may draw some masks, of findings the case lists or not (those go last): the row's own
        ours = [m for m in listed if m.startswith(f"masks/{stem}_mask_") and m.endswith(".png")]
        want_masks = ours if len(set(ours)) == len(listed) else masks
    want = {"png_path": f"images/{stem}.png" if "png" in formats else "",
            "dicom_path": f"dicom/{stem}.dcm" if "dicom" in formats else "",
            "sr_path": f"dicom/{stem}_sr.dcm" if "dicom" in formats else "",
            "seg_path": f"dicom/{stem}_seg.dcm" if "dicom" in formats and (listed or want_masks) else ""}
    want["file_name"] = want["png_path"] or want["dicom_path"]
    found = [f"{column} {row.get(column) or ''!r} is not {case.case_id}'s {value!r}"
             for column, value in want.items() if (row.get(column) or "") != value]
    if listed != want_masks:
        found.append(f"mask_paths {row.get('mask_paths') or ''!r} are not the masks of {case.case_id}'s findings "
                     f"({'|'.join(want_masks) or 'none'!r})")
    return found


def _age_range(age) -> tuple[int, int]:
    if age.distribution == "fixed":
        return int(age.value), int(age.value)
    if age.distribution == "categorical":
        return min(b[0] for b in age.bins), max(b[1] for b in age.bins)
    return int(age.min), int(age.max)


def manifest_consistency_report(spec, rows: list[dict], cases: Mapping | None, cases_why: str | None = None,
                                backend: str | None = None) -> dict:
    """Does every row say what the build's plan (cases.jsonl) says of its case, within what the spec allows?

    Per row: a known, unique case id; split, findings (and their codes, locations, severities, CheXpert
    columns), sex, age and view equal to the case's; width, height and bit depth whole numbers equal to the
    spec's image; split, sex, view and finding cell among the spec's; the spec hash the card's. And every case
    of cases.jsonl has a row. ``cases``: case id -> Case; None (cases.jsonl missing or unreadable, ``cases_why``)
    draws the plan again from the card's spec. Rows that agree with it pass; rows that do not fail with the
    reason, since a redrawn plan is not the build's record (a card may not keep the order of the spec's
    splits, sexes or views, and another order draws another plan). ``backend``: the set's, by its card; each row
    must name it.
    """
    from ..cells import enumerate_cells
    from ..sampler import sample_cases
    from ..vocabulary import get_vocabulary

    vocab = get_vocabulary()
    redrawn = cases is None
    if redrawn:
        cases = {c.case_id: c for c in sample_cases(spec, limit=planned_count(spec, rows, None))}
    plan = "the plan drawn again" if redrawn else "cases.jsonl"
    allowed = {"split": tuple(spec.splits.keys), "sex": tuple(spec.sex.keys), "view": tuple(spec.view.keys)}
    cells = {"|".join(f"{f.finding}:{f.location or ''}:{f.severity or ''}" for f in cell.findings)
             for cell in enumerate_cells(spec.findings, vocab)}
    size = {"width": spec.image.width, "height": spec.image.height, "bit_depth": spec.image.bit_depth}
    if "png" in spec.image.formats:
        size["png_bit_depth"] = spec.image.png_bit_depth
    low, high = _age_range(spec.age)
    problems: list[str] = []
    bad_rows = 0
    seen: dict[str, int] = {}
    for n, row in enumerate(rows, start=1):
        found = []
        case_id = row.get("case_id") or ""
        if case_id in seen:
            found.append(f"case_id {case_id!r} is also row {seen[case_id]}'s")
        seen.setdefault(case_id, n)
        for column, value in size.items():
            text = row.get(column) or ""
            if not text.isdigit() or int(text) != value:
                found.append(f"{column} {text!r} is not the spec's {value}")
        for column, names in allowed.items():
            if (row.get(column) or "") not in names:
                found.append(f"{column} {row.get(column)!r} is not one of the spec's ({', '.join(names)})")
        age = row.get("age") or ""
        if not age.isdigit() or not low <= int(age) <= high:
            found.append(f"age {age!r} is not a whole number of years in the spec's {low}..{high}")
        if (row.get("findings") or "") not in cells:
            found.append(f"findings {row.get('findings')!r} are not a finding cell of the spec")
        if backend and (row.get("backend") or "") != backend:
            found.append(f"backend {row.get('backend')!r} is not the set's {backend!r} (dataset_card.json)")
        if row.get("spec_hash") and row["spec_hash"] != spec.spec_hash:
            found.append(f"spec_hash {row['spec_hash'][:12]} is not the card's spec ({spec.spec_hash[:12]})")
        case = cases.get(case_id)
        if case is None:
            found.append(f"case_id {case_id!r} is not in {plan}")
        else:
            differ = [f"{column} {row.get(column)!r} (the plan: {value!r})"
                      for column, value in _case_columns(case, vocab).items() if (row.get(column) or "") != value]
            if differ:
                found.append(f"disagrees with {plan}: " + "; ".join(differ[:4])
                             + (f"; and {len(differ) - 4} more" if len(differ) > 4 else ""))
            found += _path_problems(spec, case, row, backend)
        if found:
            bad_rows += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(f"row {n} ({case_id or '?'}): " + "; ".join(found))
    missing = [c for c in cases if c not in seen]
    if missing:
        problems.append(f"{len(missing):,} case(s) of {plan} have no row: {', '.join(missing[:5])}"
                        + (", ..." if len(missing) > 5 else ""))
    failed = bad_rows + len(missing)
    why = cases_why or "cases.jsonl is missing"
    if redrawn and failed:
        problems.insert(0, f"{why}: the rows cannot be checked against the plan; the plan drawn again from "
                           f"dataset_card.json's spec disagrees with {failed:,} row(s) or case(s) (wrong rows, or a "
                           "card that does not keep the order of the spec's splits, sexes or views, which draws "
                           "another plan): restore cases.jsonl to check them")
    return {"status": "fail" if failed else "pass", "value": failed, "threshold": 0, "rows": len(rows),
            "rows_failed": bad_rows, "cases_without_row": len(missing), "problems": problems,
            "against": (f"the plan drawn again from dataset_card.json's spec ({why}) and the spec" if redrawn
                        else "cases.jsonl and the spec")}


QC_COLUMNS = ("qc_status", "qc_flags", "qc_tries", "qc_seed")  # qc writes them after its checks: not compared


def split_metadata_problems(out, rows: list[dict]) -> tuple[int, list[str]]:
    """Each ``images/<split>/metadata.csv`` (what Hugging Face imagefolder reads the labels from) against the
    manifest: the rows of its folder, each the manifest's row with ``file_name`` relative to the folder (the qc
    columns aside). Read as a stream, never through a link. Returns (rows that differ or are missing, what is wrong).
    """
    import csv
    from collections import defaultdict
    from pathlib import PurePosixPath

    from ..writers.manifest import MANIFEST_COLUMNS, row_length_problem

    by_folder: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        if row.get("png_path"):
            by_folder[str(PurePosixPath(row["png_path"]).parent)][row.get("case_id") or ""] = row
    failed, problems = 0, []
    base = out.resolve()
    try:  # a split's metadata.csv whose split has no row left in manifest.csv: a loader still reads that split
        for split in sorted((out / "images").iterdir()):
            if split.is_dir() and not split.is_symlink() and (split / "metadata.csv").exists():
                by_folder.setdefault(f"images/{split.name}", {})
    except OSError:
        pass
    for folder, expected in by_folder.items():
        rel = f"{folder}/metadata.csv"
        path = out / rel
        if path.is_symlink() or (path.exists() and not path.resolve().is_relative_to(base)):
            failed += max(1, len(expected))  # a split with no row left in the manifest: its file counts
            problems.append(f"{rel} is a link (qc follows no link out of the folder, and a loader should not)")
            continue
        if not path.is_file():
            continue  # not written (yet): nothing a loader could read
        seen: set[str] = set()
        try:
            with open(path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
                    raise ValueError("its columns are not the manifest's")
                for row in reader:
                    n, case_id = reader.line_num, row.get("case_id") or ""
                    want = expected.get(case_id)
                    problem = row_length_problem(row, len(MANIFEST_COLUMNS))
                    if problem:
                        differ = [problem]
                    elif want is None or case_id in seen:
                        differ = [f"case_id {case_id!r} is {'a second row' if case_id in seen else 'no row'} of "
                                  f"manifest.csv in {folder}/"]
                    else:
                        want = {**want, "file_name": PurePosixPath(want["png_path"]).name}
                        differ = [f"{c} {row.get(c)!r} (manifest.csv: {want.get(c)!r})" for c in want
                                  if c not in QC_COLUMNS and (row.get(c) or "") != (want.get(c) or "")]
                    seen.add(case_id)
                    if differ:
                        failed += 1
                        if len(problems) < MAX_PROBLEMS:
                            problems.append(f"{rel}, line {n} ({case_id or '?'}): " + "; ".join(differ[:4])
                                            + (f"; and {len(differ) - 4} more" if len(differ) > 4 else ""))
        except (OSError, ValueError, csv.Error) as e:  # UnicodeDecodeError is a ValueError
            failed += max(1, len(expected))  # a split with no row left in the manifest: its file counts
            problems.append(f"{rel}: cannot be read as a metadata file of this set ({e})")
            continue
        missing = [c for c in expected if c not in seen]
        if missing:
            failed += len(missing)
            problems.append(f"{rel} has no row for {len(missing):,} case(s) of manifest.csv: {', '.join(missing[:5])}")
    return failed, problems


def card_backend(out) -> str | None:
    """The backend that made the set, as its dataset_card.json names it; None where the card does not say."""
    import json

    try:
        name = json.loads((out / "dataset_card.json").read_text(encoding="utf-8"))["backend"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name else None


def section(inputs: CheckInputs) -> dict:
    """The ``manifest_consistency`` section, against cases.jsonl (or the plan drawn again without it), and each
    split's metadata.csv against the manifest."""
    report = manifest_consistency_report(inputs.spec, inputs.rows, inputs.cases, inputs.cases_why,
                                         card_backend(inputs.out))
    failed, problems = split_metadata_problems(inputs.out, inputs.rows)
    if failed:
        report.update(status="fail", value=report["value"] + failed, metadata_rows_failed=failed,
                      problems=report["problems"] + problems)
    return report


def table_rows(section: dict, inputs: CheckInputs) -> dict[str, dict]:
    """Its row counts the rows (and cases without a row) that disagree; none may."""
    check = get("manifest_consistency")
    entry = set_row(check, section, section.get("value"), 0, section["status"], inputs.gate)
    entry.update(failed=section.get("value"), checked=section.get("rows"), unit="rows")
    return {check.name: entry}
