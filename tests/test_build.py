"""generate(): determinism, resume after SIGKILL / Ctrl-C / a full disk, sha256 verification, refusals,
the manifest and its companions, Hugging Face imagefolder, DICOM validity, --limit and the CLI.

Every build uses the deterministic pattern backend on 64x64 images. Most tests compare against
one reference build (150 cases: three chunks of 64/64/22) made once per module.

In-process builds run with ``os.fsync`` made a no-op (durability is not what these tests check,
and an fsync per file makes a build several times slower); the subprocess runs that are killed
keep the real fsync.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import gc
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from PIL import Image

import synthmed
from synthmed.build import CHUNK_SIZE, RUN_FORMAT, BuildError, BuildResult, generate
from synthmed.cli import main as cli_main
from synthmed.spec import load_spec
from synthmed.backends.pattern import PatternBackend
from synthmed.testing import output_digests

REPO = Path(__file__).resolve().parents[1]
COUNT = 150
CHEXPERT = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices")
# the CheXpert column each finding of the test spec maps to (written out here, not taken from the vocabulary)
FINDING_COLUMN = {"no_finding": "No Finding", "pneumonia": "Pneumonia", "pleural_effusion": "Pleural Effusion",
                  "cardiomegaly": "Cardiomegaly"}
INTENDED_USE = "synthetic data for research and development; not for diagnostic use"

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
needs_dcmdump = pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmdump (dcmtk) not installed")


def spec_text(count: int = COUNT, seed: int = 7, image: str = "{size: 64}", name: str = "build-test") -> str:
    return textwrap.dedent(f"""\
        spec_version: 1
        name: {name}
        seed: {seed}
        count: {count}
        splits: {{train: 0.8, val: 0.1, test: 0.1}}
        image: {image}
        findings:
          - finding: no_finding
            weight: 0.4
          - finding: pneumonia
            weight: 0.4
            location: {{right_lower_lobe: 0.5, left_lower_lobe: 0.5}}
            severity: {{mild: 0.5, severe: 0.5}}
          - finding: [pleural_effusion, cardiomegaly]
            weight: 0.2
            severity: {{mild: 0.6, moderate: 0.4}}
        """)


def write_spec(folder: Path, **kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = spec_text(**kw)
    path = folder / f"spec-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


tree = output_digests  # relative path -> sha256 of every file under out, .synthmed/ left out


def assert_same_tree(out: Path, reference: Path) -> None:
    got, want = tree(out), tree(reference)
    assert (out / "manifest.csv").read_bytes() == (reference / "manifest.csv").read_bytes()
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    differ = sorted(k for k in want if got[k] != want[k])
    assert not differ, f"{len(differ)} files differ from the reference, e.g. {differ[:5]}"


def temp_files(out: Path) -> list[str]:
    return [str(Path(root) / f) for root, _, files in os.walk(out) for f in files if f.endswith(".tmp")]


def assert_no_partial_files(out: Path) -> None:
    """Every file under a final name is whole: PNGs decode, DICOM files parse with their pixels, CSVs parse."""
    for root, _, files in os.walk(out):
        for name in files:
            path = Path(root) / name
            if name.endswith(".tmp"):
                continue
            if name.endswith(".png"):
                with Image.open(path) as im:
                    im.load()
            elif name.endswith("_sr.dcm"):
                assert pydicom.dcmread(path).ContentSequence, path
            elif name.endswith("_seg.dcm"):
                assert pydicom.dcmread(path).pixel_array.shape[-2:] == (64, 64), path
            elif name.endswith(".dcm"):
                ds = pydicom.dcmread(path)
                assert ds.pixel_array.shape == (64, 64), path
            elif name.endswith(".json"):
                json.loads(path.read_text(encoding="utf-8"))
            elif name.endswith(".csv"):
                rows = list(csv.reader(path.open(newline="", encoding="utf-8")))
                assert rows and all(len(r) == len(rows[0]) for r in rows), path


def manifest_rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def schema_columns() -> list[str]:
    data = json.loads((REPO / "schemas" / "manifest_columns.json").read_text(encoding="utf-8"))
    return [c["name"] for c in data["columns"]]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def fast_fsync():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        yield


@pytest.fixture(autouse=True)
def _fast(fast_fsync):
    yield


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory, fast_fsync) -> Path:
    return write_spec(tmp_path_factory.mktemp("spec"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, spec_path, fast_fsync) -> Path:
    """One uninterrupted build of the 150-case spec (batch size 8)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    result = generate(spec_path, out, backend="pattern", batch_size=8, progress=False)
    assert (result.total, result.written, result.reused, result.interrupted) == (COUNT, COUNT, 0, False)
    return out


