"""Hostile inputs to ``synthmed qc`` (issue #17): manifests, images and folders a careless or hostile user hands it.

qc reads what a manifest names and writes its reports and the manifest's qc columns: it must read only inside the
output folder, write only files synthmed recorded as its own, refuse decompression bombs before allocating, and
give a verdict a new user can trust. Every build is a 12-case pattern set at 64 x 64, made once and copied per test.
"""

from __future__ import annotations

import csv
import ctypes
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from synthmed.build import generate
from synthmed.cli import main as cli_main
from synthmed.qc import QCError, qc
from synthmed.qc.checks import check_generated, decode_dicom, decode_png
from synthmed.writers.manifest import merge_parts, write_part

COUNT = 12
ROOT = Path(__file__).resolve().parents[2]


def spec_text(extra: str = "", count: int = COUNT, size: int = 64) -> str:
    return textwrap.dedent(f"""\
        spec_version: 1
        name: hostile-qc
        seed: 11
        count: {count}
        splits: {{train: 0.75, test: 0.25}}
        image: {{size: {size}}}
        findings:
          - finding: no_finding
            weight: 0.5
          - finding: pneumonia
            weight: 0.5
            location: right_lower_lobe
            severity: {{mild: 0.5, severe: 0.5}}
        """) + extra


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        result = generate(spec_text(), out, backend="pattern", progress=False)
    assert result.qc is not None and result.qc.passed, result.qc.report["failed_checks"]
    return out


@pytest.fixture
def out(built, tmp_path) -> Path:
    target = tmp_path / "out"
    shutil.copytree(built, target, symlinks=True)
    return target


def run(*args):
    return CliRunner().invoke(cli_main, [str(a) for a in args])


def rows_of(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def rewrite_manifest(out: Path, rows: list[dict]) -> None:
    write_part(out / ".edited.csv", rows)
    merge_parts([(out / ".edited.csv", len(rows))], out / "manifest.csv")
    (out / ".edited.csv").unlink()


def report_of(out: Path) -> dict:
    return json.loads((out / "qc_report.json").read_text(encoding="utf-8"))


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under a folder: (inode, bytes), to show qc neither replaced nor changed it."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() and ".synthmed" not in p.parts}


# ----------------------------------------------------------------------------- #17.1 paths outside OUT

def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "metadata.csv").write_text("the user's own file\n")
    return victim


@pytest.mark.parametrize("how", ["dotdot", "absolute", "mask", "linked_split_folder"])
def test_manifest_paths_outside_the_folder_are_refused_with_their_row(out, tmp_path, how):
    """#17.1: a manifest path leading outside OUT (.., absolute, a linked folder) is refused with its row; nothing outside is written."""
    victim = _victim(tmp_path)
    rows = rows_of(out)
    if how == "dotdot":
        shutil.copyfile(out / rows[1]["png_path"], victim / "x.png")
        rows[1]["png_path"] = "../victim/x.png"
    elif how == "absolute":
        shutil.copyfile(out / rows[1]["dicom_path"], victim / "x.dcm")
        rows[1]["dicom_path"] = str(victim / "x.dcm")
    elif how == "mask":
        rows[1]["mask_paths"] = "masks/train/../../../victim/m.png"
    if how == "linked_split_folder":
        shutil.copytree(out / "images" / "train", victim, dirs_exist_ok=True)
        (victim / "metadata.csv").write_text("the user's own file\n")
        shutil.rmtree(out / "images" / "train")
        (out / "images" / "train").symlink_to(victim, target_is_directory=True)
    else:
        rewrite_manifest(out, rows)
    before = snapshot(victim)
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "outside" in result.output
    assert ("row 2 " if how != "linked_split_folder" else "row ") in result.output
    assert snapshot(victim) == before and sorted(p.name for p in victim.iterdir()) == sorted(before)


# ----------------------------------------------------------------------------- #17.6 decompression bombs

def _png(width: int, height: int, idat: bytes, depth: int = 16) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _zeros_deflated(n_bytes: int, raw: bool = False) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [packer.compress(block) for _ in range(n_bytes >> 20)]
    return b"".join(parts) + packer.flush()


def _peak_bytes(call) -> tuple[int, BaseException | None]:
    tracemalloc.start()
    error = None
    try:
        call()
    except BaseException as e:  # noqa: BLE001 - what the call raised is part of the verdict
        error = e
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, error


INFLATED = 96 << 20  # 96 MiB of zeros: about 96 kB deflated


@pytest.mark.parametrize("declared", [(100_000, 100_000), (64, 64)])
def test_png_decompression_bomb_is_refused_before_inflating(declared):
    """#17.6: a PNG whose IDAT inflates far beyond a limit (or beyond its own header) is refused with a cap, not inflated."""
    data = _png(*declared, _zeros_deflated(INFLATED))
    peak, error = _peak_bytes(lambda: decode_png(data))
    assert isinstance(error, ValueError), error
    assert peak < 16 << 20, f"decode_png allocated {peak / 2**20:.0f} MiB for a {len(data) / 1024:.0f} kB file"
    if declared[0] > 10_000:
        assert "100000" in str(error) and "limit" in str(error)


