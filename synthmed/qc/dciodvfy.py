"""The ``dciodvfy`` check: dciodvfy (dicom3tools) reports no error on the DICOM image, SR and SEG.

It costs a process per file, so it runs on the first ``qc.dciodvfy_sample`` images with a DICOM file (each with
its SR and SEG); the images with errors are flagged ``dciodvfy``. Without dciodvfy installed (Debian package
dicom3tools) the check is skipped, with that reason.

Example:
    >>> section = dciodvfy_sample(Path("out/pneumonia"), rows, 5)  # doctest: +SKIP
    >>> section["status"], section["objects"]  # doctest: +SKIP
    ('pass', {'image': 5, 'sr': 5, 'seg': 2})
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Mapping, Sequence

from .check_table import flag_row
from .checks import inside_folder
from .inputs import CheckInputs
from .registry import get


def dciodvfy_available() -> bool:
    """Whether dciodvfy is on the PATH."""
    return shutil.which("dciodvfy") is not None


def dciodvfy_errors(path: Path, timeout: float = 60.0) -> list[str]:
    """dciodvfy's error lines for one file; its exit code is not reliable, so its output is read."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=timeout)
    return [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def dciodvfy_sample(out: Path, rows: Sequence[Mapping[str, str]], sample: int) -> dict:
    """Run dciodvfy on the DICOM objects of the first ``sample`` images of the manifest: each image, its SR and
    its SEG (it costs a process per file).

    Returns:
        {"status", "checked" (images), "files", "objects" ({image, sr, seg}: files checked), "available",
        "sample", "of", "failures": {case_id: [error lines, an SR's or SEG's prefixed with its file name]},
        "reason"?}
    """
    if not dciodvfy_available():
        return {"status": "skipped", "available": False, "checked": 0, "sample": sample, "failures": {},
                "reason": "dciodvfy is not installed (Debian package dicom3tools)"}
    with_dicom = [r for r in rows if r.get("dicom_path")]
    if not with_dicom:
        return {"status": "skipped", "available": True, "checked": 0, "sample": sample, "failures": {},
                "reason": "no DICOM files"}
    failures: dict[str, list[str]] = {}
    checked, objects = 0, {"image": 0, "sr": 0, "seg": 0}
    for row in with_dicom[:max(sample, 0)]:
        errors, any_checked = [], False
        for kind, column in (("image", "dicom_path"), ("sr", "sr_path"), ("seg", "seg_path")):
            rel = row.get(column) or ""
            path = out / rel
            if not rel or not inside_folder(rel) or not path.is_file():
                continue  # the readable check names it
            try:
                found = dciodvfy_errors(path)
            except (OSError, subprocess.TimeoutExpired) as e:
                found = [f"Error - dciodvfy did not run: {e}"]
            objects[kind] += 1
            any_checked = True
            errors += found if kind == "image" else [f"{Path(rel).name}: {line}" for line in found]
        checked += any_checked
        if errors:
            failures[row["case_id"]] = errors
    return {"status": "fail" if failures else "pass", "available": True, "checked": checked,
            "files": sum(objects.values()), "objects": objects, "sample": sample, "of": len(with_dicom),
            "failures": failures}


def section(inputs: CheckInputs) -> dict:
    """The ``dciodvfy`` section; flags the images whose image, SR or SEG has errors (the first five named)."""
    found = dciodvfy_sample(inputs.out, inputs.rows, inputs.config.dciodvfy_sample)
    for case_id, errors in found.get("failures", {}).items():
        inputs.by_id[case_id].fail("dciodvfy", "; ".join(errors[:5])
                                   + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""))
    return found


def table_rows(section: dict, inputs: CheckInputs) -> dict[str, dict]:
    """Its row counts the images flagged, among those of the sample; skipped without dciodvfy or DICOM files."""
    check = get("dciodvfy")
    entry = flag_row(check, inputs.results, inputs.gate)
    entry.update(checked=section.get("checked", 0), sample=section.get("sample"))
    if section["status"] == "skipped":
        entry.update(status="skipped", reason=section.get("reason"))
    return {check.name: entry}