def copy_of(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    return out


# ----------------------------------------------------------------------------- determinism

@pytest.mark.slow
def test_two_runs_give_identical_files(reference, spec_path, tmp_path):
    out = tmp_path / "again"
    result = generate(spec_path, out, backend="pattern", batch_size=8, progress=False)
    assert isinstance(result, BuildResult) and result.written == COUNT
    assert len(tree(out)) > 2 * COUNT  # PNG + DICOM per case, masks, manifest, metadata, card ...
    assert_same_tree(out, reference)


@pytest.mark.slow
def test_batch_size_never_changes_a_file(reference, spec_path, tmp_path):
    out = tmp_path / "batch1"
    generate(spec_path, out, backend=PatternBackend(64, 64), batch_size=1, progress=False)
    assert_same_tree(out, reference)


# ----------------------------------------------------------------------------- interruption

CHILD = """
import sys
from synthmed.build import generate
from synthmed.backends.pattern import PatternBackend
r = generate(sys.argv[1], sys.argv[2], backend=PatternBackend(64, 64, delay=0.05), progress=False)
print("INTERRUPTED" if r.interrupted else "DONE", r.written, flush=True)
"""


def start_child_and_wait_for_a_part(spec_path: Path, out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(spec_path), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = out / ".synthmed" / "parts"
    deadline = time.monotonic() + 60
    while not (parts.is_dir() and any(parts.glob("part-*.csv"))):
        if proc.poll() is not None:
            pytest.fail(f"the build exited (rc {proc.returncode}) before a part was written: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail("no manifest part appeared within 60 s")
        time.sleep(0.02)
    return proc


@pytest.mark.slow
def test_sigkill_then_resume_is_identical_to_an_uninterrupted_run(reference, spec_path, tmp_path):
    out = tmp_path / "killed"
    proc = start_child_and_wait_for_a_part(spec_path, out)
    time.sleep(0.3)  # let it get into the next chunk
    assert proc.poll() is None, "the build finished before it could be killed; the test cannot check anything"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.csv").exists()
    assert_no_partial_files(out)

    result = generate(spec_path, out, resume=True, backend="pattern", progress=False)
    assert not result.interrupted
    assert result.reused >= CHUNK_SIZE, "the chunk finished before the kill was not reused"
    assert result.written > 0, "nothing was left to do: the kill did not land mid-way"
    assert result.written + result.reused == COUNT
    assert temp_files(out) == []
    assert_same_tree(out, reference)


@pytest.mark.slow
def test_ctrl_c_stops_and_resume_is_identical(reference, spec_path, tmp_path):
    out = tmp_path / "ctrl-c"
    proc = start_child_and_wait_for_a_part(spec_path, out)
    assert proc.poll() is None, "the build finished before Ctrl-C could be sent"
    os.kill(proc.pid, signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the build did not stop within 30 s of Ctrl-C")
    assert proc.returncode != 0 or stdout.startswith("INTERRUPTED"), (proc.returncode, stdout, stderr)
    assert "DONE" not in stdout
    assert not (out / "manifest.csv").exists()
    assert_no_partial_files(out)
    assert temp_files(out) == []  # a graceful stop finishes its writes

    result = generate(spec_path, out, resume=True, backend="pattern", progress=False)
    assert not result.interrupted and result.written + result.reused == COUNT and result.reused >= CHUNK_SIZE
    assert result.written > 0, "nothing was left to do: Ctrl-C did not stop the build"
    assert_same_tree(out, reference)


# ----------------------------------------------------------------------------- resume verifies by sha256

def chunk_len(index: int) -> int:
    start = index // CHUNK_SIZE * CHUNK_SIZE
    return min(start + CHUNK_SIZE, COUNT) - start


def test_resume_keeps_a_changed_png_names_it_and_remakes_it_once_removed(reference, spec_path, tmp_path):
    """A file whose bytes are no longer those synthmed recorded is not synthmed's to overwrite (docs/safety.md)."""
    out = copy_of(reference, tmp_path)
    row = manifest_rows(out)[70]
    png = out / row["png_path"]
    original = png.read_bytes()
    with open(png, "r+b") as fh:  # same size, different bytes
        fh.seek(len(original) // 2)
        fh.write(b"\x00\xffcorrupt\xff\x00")
    changed = png.read_bytes()
    assert changed != original

    with pytest.raises(BuildError) as info:
        generate(spec_path, out, resume=True, backend="pattern", progress=False)
    assert info.value.exit_code == 2 and row["png_path"] in str(info.value) and "changed" in str(info.value)
    assert png.read_bytes() == changed
    png.unlink()
    result = generate(spec_path, out, resume=True, backend="pattern", progress=False)
    assert png.read_bytes() == original
    assert (result.written, result.reused, result.total) == (chunk_len(70), COUNT - chunk_len(70), COUNT)
    assert_same_tree(out, reference)


def test_resume_restores_a_deleted_dicom(reference, spec_path, tmp_path):
    out = copy_of(reference, tmp_path)
    row = manifest_rows(out)[3]
    dcm = out / row["dicom_path"]
    original = dcm.read_bytes()
    dcm.unlink()

    result = generate(spec_path, out, resume=True, backend="pattern", progress=False)
    assert dcm.read_bytes() == original
    assert (result.written, result.reused) == (chunk_len(3), COUNT - chunk_len(3))
    assert_same_tree(out, reference)


def test_resume_of_a_complete_folder_reuses_everything(reference, spec_path, tmp_path):
    out = copy_of(reference, tmp_path)
    result = generate(spec_path, out, resume=True, backend="pattern", progress=False)
    assert (result.written, result.reused, result.total, result.interrupted) == (0, COUNT, COUNT, False)
    assert_same_tree(out, reference)


# ----------------------------------------------------------------------------- refusals

def test_changed_spec_is_refused_on_resume_unless_overwrite(tmp_path):
    old = write_spec(tmp_path / "specs", count=20, seed=7)
    new = write_spec(tmp_path / "specs", count=12, seed=8)
    out = tmp_path / "out"
    generate(old, out, backend="pattern", progress=False)
    before = tree(out)

    with pytest.raises(BuildError) as info:
        generate(new, out, resume=True, backend="pattern", progress=False)
    message = str(info.value)
    assert info.value.exit_code == 2
    assert "spec" in message and "changed" in message, message
    assert "--overwrite" in message
    assert tree(out) == before
    del info  # (a refusal that is kept alive, as a notebook keeps it, is the next test's subject)
    gc.collect()

    generate(new, out, overwrite=True, backend="pattern", progress=False)
    fresh = tmp_path / "fresh"
    generate(new, fresh, backend="pattern", progress=False)
    assert_same_tree(out, fresh)  # nothing of the old run (cases 12..19) is left
    assert len(manifest_rows(out)) == 12


def test_a_refused_run_releases_the_folder(tmp_path):
    """A notebook keeps the last exception (sys.last_traceback); the folder must not stay locked by it."""
    spec = write_spec(tmp_path / "specs", count=10)
    out = tmp_path / "out"
    generate(spec, out, backend="pattern", progress=False)
    with pytest.raises(BuildError) as refused:  # a previous run, neither --resume nor --overwrite
        generate(spec, out, backend="pattern", progress=False)
    assert refused.value.exit_code == 2
    result = generate(spec, out, resume=True, backend="pattern", progress=False)
    assert (result.written, result.reused) == (0, 10)
    assert refused.traceback  # still alive here


@pytest.mark.parametrize("mode", [{}, {"resume": True}, {"overwrite": True}])
def test_folder_with_a_foreign_file_is_refused_and_untouched(tmp_path, mode):
    spec = write_spec(tmp_path / "specs", count=10)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("my own notes\n", encoding="utf-8")
    with pytest.raises(BuildError) as info:
        generate(spec, out, backend="pattern", progress=False, **mode)
    assert info.value.exit_code == 2
    assert "notes.txt" in str(info.value)
    assert os.listdir(out) == ["notes.txt"]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "my own notes\n"


def test_a_backend_that_cannot_load_leaves_nothing_behind(tmp_path):
    """A wrong --model (or backend) is reported before any work; the corrected rerun must not be refused."""
    spec = write_spec(tmp_path / "specs", count=10)
    out = tmp_path / "out"
    with pytest.raises(BuildError) as info:
        generate(spec, out, backend="diffusion", model=str(tmp_path / "no-such-model"), progress=False)
    assert info.value.exit_code == 2 and "no-such-model" in str(info.value)
    assert not out.exists()
    result = generate(spec, out, backend="pattern", progress=False)  # no --resume, no --overwrite needed
    assert result.written == 10


def test_an_output_path_below_a_file_is_a_usage_error(tmp_path):
    spec = write_spec(tmp_path / "specs", count=10)
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    with pytest.raises(BuildError) as info:
        generate(spec, tmp_path / "afile" / "out", backend="pattern", progress=False)
    assert info.value.exit_code == 2 and "cannot create the output folder" in str(info.value)


@pytest.mark.parametrize("link", ["images/train", "dicom", ".synthmed"])
def test_resume_does_not_write_through_a_symbolic_link(tmp_path, link):
    spec = write_spec(tmp_path / "specs", count=10)
    out = tmp_path / "out"
    generate(spec, out, backend="pattern", progress=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(out / link)
    (out / link).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(BuildError) as info:
        generate(spec, out, resume=True, backend="pattern", progress=False)
    assert info.value.exit_code == 2 and "symbolic link" in str(info.value)
    assert list(elsewhere.iterdir()) == []


def test_the_phantom_refuses_a_size_it_cannot_draw_before_any_work(tmp_path):
    """--backend phantom on a spec whose size only the other backends take (validation cannot know)."""
    spec = write_spec(tmp_path / "specs", count=10)  # 64 x 64
    out = tmp_path / "out"
    with pytest.raises(BuildError) as info:
        generate(spec, out, backend="phantom", progress=False)
    assert info.value.exit_code == 2 and "128..1024" in str(info.value)
    assert not out.exists()


def test_overwrite_keeps_a_foreign_file_beside_a_previous_run(tmp_path):
    spec = write_spec(tmp_path / "specs", count=10)
    out = tmp_path / "out"
    generate(spec, out, backend="pattern", progress=False)
    (out / "notes.txt").write_text("my own notes\n", encoding="utf-8")
    try:
        generate(spec, out, overwrite=True, backend="pattern", progress=False)
    except BuildError:
        pass  # refusing is fine too; deleting the user's file is not
    assert (out / "notes.txt").read_text(encoding="utf-8") == "my own notes\n"


def test_previous_run_without_resume_or_overwrite_is_refused(tmp_path):
    spec = write_spec(tmp_path / "specs", count=10)
    out = tmp_path / "out"
    generate(spec, out, backend="pattern", progress=False)
    before = tree(out)
    with pytest.raises(BuildError) as info:
        generate(spec, out, backend="pattern", progress=False)
    assert info.value.exit_code == 2
    assert "--resume" in str(info.value) and "--overwrite" in str(info.value)
    assert tree(out) == before


@pytest.mark.parametrize("mode", [{"resume": True}, {"overwrite": True}])
def test_second_concurrent_run_fails_fast_naming_the_folder(tmp_path, mode):
    spec = write_spec(tmp_path / "specs", count=10)
    out = tmp_path / "out"
    generate(spec, out, backend="pattern", progress=False)
    before = tree(out)
    with open(out / ".synthmed" / "lock", "a+") as lock:  # another run holds the lock
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        started = time.monotonic()
        with pytest.raises(BuildError) as info:
            generate(spec, out, backend="pattern", progress=False, **mode)
        assert time.monotonic() - started < 5
    assert str(out) in str(info.value)
    assert "another" in str(info.value) or "in use" in str(info.value) or "lock" in str(info.value)
    assert tree(out) == before


@pytest.mark.slow
def test_second_run_fails_while_a_slow_run_holds_the_folder(spec_path, tmp_path):
    out = tmp_path / "busy"
    proc = start_child_and_wait_for_a_part(spec_path, out)
    try:
        assert proc.poll() is None
        started = time.monotonic()
        with pytest.raises(BuildError) as info:
            generate(spec_path, out, resume=True, backend="pattern", progress=False)
        assert time.monotonic() - started < 5
        assert str(out) in str(info.value)
    finally:
        proc.kill()
        proc.communicate()


# ----------------------------------------------------------------------------- disk full

@pytest.mark.slow
@pytest.mark.parametrize("fail_at", [5, 250, "manifest.csv"])
def test_disk_full_fails_cleanly_and_resume_finishes(reference, spec_path, tmp_path, monkeypatch, fail_at):
    out = tmp_path / "full"
    real_replace = os.replace
    renames = {"n": 0, "full": False}

    def replace(src, dst, *args, **kwargs):
        if Path(dst).is_relative_to(out):
            renames["n"] += 1
            if fail_at == Path(dst).name or (isinstance(fail_at, int) and renames["n"] >= fail_at):
                renames["full"] = True
            if renames["full"]:  # once full, the disk stays full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(BuildError) as info:
        generate(spec_path, out, backend="pattern", progress=False)
    monkeypatch.setattr(os, "replace", real_replace)
    message = str(info.value)
    assert "disk is full" in message and "--resume" in message, message
    assert "Traceback" not in message
    assert temp_files(out) == []
    assert_no_partial_files(out)

    result = generate(spec_path, out, resume=True, backend="pattern", progress=False)
    assert not result.interrupted and result.written + result.reused == COUNT
    assert temp_files(out) == []
    assert_same_tree(out, reference)


# ----------------------------------------------------------------------------- the manifest and its companions

def test_manifest_columns_rows_labels_and_hashes(reference):
    out = reference
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh))
    assert header == schema_columns()
    rows = manifest_rows(out)
    assert len(rows) == COUNT
    assert [r["index"] for r in rows] == [str(i) for i in range(COUNT)]
    assert [r["case_id"] for r in rows] == [f"case-{i:07d}" for i in range(COUNT)]
    cases = [json.loads(line) for line in (out / "cases.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(cases) == COUNT

    seen_findings = set()
    for row, case in zip(rows, cases):
        assert case["case_id"] == row["case_id"] and case["split"] == row["split"]
        findings = [f["finding"] for f in case["findings"]]
        seen_findings.update(findings)
        assert [f.split(":")[0] for f in row["findings"].split("|")] == findings
        expected = {FINDING_COLUMN[f] for f in findings}
        assert {c: row[c] for c in CHEXPERT} == {c: "1" if c in expected else "0" for c in CHEXPERT}, row["case_id"]
        # files and their hashes
        assert row["file_name"] == row["png_path"] == f"images/{row['split']}/{row['case_id']}.png"
        assert row["dicom_path"] == f"dicom/{row['split']}/{row['case_id']}.dcm"
        assert row["sr_path"] == f"dicom/{row['split']}/{row['case_id']}_sr.dcm"
        assert sha256(out / row["png_path"]) == row["png_sha256"]
        assert sha256(out / row["dicom_path"]) == row["dicom_sha256"]
        assert sha256(out / row["sr_path"]) == row["sr_sha256"]
        assert (row["width"], row["height"], row["bit_depth"], row["png_bit_depth"]) == ("64", "64", "16", "8")
        assert row["backend"] == "pattern" and row["synthmed_version"] == synthmed.__version__
        # masks: one per finding shown, named <image stem>_mask_<finding>.png, boxes from the masks
        shown = [f for f in findings if f != "no_finding"]
        masks = row["mask_paths"].split("|") if row["mask_paths"] else []
        assert masks == [f"masks/{row['split']}/{row['case_id']}_mask_{f}.png" for f in shown]
        hashes = row["mask_sha256"].split("|") if row["mask_sha256"] else []
        assert hashes == [sha256(out / m) for m in masks]
        # a SEG where there are masks
        assert row["seg_path"] == (f"dicom/{row['split']}/{row['case_id']}_seg.dcm" if masks else "")
        assert row["seg_sha256"] == (sha256(out / row["seg_path"]) if masks else "")
        boxes = json.loads(row["bboxes"]) if row["bboxes"] else {}
        assert sorted(boxes) == sorted(shown)
        for finding, mask_rel in zip(shown, masks):
            with Image.open(out / mask_rel) as im:
                assert im.size == (64, 64) and im.mode in ("L", "1")
                mask = np.array(im) > 0
            ys, xs = np.nonzero(mask)
            x0, y0, x1, y1 = boxes[finding]
            assert 0 <= x0 <= x1 < 64 and 0 <= y0 <= y1 < 64
            assert [x0, y0, x1, y1] == [xs.min(), ys.min(), xs.max(), ys.max()]
    assert seen_findings == set(FINDING_COLUMN)  # the test covers every finding of the spec
    # nothing on disk that the manifest does not list
    listed = {r[f"{kind}_path"] for r in rows for kind in ("png", "dicom", "sr", "seg") if r[f"{kind}_path"]} | {
        m for r in rows for m in r["mask_paths"].split("|") if m}
    on_disk = {p for p in tree(out) if p.startswith(("images/", "dicom/", "masks/")) and not p.endswith("metadata.csv")}
    assert on_disk == listed


def test_split_metadata_mirrors_the_manifest(reference):
    rows = manifest_rows(reference)
    for split in ("train", "val", "test"):
        path = reference / "images" / split / "metadata.csv"
        with open(path, newline="", encoding="utf-8") as fh:
            meta = list(csv.DictReader(fh))
        want = [r for r in rows if r["split"] == split]
        assert meta and len(meta) == len(want)
        for m, r in zip(meta, want):
            assert m["file_name"] == f"{r['case_id']}.png"
            assert (reference / "images" / split / m["file_name"]).is_file()
            assert {k: v for k, v in m.items() if k != "file_name"} == {k: v for k, v in r.items() if k != "file_name"}


def test_cases_jsonl_card_and_readme(reference, spec_path):
    out = reference
    lines = (out / "cases.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == COUNT
    card = json.loads((out / "dataset_card.json").read_text(encoding="utf-8"))
    assert card["intended_use"] == INTENDED_USE
    assert card["spec_hash"] == load_spec(spec_path).spec_hash
    assert card["count"] == COUNT
    assert sum(c["total"] for c in card["counts"]) == COUNT
    assert sum(c["train"] for c in card["counts"]) == sum(r["split"] == "train" for r in manifest_rows(out))
    assert card["software"]["synthmed"] == synthmed.__version__
    assert card["software"]["pydicom"] == pydicom.__version__  # it wrote the DICOM files
    assert card["software"]["PIL"] == Image.__version__  # it wrote the PNGs: its zlib decides their bytes
    assert card["output_format"] == RUN_FORMAT
    assert "python" in card["software"] and "numpy" in card["software"]
    readme = (out / "README.md").read_text(encoding="utf-8")
    assert "SYNTHETIC" in readme and INTENDED_USE in readme


@pytest.mark.slow
def test_hugging_face_imagefolder_loads_images_with_labels(reference, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    out = copy_of(reference, tmp_path)  # the cache must not touch the shared reference

    ds = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf-cache"))
    rows = manifest_rows(reference)
    assert set(ds) == {"train", "validation", "test"}
    for hf_split, split in (("train", "train"), ("validation", "val"), ("test", "test")):
        part = ds[hf_split]
        want = [r for r in rows if r["split"] == split]
        assert part.num_rows == len(want)  # masks are not rows
        assert {"image", "case_id", "Pneumonia", "Pleural Effusion"} <= set(part.column_names)
        assert sorted(part["case_id"]) == sorted(r["case_id"] for r in want)
        by_id = {r["case_id"]: r for r in want}
        for example in part.select(range(min(3, part.num_rows))):
            r = by_id[example["case_id"]]
            assert int(example["Pneumonia"]) == int(r["Pneumonia"])
            with Image.open(reference / r["png_path"]) as im:
                assert np.array_equal(np.array(example["image"]), np.array(im))


def test_a_multi_line_prompt_keeps_one_manifest_row_per_case(tmp_path):
    """YAML block scalars (template: |, negative: |) are ordinary in specs; the manifest must stay parseable."""
    spec = tmp_path / "multiline.yaml"
    spec.write_text(textwrap.dedent("""\
        spec_version: 1
        name: multi-line
        seed: 7
        count: 4
        image: {size: 64, formats: [png]}
        findings: [{finding: cardiomegaly, weight: 1}]
        prompt:
          template: |
            {view} chest radiograph.
            {findings}.
          negative: |
            text,
            watermark
        """), encoding="utf-8")
    out = tmp_path / "out"
    generate(spec, out, backend="pattern", progress=False)
    rows = manifest_rows(out)
    assert [r["case_id"] for r in rows] == [f"case-{i:07d}" for i in range(4)]
    for r in rows:
        assert r["png_path"] and sha256(out / r["png_path"]) == r["png_sha256"]
        assert r["prompt"].startswith("PA chest radiograph.") or r["prompt"].startswith("AP chest radiograph.")
        assert "cardiomegaly" in r["prompt"].lower() and "watermark" in r["negative_prompt"]
    result = generate(spec, out, resume=True, backend="pattern", progress=False)
    assert (result.written, result.reused) == (0, 4)


# ----------------------------------------------------------------------------- DICOM from a build

def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


SOP_CLASS = {"sc": "1.2.840.10008.5.1.4.1.1.7", "dx": "1.2.840.10008.5.1.4.1.1.1.1"}


@needs_dciodvfy
@needs_dcmdump
@pytest.mark.parametrize("iod", ["sc", "dx"])
@pytest.mark.parametrize("bit_depth, png_bit_depth", [(8, 8), (16, 8), (16, 16)])
def test_dicom_files_of_a_build_are_valid_and_match_the_png(tmp_path, iod, bit_depth, png_bit_depth):
    spec = write_spec(tmp_path / "specs", count=10,
                      image=f"{{size: 64, formats: [dicom, png], bit_depth: {bit_depth}, "
                            f"png_bit_depth: {png_bit_depth}, dicom_iod: {iod}}}")
    out = tmp_path / "out"
    generate(spec, out, backend="pattern", progress=False)
    rows = manifest_rows(out)
    # a no-finding case, a pneumonia case and a two-finding case
    picks = [next(r for r in rows if r["findings"].startswith(first)) for first in ("no_finding", "pneumonia", "pleural")]
    for row in picks:
        dcm = out / row["dicom_path"]
        assert dciodvfy_errors(dcm) == [], row["case_id"]
        for kind in ("sr", "seg"):  # the image's labels and masks, in its study
            if row[f"{kind}_path"]:
                assert dciodvfy_errors(out / row[f"{kind}_path"]) == [], row[f"{kind}_path"]
                assert pydicom.dcmread(out / row[f"{kind}_path"]).StudyInstanceUID == pydicom.dcmread(dcm).StudyInstanceUID
        dump = subprocess.run(["dcmdump", str(dcm)], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0, dump.stderr
        ds = pydicom.dcmread(dcm)
        assert ds.SOPClassUID == SOP_CLASS[iod]
        assert ds.BitsStored == (12 if bit_depth == 16 else 8)
        with Image.open(out / row["png_path"]) as im:
            png = np.array(im)
            mode = im.mode
        pixels = ds.pixel_array
        if png_bit_depth == 16:
            assert mode in ("I;16", "I;16B", "I") and png.max() > 255
            assert np.array_equal(pixels, png.astype(np.uint16) >> 4)
        elif bit_depth == 16:  # the DICOM keeps 12 bits, the PNG their rounded top 8
            assert mode == "L" and png.dtype == np.uint8 and pixels.max() > 255
            assert np.array_equal(np.floor(pixels.astype(np.float64) * 255 / 4095 + 0.5), png)
        else:
            assert mode == "L" and png.dtype == np.uint8
            assert np.array_equal(pixels, png)
        assert pixels.max() > 0 and pixels.min() < pixels.max()


def manifest_labels(row: dict) -> tuple:
    """The manifest's findings column as FindingLabels."""
    from synthmed.sampler import FindingLabel

    return tuple(FindingLabel(*(part or None for part in item.split(":"))) for item in row["findings"].split("|"))


def test_the_sr_of_every_image_reads_back_as_its_manifest_row(reference):
    from synthmed.writers.sr import read_sr_labels

    rows = manifest_rows(reference)[:40]
    seen = set()
    for row in rows:
        labels = read_sr_labels(reference / row["sr_path"])
        assert labels == manifest_labels(row), row["case_id"]
        ds = pydicom.dcmread(reference / row["sr_path"])
        image = pydicom.dcmread(reference / row["dicom_path"], stop_before_pixels=True)
        evidence = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
        assert evidence[0].ReferencedSOPInstanceUID == image.SOPInstanceUID
        assert ds.StudyInstanceUID == image.StudyInstanceUID
        seen.update((label.finding, label.location, label.severity) for label in labels)
    assert {f for f, _, _ in seen} == set(FINDING_COLUMN) and len(seen) > 8


def test_the_seg_of_every_image_with_masks_equals_its_mask_pngs(reference):
    from synthmed.writers.seg import read_seg_masks

    rows = [r for r in manifest_rows(reference) if r["mask_paths"]][:20]
    assert rows
    for row in rows:
        masks = read_seg_masks(reference / row["seg_path"])
        pngs = row["mask_paths"].split("|")
        assert list(masks) == [Path(p).stem.split("_mask_")[1] for p in pngs]
        for mask, png in zip(masks.values(), pngs):
            with Image.open(reference / png) as im:
                assert np.array_equal(mask, np.array(im) > 0), png


def test_masks_and_segments_pair_with_the_findings_by_position(tmp_path):
    """The phantom draws a fracture with the ribs, after the other findings: its mask used to come last, so
    findings 'fracture|mass' had masks 'mass|fracture'. mask_paths and the SEG's segments follow the findings."""
    from synthmed.writers.seg import read_seg_masks

    spec = tmp_path / "s.yaml"
    spec.write_text(textwrap.dedent("""\
        spec_version: 1
        name: order
        seed: 3
        count: 2
        image: {size: 128}
        findings:
          - {finding: [fracture, mass], weight: 1, location: right, severity: moderate}
        """), encoding="utf-8")
    out = tmp_path / "out"
    generate(spec, out, backend="phantom", progress=False, qc=False)
    for row in manifest_rows(out):
        findings = [f.split(":")[0] for f in row["findings"].split("|")]
        assert findings == ["fracture", "mass"]
        assert [Path(p).stem.split("_mask_")[1] for p in row["mask_paths"].split("|")] == findings
        assert list(read_seg_masks(out / row["seg_path"])) == findings


@pytest.mark.parametrize("old, says", [(1, r"format 5: DX images by default, a DICOM SR and SEG.*; 8-bit PNGs"),
                                       (2, r"format 5: 8-bit PNGs by default \(image.png_bit_depth\).*; DICOM UIDs"),
                                       (3, r"format 5: DICOM UIDs derived from the image's pixels too"),
                                       (4, r"format 5: DICOM Patient ID of the case id and the spec hash")])
def test_a_build_of_an_earlier_output_format_is_refused_on_resume_and_overwrite_rebuilds_it(tmp_path, old, says):
    spec = write_spec(tmp_path / "specs", count=3)
    out = tmp_path / "out"
    generate(spec, out, backend="pattern", progress=False, qc=False)
    run_file = out / ".synthmed" / "run.json"
    run = json.loads(run_file.read_text(encoding="utf-8"))
    run["format"] = old  # as synthmed wrote it before the DICOM SR and SEG (1), before 8-bit PNGs (2)
    run_file.write_text(json.dumps(run), encoding="utf-8")
    from synthmed.ledger import Ledger

    Ledger(out, out / ".synthmed").record_files("run", [".synthmed/run.json"])  # as that synthmed recorded it
    before = tree(out)
    refused = rf"earlier synthmed \(output format {old}; this one writes format {RUN_FORMAT}.*--overwrite"
    with pytest.raises(BuildError, match=refused) as info:
        generate(spec, out, resume=True, backend="pattern", progress=False, qc=False)
    assert info.value.exit_code == 2 and re.search(says, str(info.value))
    assert tree(out) == before  # nothing touched, nothing mixed
    result = generate(spec, out, overwrite=True, backend="pattern", progress=False, qc=False)
    assert result.written == 3 and all(r["sr_path"] and r["png_bit_depth"] == "8" for r in manifest_rows(out))


def test_a_resume_with_the_same_limit_keeps_its_sr_and_seg_and_a_smaller_one_is_refused(tmp_path):
    spec = write_spec(tmp_path / "specs", count=10)
    out = tmp_path / "out"
    generate(spec, out, limit=6, backend="pattern", progress=False, qc=False)
    assert any(p.endswith("_seg.dcm") for p in tree(out))
    again = generate(spec, out, limit=6, resume=True, backend="pattern", progress=False, qc=False)
    assert (again.written, again.reused) == (0, 6)
    with pytest.raises(BuildError, match=r"holds the images of 2 case\(s\) beyond the 4 now planned"):
        generate(spec, out, limit=4, resume=True, backend="pattern", progress=False, qc=False)


# ----------------------------------------------------------------------------- limit

@pytest.mark.slow
def test_limit_builds_the_first_cases_then_resume_completes(reference, spec_path, tmp_path):
    out = tmp_path / "limited"
    result = generate(spec_path, out, limit=10, backend="pattern", progress=False)
    assert (result.total, result.written) == (10, 10)
    rows, ref_rows = manifest_rows(out), manifest_rows(reference)
    assert rows == ref_rows[:10]
    ref_tree = tree(reference)
    got = tree(out)
    for rel, digest in got.items():
        if rel.startswith(("images/", "dicom/", "masks/")) and not rel.endswith("metadata.csv"):
            assert ref_tree[rel] == digest, rel
    assert sum(1 for rel in got if rel.endswith(".png") and rel.startswith("images/")) == 10
    assert len((out / "cases.jsonl").read_text(encoding="utf-8").splitlines()) == 10

    result = generate(spec_path, out, resume=True, backend="pattern", progress=False)
    assert result.total == COUNT and result.written + result.reused == COUNT and not result.interrupted
    assert_same_tree(out, reference)


# ----------------------------------------------------------------------------- CLI

def test_cli_generate_refuses_a_second_run_and_resumes(tmp_path):
    spec = write_spec(tmp_path / "specs", count=20)
    out = tmp_path / "cli-out"
    runner = CliRunner()
    args = ["generate", str(spec), "-o", str(out), "--backend", "pattern", "-q"]

    first = runner.invoke(cli_main, args)
    assert first.exit_code == 0, first.output
    assert str(out / "manifest.csv") in first.output
    assert len(manifest_rows(out)) == 20
    before = tree(out)

    second = runner.invoke(cli_main, args)
    assert second.exit_code == 2, second.output
    assert "--resume" in second.output
    assert "Traceback" not in second.output
    assert isinstance(second.exception, SystemExit)
    assert tree(out) == before
    del second  # the runner keeps the exception; see test_a_refused_run_releases_the_folder
    gc.collect()

    third = runner.invoke(cli_main, args + ["--resume"])
    assert third.exit_code == 0, third.output
    assert re.search(r"wrote 0 images \(20 kept from before\) of 20\b", third.output), third.output
    assert tree(out) == before


# ----------------------------------------------------------------------------- views, orientation, geometry (#18)

def test_patient_orientation_in_the_manifest_is_the_dicom_one(reference):
    """#18: the manifest's patient_orientation column says what each DICOM file's PatientOrientation says."""
    rows = manifest_rows(reference)
    assert {r["patient_orientation"] for r in rows} == {"L\\F"}  # frontal films of a backend with no geometry
    for row in rows[:5]:
        ds = pydicom.dcmread(reference / row["dicom_path"])
        assert "\\".join(ds.PatientOrientation) == row["patient_orientation"]
        assert ds.Modality == "DX" and "DistanceSourceToDetector" not in ds  # DX by default; no geometry known:
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([430 / 64] * 2, rel=1e-5)  # nominal spacing
        assert "nominal" in ds.DetectorDescription
    card = json.loads((reference / "dataset_card.json").read_text(encoding="utf-8"))
    assert "anatomy" not in card  # only drr builds name a CT


@pytest.mark.parametrize("backend", ["phantom", "pattern"])
def test_a_backend_without_a_lateral_refuses_ll_before_any_work(tmp_path, backend):
    """#18: --backend phantom (or pattern) on a spec with LL stops with exit code 2 naming LL; nothing is written."""
    spec = write_spec(tmp_path / "specs", count=10, image="{size: 128}")
    spec.write_text(spec.read_text(encoding="utf-8") + "view: {PA: 1, LL: 1}\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(BuildError) as info:
        generate(spec, out, backend=backend, progress=False)
    assert info.value.exit_code == 2
    assert f"the {backend} backend draws PA and AP films, not LL" in str(info.value)
    assert not out.exists()


def test_the_phantom_never_draws_a_lateral_as_a_pa():
    """#18: the phantom used to draw any unknown view as a PA film; a Backend object given LL cases refuses them."""
    from synthmed.backends.phantom import PhantomBackend
    from synthmed.sampler import Case, FindingLabel

    case = Case("case-0000000", 0, "train", 1, (FindingLabel("no_finding"),), "M", 50, "LL")
    with pytest.raises(ValueError, match="the phantom backend draws views PA and AP, not 'LL'"):
        PhantomBackend(128, 128).generate([case], [None])


def test_support_devices_alone_leave_no_finding_1_in_the_manifest(tmp_path):
    spec = load_spec(textwrap.dedent("""\
        spec_version: 1
        name: devices
        count: 4
        image: {size: 64, formats: [png]}
        findings:
          - {finding: endotracheal_tube, weight: 0.5}
          - {finding: [pneumonia, endotracheal_tube], weight: 0.5}
        """))
    generate(spec, tmp_path / "out", backend="pattern", progress=False, qc=False)
    labels = {(r["findings"].count("pneumonia"), r["No Finding"], r["Support Devices"])
              for r in manifest_rows(tmp_path / "out")}
    assert labels == {(0, "1", "1"), (1, "0", "1")}