def _deflated_dicom(rows: int, columns: int, pixel_bytes: int) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "OT", rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = [packer.compress(body.getvalue() + pixel_header)]
    block = bytes(1 << 20)
    stream += [packer.compress(block) for _ in range(pixel_bytes >> 20)]
    stream.append(packer.flush())
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta)
    return head.getvalue() + b"".join(stream)


@pytest.mark.parametrize("declared", [(20_000, 20_000), (64, 64)])
def test_deflated_dicom_bomb_is_refused_before_inflating(declared):
    """#17.6: a deflated-syntax DICOM inflating to 96 MiB (over the limit, or over its Rows x Columns) is refused with a cap."""
    data = _deflated_dicom(*declared, INFLATED)
    peak, error = _peak_bytes(lambda: decode_dicom(data))
    assert isinstance(error, ValueError), error
    assert peak < 16 << 20, f"decode_dicom allocated {peak / 2**20:.0f} MiB for a {len(data) / 1024:.0f} kB file"


def test_a_bomb_in_the_set_and_in_a_reference_is_a_clear_row_failure(out, tmp_path):
    """#17.6: qc meets a PNG bomb in the set and in --reference: a per-row message naming the limit, no traceback."""
    rows = rows_of(out)
    bomb = _png(100_000, 100_000, _zeros_deflated(8 << 20))
    (out / rows[3]["png_path"]).write_bytes(bomb)
    reference = tmp_path / "reference"
    (reference / "images").mkdir(parents=True)
    for k in range(4):
        shutil.copyfile(out / rows[k + 4]["png_path"], reference / "images" / f"r{k}.png")
    (reference / "images" / "bomb.png").write_bytes(bomb)
    with open(reference / "manifest.csv", "w", newline="") as fh:
        fh.write("file_name\n" + "".join(f"images/r{k}.png\n" for k in range(4)) + "images/bomb.png\n")
    result = run("qc", out, "-q", "--no-auditor", "--reference", reference / "manifest.csv")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    failure = next(f for f in report_of(out)["images"]["failures"] if f["case_id"] == rows[3]["case_id"])
    assert "readable" in failure["flags"] and "limit" in failure["messages"]["readable"]
    note = next(n for n in report_of(out)["notes"] if "1 reference image(s) could not be read" in n)
    assert f"{reference / 'images' / 'bomb.png'}: " in note and "limit" in note  # named, with why
    assert "note: 1 reference image(s) could not be read" in result.output


def test_unreadable_reference_images_are_named_with_why_and_reports_stay_byte_identical(out, tmp_path):
    """A reference image Pillow cannot identify is named with why in the notes, on the terminal and in the report;
    the reason holds no memory address, so two runs write the same report."""
    rows = rows_of(out)
    reference = tmp_path / "reference"
    (reference / "images").mkdir(parents=True)
    for k in range(3):
        shutil.copyfile(out / rows[k]["png_path"], reference / "images" / f"r{k}.png")
    (reference / "images" / "empty.png").write_bytes(b"")
    (reference / "images" / "text.png").write_bytes(b"not an image")
    (reference / "manifest.csv").write_text("file_name\n" + "".join(f"images/r{k}.png\n" for k in range(3))
                                            + "images/empty.png\nimages/text.png\n", encoding="utf-8")
    reports = []
    for _ in range(2):
        result = run("qc", out, "-q", "--no-auditor", "--fast", "--reference", reference / "manifest.csv")
        assert result.exit_code == 0, result.output
        reports.append((out / "qc_report.json").read_bytes())
    assert reports[0] == reports[1]
    assert f"{reference / 'images' / 'text.png'}: not a PNG, DICOM or other image format Pillow reads" in result.output
    assert f"{reference / 'images' / 'empty.png'}: " in result.output and " at 0x" not in reports[0].decode()


def test_unreadable_training_images_are_named_too(out, tmp_path):
    """--training-manifest: memorisation is judged on the images that read; those that did not are named."""
    rows = rows_of(out)
    training = tmp_path / "training"
    training.mkdir()
    for k in range(3):
        shutil.copyfile(out / rows[k]["png_path"], training / f"t{k}.png")
    (training / "empty.png").write_bytes(b"")
    (training / "manifest.csv").write_text("file_name\n" + "".join(f"t{k}.png\n" for k in range(3)) + "empty.png\n",
                                           encoding="utf-8")
    result = run("qc", out, "-q", "--no-auditor", "--training-manifest", training / "manifest.csv")
    assert f"note: 1 training image(s) could not be read, left out: {training / 'empty.png'}: not a PNG" in \
        result.output, result.output


def test_a_reference_csv_with_a_header_and_no_rows_says_so(out, tmp_path):
    (tmp_path / "empty.csv").write_text("path\n", encoding="utf-8")
    result = run("qc", out, "-q", "--no-auditor", "--fast", "--reference", tmp_path / "empty.csv")
    assert result.exit_code == 2 and "has a header (path) and no rows" in result.output, result.output


@pytest.mark.parametrize("tail", [",,,\n", "images/train/case-0000000.png,case-0000000\n"])
def test_a_short_manifest_row_is_named_by_line_not_a_traceback(out, tail):
    """A spreadsheet's blank row or a row cut short: exit 2 naming manifest.csv and its line."""
    with open(out / "manifest.csv", "a", encoding="utf-8") as fh:
        fh.write(tail)
    result = run("qc", out, "-q", "--no-auditor", "--fast")
    assert result.exit_code == 2, result.output
    assert f"{out / 'manifest.csv'}, line {COUNT + 2}: the row has" in result.output
    assert "Traceback" not in result.output


def test_a_manifest_saved_with_a_byte_order_mark_is_read(out):
    """Excel's "CSV UTF-8" adds a byte-order mark: the manifest still reads (as the loaders read it)."""
    path = out / "manifest.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    result = run("qc", out, "-q", "--no-auditor", "--fast")
    assert result.exit_code == 0, result.output


def test_a_png_bomb_named_dcm_in_a_reference_is_unreadable_not_a_traceback(out, tmp_path):
    """A .dcm name sends a reference image to the DICOM reader, which tries Pillow first: its bomb check is caught."""
    reference = tmp_path / "reference"
    (reference / "images").mkdir(parents=True)
    (reference / "images" / "bomb.dcm").write_bytes(_png(20_000, 20_000, _zeros_deflated(1 << 20), depth=1))
    (reference / "manifest.csv").write_text("file_name\nimages/bomb.dcm\n", encoding="utf-8")
    result = run("qc", out, "-q", "--no-auditor", "--reference", reference / "manifest.csv")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "could be read" in result.output


@pytest.mark.parametrize("how", ["dotdot", "absolute", "linked"])
def test_a_reference_or_training_manifest_naming_files_outside_its_folder_is_refused(out, tmp_path, how):
    """Reference and training manifests are held to their folder as the output manifest is (check_paths)."""
    from synthmed.qc.inputs import image_list

    rows = rows_of(out)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(out / rows[0]["png_path"], outside / "x.png")
    reference = tmp_path / "reference"
    (reference / "images").mkdir(parents=True)
    shutil.copyfile(out / rows[1]["png_path"], reference / "images" / "r.png")
    (reference / "images" / "link.png").symlink_to(outside / "x.png")
    bad = {"dotdot": "../outside/x.png", "absolute": str(outside / "x.png"), "linked": "images/link.png"}[how]
    manifest = reference / "manifest.csv"
    manifest.write_text(f"case_id,file_name\nr,images/r.png\nx,{bad}\n", encoding="utf-8")
    with pytest.raises(QCError, match="outside") as err:
        image_list(manifest)  # what --training-manifest reads too
    assert str(manifest) in str(err.value) and f"row 2 (x) file_name {bad!r}" in str(err.value)
    manifest.write_text(f"file_name\nimages/r.png\n{bad}\n", encoding="utf-8")  # no case_id: no "(?)"
    with pytest.raises(QCError, match=f"row 2 file_name {bad!r}"):
        image_list(manifest)
    manifest.write_text(f"case_id,file_name\nr,images/r.png\nx,{bad}\n", encoding="utf-8")
    result = run("qc", out, "-q", "--no-auditor", "--reference", manifest)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and f"row 2 (x) file_name {bad!r}" in result.output


# ----------------------------------------------------------------------------- #17.11 read-only folders

def _as_reader(args: list[str]) -> subprocess.CompletedProcess:
    """``synthmed ARGS`` in a process that file permissions bind (root without CAP_DAC_OVERRIDE and its kin)."""
    def drop():
        if os.geteuid() == 0:  # root ignores permission bits; without these capabilities it is bound by them
            libc = ctypes.CDLL(None, use_errno=True)
            for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
                if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone after exec
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")

    code = "import sys; from synthmed.cli import main; main(sys.argv[1:], prog_name='synthmed')"
    try:
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, preexec_fn=drop,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=120)
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot run a process bound by file permissions here: {e}")


def _set_mode(folder: Path, writable: bool) -> None:
    for path in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)) + [folder]:
        if not path.is_symlink():
            path.chmod((0o755 if path.is_dir() else 0o644) if writable else (0o555 if path.is_dir() else 0o444))


def test_qc_on_a_read_only_build_still_reports(out, tmp_path):
    """#17.11: qc on a folder it cannot write prints its verdict (and writes --report-dir), no traceback, exit by verdict."""
    before = snapshot(out)
    _set_mode(out, writable=False)
    try:
        done = _as_reader(["qc", str(out), "-q", "--no-auditor"])
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Traceback" not in done.stderr and done.stdout.startswith("PASS")
        assert "not writable" in done.stdout + done.stderr and "--report-dir" in done.stdout + done.stderr
        done = _as_reader(["qc", str(out), "-q", "--no-auditor", "--report-dir", str(tmp_path / "reports")])
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        _set_mode(out, writable=True)
    report = json.loads((tmp_path / "reports" / "qc_report.json").read_text())
    assert report["verdict"] == "pass" and (tmp_path / "reports" / "report.html").is_file()
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- #17.12 missing images, empty manifest

def test_deleted_image_folders_are_per_row_failures(out):
    """#17.12: images/, dicom/ and masks/ deleted: every row fails 'readable' (file missing), exit 1, no traceback."""
    for top in ("images", "dicom", "masks"):
        shutil.rmtree(out / top)
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    report = report_of(out)
    assert report["images"]["failed"] == COUNT
    assert all("is missing" in f["messages"]["readable"] for f in report["images"]["failures"])
    assert not (out / "images").exists()  # no folder re-created just to hold a metadata.csv


def test_a_header_only_manifest_is_a_clear_error(out):
    """#17.12: a manifest with a header and no rows: 'manifest.csv has no rows', exit 2, no traceback."""
    with open(out / "manifest.csv", encoding="utf-8") as fh:
        header = fh.readline()
    (out / "manifest.csv").write_text(header, encoding="utf-8")
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 2, result.output
    assert "manifest.csv has no rows" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- #17.15 labels

LABEL_COLUMNS = ("findings", "finding_codes", "location", "severity", "No Finding", "Pneumonia")


def test_labels_shifted_by_one_row_fail_the_run(out):
    """#17.15: every manifest label shifted by one row fails the gating manifest_consistency check (exit 1)."""
    rows = rows_of(out)
    labels = [{k: r[k] for k in LABEL_COLUMNS} for r in rows]
    for k, row in enumerate(rows):
        row.update(labels[k - 1])
    rewrite_manifest(out, rows)
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 1, result.output
    report = report_of(out)
    assert "manifest_consistency" in report["failed_checks"]
    assert report["checks"]["manifest_consistency"]["gating"]
    assert "findings" in json.dumps(report["sections"]["manifest_consistency"])


def test_a_listed_finding_with_an_empty_mask_fails_the_run(out):
    """A finding the manifest lists whose mask marks nothing (the phantom once drew mild left lower atelectasis
    behind the heart: labelled, not drawn) fails the gating empty_mask check for that row, even with every sha256
    matching."""
    import hashlib

    from synthmed.writers.png import png_bytes

    rows = rows_of(out)
    row = next(r for r in rows if r["mask_paths"])
    rel = row["mask_paths"].split("|")[0]
    shape = decode_png((out / rel).read_bytes())[0].shape
    data = png_bytes(np.zeros(shape, np.uint8), {"synthetic": "yes"})
    (out / rel).write_bytes(data)
    hashes = row["mask_sha256"].split("|")
    hashes[0] = hashlib.sha256(data).hexdigest()
    row["mask_sha256"] = "|".join(hashes)
    rewrite_manifest(out, rows)
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 1, result.output
    report = report_of(out)
    assert "empty_mask" in report["failed_checks"] and report["checks"]["empty_mask"]["gating"]
    (failure,) = report["images"]["failures"]
    assert failure["case_id"] == row["case_id"] and set(failure["messages"]) == {"empty_mask"}
    assert rel in failure["messages"]["empty_mask"]


FILE_COLUMNS = ("file_name", "png_path", "png_sha256", "dicom_path", "dicom_sha256", "sr_path", "sr_sha256",
                "seg_path", "seg_sha256", "mask_paths", "mask_sha256")


def test_rows_naming_each_others_files_fail_the_run(out):
    """Two rows' file columns swapped (every file intact, every sha256 its file's): a loader would give one case's
    labels to the other's image, so the gating manifest_consistency check fails both rows, naming the paths."""
    rows = rows_of(out)
    a = next(r for r in rows if r["mask_paths"])
    b = next(r for r in rows if not r["mask_paths"])
    for column in FILE_COLUMNS:
        a[column], b[column] = b[column], a[column]
    rewrite_manifest(out, rows)
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 1, result.output
    section = report_of(out)["sections"]["manifest_consistency"]
    assert section["status"] == "fail" and section["rows_failed"] == 2
    text = json.dumps(section["problems"])
    assert f"png_path '{a['png_path']}' is not {a['case_id']}'s" in text  # a's row now names b's files
    assert f"mask_paths '{b['mask_paths']}' are not the masks of {b['case_id']}'s findings" in text


def test_rows_swapped_in_a_splits_metadata_csv_fail_the_run(out):
    """Hugging Face imagefolder reads the labels from images/<split>/metadata.csv: two of its rows naming each
    other's images fail manifest_consistency, naming the file and lines, though manifest.csv is intact."""
    path = out / "images" / "train" / "metadata.csv"
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    a = next(r for r in rows if r["mask_paths"])
    b = next(r for r in rows if not r["mask_paths"])
    for column in FILE_COLUMNS:
        a[column], b[column] = b[column], a[column]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 1, result.output
    section = report_of(out)["sections"]["manifest_consistency"]
    assert section["metadata_rows_failed"] == 2 and section["rows_failed"] == 0
    assert f"images/train/metadata.csv, line {rows.index(a) + 2} ({a['case_id']}): file_name" in \
        json.dumps(section["problems"])
    assert "changed since synthmed wrote it" in result.output  # and qc left the file as it is


def test_a_splits_metadata_csv_whose_split_left_the_manifest_fails_the_run(out):
    """Every test row deleted from manifest.csv: images/test/metadata.csv still gives a loader a test split of rows
    the manifest no longer has; manifest_consistency names its rows (it once checked only the manifest's splits)."""
    rows = rows_of(out)
    gone = [r["case_id"] for r in rows if r["split"] == "test"]
    assert gone
    rewrite_manifest(out, [r for r in rows if r["split"] != "test"])
    result = run("qc", out, "-q", "--no-auditor", "--fast")
    assert result.exit_code == 1, result.output
    section = report_of(out)["sections"]["manifest_consistency"]
    assert section["metadata_rows_failed"] == len(gone)
    assert f"images/test/metadata.csv, line 2 ({gone[0]}): case_id '{gone[0]}' is no row of manifest.csv in " \
        "images/test/" in json.dumps(section["problems"])
    for how in ("link", "junk"):  # nothing of it can be read: the file itself still fails the run
        path = out / "images" / "test" / "metadata.csv"
        path.unlink()
        if how == "link":
            path.symlink_to(out / "manifest.csv")
        else:
            path.write_bytes(b"\xff\xfe\x00binary")
        result = run("qc", out, "-q", "--no-auditor", "--fast")
        assert result.exit_code == 1, (how, result.output)
        assert report_of(out)["sections"]["manifest_consistency"]["metadata_rows_failed"] >= 1


@pytest.mark.parametrize("how", ["link", "huge_field"])
def test_a_splits_metadata_csv_that_is_a_link_or_unparsable_fails_without_reading_out(out, tmp_path, how):
    """A metadata.csv that is a link out of the set is not read (its first line once reached the report); one with a
    field over the csv module's limit is a named failure, not a traceback."""
    path = out / "images" / "train" / "metadata.csv"
    path.unlink()
    if how == "link":
        secret = tmp_path / "secret.csv"
        secret.write_text("secret_token_abc123,hunter2\n", encoding="utf-8")
        path.symlink_to(secret)
    else:
        path.write_text(",".join(rows_of(out)[0]) + '\n"' + "x" * 140_000 + "\n", encoding="utf-8")
    result = run("qc", out, "-q", "--no-auditor", "--fast")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "secret_token" not in result.output
    text = json.dumps(report_of(out)["sections"]["manifest_consistency"]["problems"])
    assert "secret_token" not in text
    assert ("images/train/metadata.csv is a link" if how == "link" else "cannot be read as a metadata file") in text


def test_a_row_of_a_procedural_backend_without_its_masks_fails_the_run(out):
    """The masks and SEG of a row with findings blanked in the manifest (the files still there): a segmentation
    loader would read every finding as absent, so manifest_consistency fails the row, naming the masks it lacks."""
    rows = rows_of(out)
    row = next(r for r in rows if r["mask_paths"])
    masks = row["mask_paths"]
    for column in ("mask_paths", "mask_sha256", "seg_path", "seg_sha256"):
        row[column] = ""
    rewrite_manifest(out, rows)
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 1, result.output
    section = report_of(out)["sections"]["manifest_consistency"]
    assert section["rows_failed"] == 1 and masks in json.dumps(section["problems"])


def test_a_row_whose_backend_was_edited_cannot_escape_the_mask_rule(out):
    """The masks of a pattern row blanked and its backend column set to diffusion (whose rows need no masks): the set's
    backend is its card's, so the row fails for both, not passes under the rule the edit chose."""
    rows = rows_of(out)
    row = next(r for r in rows if r["mask_paths"])
    for column in ("mask_paths", "mask_sha256", "seg_path", "seg_sha256"):
        row[column] = ""
    row["backend"] = "diffusion"
    rewrite_manifest(out, rows)
    result = run("qc", out, "-q", "--no-auditor", "--fast")
    assert result.exit_code == 1, result.output
    section = report_of(out)["sections"]["manifest_consistency"]
    text = json.dumps(section["problems"])
    assert section["rows_failed"] == 1 and "backend 'diffusion' is not the set's 'pattern'" in text
    assert f"are not the masks of {row['case_id']}'s findings" in text


def test_a_users_backend_that_draws_a_mask_of_an_unlisted_finding_passes(tmp_path):
    """A Backend object may return masks of findings a case does not list (a device it always draws): generate
    writes them after the listed ones, and qc holds the row to its own case's mask names, not to its findings."""
    from synthmed.backends.base import BackendInfo, GeneratedImage
    from synthmed.backends.pattern import PatternBackend

    class Mine:
        def __init__(self):
            self.inner = PatternBackend(64, 64)
            self.info = BackendInfo(name="mine", model_id="mine-v1", model_hash="mine-v1")

        def generate(self, cases, prompts):
            drawn = np.zeros((64, 64), bool)
            drawn[5:15, 5:15] = True
            return [GeneratedImage(im.pixels, {**im.masks, "support_devices": drawn})
                    for im in self.inner.generate(cases, prompts)]

    result = generate(spec_text(), tmp_path / "out", backend=Mine(), progress=False)
    assert result.qc is not None and result.qc.passed, result.qc.report["failed_checks"]
    assert all(r["mask_paths"].endswith("_mask_support_devices.png") for r in rows_of(tmp_path / "out"))


def test_impossible_values_fail_the_run(out):
    """#17.15: width 'abc', age -5 and split 'nonsense' in the manifest fail manifest_consistency, naming each row."""
    rows = rows_of(out)
    rows[0]["width"], rows[1]["age"], rows[2]["split"] = "abc", "-5", "nonsense"
    rewrite_manifest(out, rows)
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 1, result.output
    section = report_of(out)["sections"]["manifest_consistency"]
    text = json.dumps(section)
    assert section["status"] == "fail" and all(v in text for v in ("'abc'", "'-5'", "'nonsense'"))
    assert all(f"row {n}" in text for n in (1, 2, 3))


class _NoFindingAuditor:
    """An auditor that reads every image as a normal film."""

    name = "reads-no-finding"

    def predict(self, images):
        from synthmed.qc.auditor import AuditorPrediction
        from synthmed.vocabulary import get_vocabulary

        vocab = get_vocabulary()
        findings, locations = tuple(vocab.findings), tuple(vocab.locations) + ("none",)
        n = len(images)
        finding_probs = np.zeros((n, len(findings)), np.float32)
        finding_probs[:, findings.index("no_finding")] = 1
        location_probs = np.zeros((n, len(locations)), np.float32)
        location_probs[:, -1] = 1
        return AuditorPrediction(finding_probs, location_probs, np.eye(4, dtype=np.float32)[[0] * n],
                                 findings, locations)


def test_label_fidelity_gates_where_the_shipped_auditor_applies(tmp_path, monkeypatch):
    """#17.15: low label fidelity fails a phantom set (the auditor's domain), and is only reported for the pattern backend."""
    auditor = pytest.importorskip("synthmed.qc.auditor")
    monkeypatch.setattr(auditor.Auditor, "load", classmethod(lambda cls, path=None: _NoFindingAuditor()))
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    spec = spec_text(count=32, size=128).replace("weight: 0.5", "weight: 0.25", 1).replace("weight: 0.5", "weight: 0.75")
    verdicts = {}
    for backend in ("phantom", "pattern"):
        out = tmp_path / backend
        generate(spec, out, backend=backend, progress=False, qc=False)
        result = qc(out, dciodvfy_sample=0)
        verdicts[backend] = (result.report["checks"]["label_fidelity"], result.failed_checks)
        assert result.report["sections"]["auditor"]["label_fidelity_score"] == pytest.approx(0.25)
    (phantom, phantom_failed), (pattern, pattern_failed) = verdicts["phantom"], verdicts["pattern"]
    assert phantom["status"] == "fail" and phantom["gating"] and phantom["threshold"] == 0.5
    assert "label_fidelity" in phantom_failed
    assert pattern["status"] == "info" and not pattern["gating"] and "phantom" in pattern["reason"]
    assert "label_fidelity" not in pattern_failed


# ----------------------------------------------------------------------------- #17.18, #17.19 runs in the folder

def test_qc_during_a_running_generate_says_so(out):
    """#17.18: qc on a folder whose generate is still running (no manifest yet, lock held) says so, not 'not a synthmed output folder'."""
    (out / "manifest.csv").unlink()
    with open(out / ".synthmed" / "lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run("qc", out, "-q")
    assert result.exit_code == 1, result.output
    assert "another synthmed run is writing" in result.output and "not a synthmed output folder" not in result.output
    result = run("qc", out, "-q")  # no run holds it: an unfinished build
    assert result.exit_code == 2 and "--resume" in result.output, result.output


KILLED_QC = """\
import os, signal, sys
from synthmed import atomic
real = atomic.commit_temp
def commit(tmp, path, fh):
    if path.name == "metadata.csv":
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(tmp, path, fh)
atomic.commit_temp = commit
from synthmed.qc import qc
qc(sys.argv[1], auditor=False, full=False)
"""


def test_a_killed_qc_leaves_temp_files_the_next_run_removes(out):
    """#17.19: qc killed while writing metadata.csv leaves .metadata.csv.PID.tmp; the next qc removes it (and nothing else)."""
    (out / "images" / "train" / ".notes.tmp").write_text("the user's own file")
    done = subprocess.run([sys.executable, "-c", KILLED_QC, str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert list(out.rglob(".metadata.csv.*.tmp"))
    result = qc(out, auditor=False, full=False)
    assert result.passed
    assert not list(out.rglob(".metadata.csv.*.tmp"))
    assert (out / "images" / "train" / ".notes.tmp").read_text() == "the user's own file"


# ----------------------------------------------------------------------------- #17.20 verdicts a user can trust

def test_a_limit_build_passes_spec_fidelity(tmp_path, monkeypatch):
    """#17.20: the first 12 cases of a 400-case plan pass spec_fidelity (compared with the plan of the cases built)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    result = generate(spec_text(count=400), tmp_path / "out", backend="pattern", limit=COUNT, progress=False)
    section = result.qc.report["sections"]["spec_fidelity"]
    assert section["status"] == "pass" and section["score"] == pytest.approx(1.0), section.get("worst")
    assert section["n"] == COUNT and section["planned"] == COUNT


def _film(black: float, white: float = 0.0, side: int = 128) -> np.ndarray:
    """A film with ``black`` of its pixels at 0 (air beside the body) and ``white`` at full scale."""
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0.2, 0.8, (side, side)).astype(np.float32)
    flat = pixels.reshape(-1)
    n_black, n_white = int(black * flat.size), int(white * flat.size)
    flat[:n_black] = 0.0
    flat[n_black:n_black + n_white] = 1.0
    return pixels


def test_air_beside_the_body_is_not_saturation():
    """#17.20: 35 % black pixels (air, as on real films) is not 'saturated'; 70 % black or 25 % white still is."""
    assert "saturated" not in check_generated(_film(0.35), width=128, height=128, bit_depth=16)
    assert "saturated" in check_generated(_film(0.70), width=128, height=128, bit_depth=16)
    assert "saturated" in check_generated(_film(0.1, white=0.25), width=128, height=128, bit_depth=16)


def test_cli_and_report_give_a_check_the_same_word(tmp_path, monkeypatch):
    """#17.20: a failing check that does not gate reads 'fail' on the command line, as in qc_report.json and report.html."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    out = tmp_path / "out"
    generate(spec_text("qc: {thresholds: {max_ms_ssim: 0.0}}\n"), out, backend="pattern", progress=False)
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 0, result.output
    check = report_of(out)["checks"]["diversity"]
    assert check["status"] == "fail" and not check["gating"]
    line = next(x for x in result.output.splitlines() if "diversity" in x)
    assert line.split()[0] == "fail" and "warn" not in line
    assert 'diversity</code>' in (out / "report.html").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- the rule: only files it recorded

def test_qc_on_a_copied_dataset_rewrites_nothing_it_did_not_record(out):
    """#17: a copied dataset (no .synthmed/ record): qc rewrites neither manifest.csv, metadata.csv nor a user's report."""
    shutil.rmtree(out / ".synthmed")
    (out / "qc_report.json").write_text("the user's notes\n")
    before = snapshot(out)
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 0, result.output
    assert snapshot(out) == before
    assert "qc_report.json" in result.output and "--report-dir" in result.output
    (out / "qc_report.json").unlink()
    (out / "report.html").unlink()
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 0, result.output
    assert report_of(out)["verdict"] == "pass" and (out / "report.html").is_file()
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k not in ("qc_report.json", "report.html")} == \
        {k: v for k, v in before.items() if k not in ("qc_report.json", "report.html")}


# ----------------------------------------------------------------------------- re-trial of #17 (qc)

def _shift_labels(out: Path) -> None:
    rows = rows_of(out)
    labels = [{k: r[k] for k in LABEL_COLUMNS} for r in rows]
    for k, row in enumerate(rows):
        row.update(labels[k - 1])
    rewrite_manifest(out, rows)


def test_shifted_labels_without_cases_jsonl_fail(out, tmp_path, monkeypatch):
    """#17.6: labels shifted by one row and cases.jsonl removed: qc --fast fails manifest_consistency and says why."""
    _shift_labels(out)
    (out / "cases.jsonl").unlink()
    result = run("qc", out, "-q", "--fast", "--no-auditor")
    assert result.exit_code == 1, result.output
    section = report_of(out)["sections"]["manifest_consistency"]
    assert section["status"] == "fail" and "cases.jsonl is missing" in json.dumps(section)
    assert "manifest_consistency" in result.output and "cases.jsonl is missing" in result.output
    # a spec whose card keeps its order (keys already sorted) rebuilds the plan: the intact rows pass against it
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    faithful = tmp_path / "faithful"
    generate(spec_text().replace("{train: 0.75, test: 0.25}", "{test: 0.25, train: 0.75}"), faithful,
             backend="pattern", progress=False, qc=False)
    (faithful / "cases.jsonl").unlink()
    assert run("qc", faithful, "-q", "--fast", "--no-auditor").exit_code == 0
    section = report_of(faithful)["sections"]["manifest_consistency"]
    assert section["status"] == "pass" and "drawn again" in section["against"]
    _shift_labels(faithful)
    assert run("qc", faithful, "-q", "--fast", "--no-auditor").exit_code == 1
    assert "findings" in json.dumps(report_of(faithful)["sections"]["manifest_consistency"])


@pytest.mark.parametrize("call", ["out_none", "out_int", "report_dir_int", "reference_int", "full_str", "progress_str"])
def test_python_qc_refuses_bad_arguments_naming_them(out, call):
    """#17.9: qc(None), qc(5), report_dir=5, reference=5, full='x', progress='x': TypeError naming the argument."""
    args, kwargs, name = {"out_none": ((None,), {}, "out"), "out_int": ((5,), {}, "out"),
                          "report_dir_int": ((out,), {"report_dir": 5}, "report_dir"),
                          "reference_int": ((out,), {"reference": 5}, "reference"),
                          "full_str": ((out,), {"full": "x"}, "full"),
                          "progress_str": ((out,), {"progress": "x"}, "progress")}[call]
    before = snapshot(out)
    with pytest.raises(TypeError, match=rf"^{name} must"):
        qc(*args, auditor=False, **kwargs)
    assert snapshot(out) == before


def test_report_dir_inside_the_output_folder_is_refused(out):
    """#17.10: --report-dir OUT/images/train is refused (exit 2): OUT is left untouched, no nested .synthmed."""
    before = snapshot(out)
    state = sorted(p.relative_to(out).as_posix() for p in (out / ".synthmed").rglob("*"))
    result = run("qc", out, "-q", "--no-auditor", "--report-dir", out / "images" / "train")
    assert result.exit_code == 2, result.output
    assert "--report-dir" in result.output and "inside" in result.output and "Traceback" not in result.output
    assert snapshot(out) == before
    assert sorted(p.relative_to(out).as_posix() for p in (out / ".synthmed").rglob("*")) == state
    assert not (out / "images" / "train" / ".synthmed").exists()
    assert run("qc", out, "-q", "--no-auditor", "--report-dir", out).exit_code == 0  # OUT itself: the usual place


def test_headline_names_the_failed_set_level_checks(out):
    """#17.12: a FAIL from set-level checks alone names them in the headline, not '0 failed a gating check'."""
    _shift_labels(out)
    result = run("qc", out, "-q", "--no-auditor")
    assert result.exit_code == 1, result.output
    headline = result.output.splitlines()[0]
    assert headline.startswith("FAIL") and "manifest_consistency" in headline, headline
    assert "0 failed a gating check" not in headline


def test_a_splits_metadata_csv_is_a_usable_reference(out, tmp_path):
    """images/<split>/metadata.csv names its images relative to its own folder (file_name, Hugging Face's
    convention); png_path starts at the dataset above: qc --reference reads the file_name column first."""
    from synthmed.qc.inputs import image_list

    listed = image_list(out / "images" / "train" / "metadata.csv")
    assert listed and all(path.is_file() and path.parent == out / "images" / "train" for _, path in listed)
    assert [path for _, path in image_list(out / "manifest.csv")][:1] == [out / rows_of(out)[0]["png_path"]]


def test_checks_that_apply_to_some_rows_count_only_those(tmp_path):
    """A DICOM-only set has no PNG to compare with its DICOM: dicom_match says it checked none and why, not
    "0 of 12 failed" as if it had compared them; empty_mask counts the rows with masks."""
    out = tmp_path / "out"
    generate(spec_text("image: {size: 64, formats: [dicom]}\n").replace("image: {size: 64}\n", ""), out,
             backend="pattern", progress=False, qc=False)
    result = run("qc", out, "-q", "--no-auditor", "--fast")
    assert result.exit_code == 0, result.output
    checks = report_of(out)["checks"]
    assert checks["dicom_match"]["checked"] == 0 and "no row has both a PNG and a DICOM" in checks["dicom_match"]["note"]
    assert checks["empty_mask"]["checked"] == sum(bool(r["mask_paths"]) for r in rows_of(out)) > 0
    assert checks["readable"]["checked"] == COUNT
