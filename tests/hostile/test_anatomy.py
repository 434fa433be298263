"""Hostile corpus: a user's own labelled CTs (``generator.anatomy``, drr backend) that are damaged or odd. Each
test reproduces one defect of the anatomy re-trial of issue #17: ``synthmed validate`` / ``generate`` must exit 2
naming the field and the file, with no traceback, in bounded time and memory.

Inputs are tiny (a 16 x 16 x 8 CT, a 3-slice 4 x 4 DICOM series) and built here.
"""

from __future__ import annotations

import gzip
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
np = pytest.importorskip("numpy")

from synthmed.cli import main as cli_main  # noqa: E402

BASE_NAMES = ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "lung_upper_lobe_left",
              "lung_lower_lobe_left", "heart")
AFFINE = np.diag([2.0, 2.0, 2.5, 1.0])
FINDINGS = "[{finding: cardiomegaly, weight: 1}]"


def _with_sform(data, sform):
    """A NIfTI image whose only affine is ``sform`` (no qform), however bad it is."""
    img = nib.Nifti1Image(data, AFFINE)
    img.set_qform(None, code=0)
    img.header.set_sform(sform, code=1)
    return nib.Nifti1Image(data, None, img.header)


def _ct_and_labels(folder: Path, ct_name: str = "ct.nii.gz") -> None:
    """A 16 x 16 x 8 CT (a dense block in air), its label map with the lobes and heart, and structures.csv."""
    hu = np.full((16, 16, 8), -1000, np.int16)
    hu[2:14, 3:13, 1:7] = 40
    labels = np.zeros((16, 16, 8), np.uint8)
    for i in range(len(BASE_NAMES)):
        labels[2 + 2 * i:4 + 2 * i, 4:12, 2:6] = i + 1
    nib.save(nib.Nifti1Image(hu, AFFINE), str(folder / ct_name))
    nib.save(nib.Nifti1Image(labels, AFFINE), str(folder / "labels.nii.gz"))
    (folder / "structures.csv").write_text("id,structure\n" + "".join(f"{i + 1},{n}\n" for i, n in
                                                                       enumerate(BASE_NAMES)), encoding="utf-8")


def _spec(folder: Path, ct: str = "ct.nii.gz", labels: str = "labels.nii.gz",
          structures: str = "structures.csv") -> Path:
    path = folder / "spec.yaml"
    path.write_text("spec_version: 1\nname: hostile\ncount: 2\nimage: {size: 64}\n"
                    f"findings: {FINDINGS}\ngenerator:\n  backend: drr\n  anatomy:\n"
                    f"    - {{ct: '{ct}', labels: '{labels}', structures: '{structures}', id: mine}}\n",
                    encoding="utf-8")
    return path


def _validate(spec: Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli_main, ["validate", str(spec)])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    return result.exit_code, result.output


def _refused(spec: Path, field: str, *names: str) -> str:
    """Validate ``spec``: exit 2, the field path and each of ``names`` in the message."""
    code, out = _validate(spec)
    assert code == 2, out
    assert f"generator.anatomy[0].{field}" in out, out
    for name in names:
        assert name in out, out
    assert "Traceback" not in out
    return out


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def _validate_bounded(spec: Path) -> subprocess.CompletedProcess:
    """``synthmed validate`` in a child with 3 GiB of address space and 60 s: a hang or an unbounded read fails."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    try:
        return subprocess.run([sys.executable, "-m", "synthmed.cli", "validate", str(spec)], capture_output=True,
                              text=True, timeout=60, preexec_fn=_limit_memory, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("synthmed validate did not finish in 60 s")


@pytest.fixture
def volume(tmp_path) -> Path:
    _ct_and_labels(tmp_path)
    return tmp_path


def test_the_tiny_volume_validates(volume):
    """The inputs below differ from this one by their defect only."""
    code, out = _validate(_spec(volume))
    assert code == 0, out


# ----------------------------------------------------------------------------- structures files

def test_a_structures_csv_with_a_short_row_is_refused(volume):
    """#17 anatomy re-trial: a CSV row without its structure column gave an AttributeError."""
    (volume / "s.csv").write_text("id,structure\n5\n1,heart\n", encoding="utf-8")
    out = _refused(_spec(volume, structures="s.csv"), "structures", str(volume / "s.csv"))
    assert "line 2" in out


def test_a_structures_csv_with_a_huge_field_is_refused(volume):
    """#17 anatomy re-trial: a CSV field over 131072 characters gave a _csv.Error traceback."""
    (volume / "s.csv").write_text("id,structure\n1," + "x" * 200_000 + "\n", encoding="utf-8")
    _refused(_spec(volume, structures="s.csv"), "structures", str(volume / "s.csv"))


def test_a_deeply_nested_structures_json_is_refused(volume):
    """#17 anatomy re-trial: JSON nested 100000 deep gave a RecursionError."""
    (volume / "s.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    _refused(_spec(volume, structures="s.json"), "structures", str(volume / "s.json"))


def test_a_fifo_as_structures_file_does_not_hang(volume):
    """#17 anatomy re-trial: a FIFO as the structures file made validate wait forever."""
    os.mkfifo(volume / "s.csv")
    r = _validate_bounded(_spec(volume, structures="s.csv"))
    assert r.returncode == 2 and "generator.anatomy[0].structures" in r.stderr and "Traceback" not in r.stderr
    assert str(volume / "s.csv") in r.stderr and "regular file" in r.stderr


def test_dev_zero_as_structures_file_is_not_read(volume):
    """#17 anatomy re-trial: /dev/zero as the structures file was read until a MemoryError."""
    r = _validate_bounded(_spec(volume, structures="/dev/zero"))
    assert r.returncode == 2 and "generator.anatomy[0].structures" in r.stderr and "Traceback" not in r.stderr
    assert "/dev/zero" in r.stderr


def test_a_huge_structures_file_is_refused_before_reading(volume):
    """#17 anatomy re-trial: a structures file is read whole; beyond 4 MiB it is refused by its size."""
    with open(volume / "s.csv", "wb") as f:
        f.write(b"id,structure\n")
        f.truncate(64 << 20)  # sparse: no disk used
    out = _refused(_spec(volume, structures="s.csv"), "structures", str(volume / "s.csv"))
    assert "MiB" in out


# ----------------------------------------------------------------------------- NIfTI affines and sizes

def test_an_all_zero_affine_is_refused(tmp_path):
    """#17 anatomy re-trial: a NIfTI CT with an all-zero sform gave 'ValueError: cannot convert NaN to integer'."""
    _ct_and_labels(tmp_path)
    ct = nib.load(str(tmp_path / "ct.nii.gz"))
    nib.save(_with_sform(np.asarray(ct.dataobj), np.zeros((4, 4))), str(tmp_path / "zero.nii.gz"))
    _refused(_spec(tmp_path, ct="zero.nii.gz"), "ct", str(tmp_path / "zero.nii.gz"), "affine")


def test_a_nan_affine_in_the_label_map_is_refused(tmp_path):
    """#17 anatomy re-trial: a label map with a NaN sform gave a LinAlgError in io_orientation."""
    _ct_and_labels(tmp_path)
    bad = np.array(AFFINE)
    bad[0, 0] = np.nan
    labels = nib.load(str(tmp_path / "labels.nii.gz"))
    nib.save(_with_sform(np.asarray(labels.dataobj), bad), str(tmp_path / "nan.nii.gz"))
    _refused(_spec(tmp_path, labels="nan.nii.gz"), "labels", str(tmp_path / "nan.nii.gz"), "affine")


def test_a_header_claiming_a_huge_volume_is_refused_at_validate(tmp_path):
    """#17 anatomy re-trial: a header claiming 30000^3 int16 voxels passed validate, then a MemoryError at generate."""
    _ct_and_labels(tmp_path)
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_sform(AFFINE, code=1)
    hdr.set_qform(AFFINE, code=1)
    with gzip.open(tmp_path / "huge.nii.gz", "wb") as f:
        f.write(hdr.binaryblock + b"\0" * 4 + b"\0" * 4096)
    _refused(_spec(tmp_path, ct="huge.nii.gz"), "ct", str(tmp_path / "huge.nii.gz"), "30000")


def test_an_uncompressed_nifti_shorter_than_its_header_says_is_refused(tmp_path):
    """#17 anatomy re-trial: a .nii cut short passed validate; its size is compared with the header's at validate."""
    _ct_and_labels(tmp_path)
    nib.save(nib.load(str(tmp_path / "ct.nii.gz")), str(tmp_path / "ct.nii"))
    data = (tmp_path / "ct.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[:len(data) // 2])
    _refused(_spec(tmp_path, ct="cut.nii"), "ct", str(tmp_path / "cut.nii"), "bytes")


def test_a_truncated_nifti_gz_exits_2_at_generate(tmp_path):
    """#17 anatomy re-trial: a .nii.gz with a real header and a cut body made generate print only 'Aborted!'."""
    _ct_and_labels(tmp_path)
    noise = np.random.default_rng(0).integers(-1000, 1000, (16, 16, 8)).astype(np.int16)  # does not compress
    full = gzip.compress(nib.Nifti1Image(noise, AFFINE).to_bytes())
    (tmp_path / "cut.nii.gz").write_bytes(full[:len(full) // 2])
    spec = _spec(tmp_path, ct="cut.nii.gz")
    code, out = _validate(spec)  # the header is whole: validate reads no voxel
    if code == 2:
        assert "cut.nii.gz" in out and "Traceback" not in out
        return
    result = CliRunner().invoke(cli_main, ["generate", str(spec), "-o", str(tmp_path / "out"), "--no-qc", "-q"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert str(tmp_path / "cut.nii.gz") in result.output and "Aborted" not in result.output


# ----------------------------------------------------------------------------- DICOM series

def _dicom_series(folder: Path, **tags) -> Path:
    """Three 4 x 4 axial slices 2.5 mm apart; ``tags`` overrides (None deletes) tags of every slice."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    series = generate_uid()
    for k in range(3):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID = "CT", series
        ds.ImagePositionPatient = [0, 0, 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [2, 2]
        ds.Rows, ds.Columns = 4, 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.zeros((4, 4), np.int16).tobytes()
        for key, value in tags.items():
            if value is None:
                del ds[key]
            elif isinstance(value, pydicom.DataElement):
                ds[key] = value
            else:
                ds[key] = pydicom.DataElement(pydicom.datadict.tag_for_keyword(key),
                                              pydicom.datadict.dictionary_VR(key), value)
        ds.save_as(str(folder / f"slice{k}.dcm"), enforce_file_format=True)
    return folder


def _dicom_refused(tmp_path, tag: str, **tags) -> str:
    _ct_and_labels(tmp_path)
    _dicom_series(tmp_path / "series", **tags)
    return _refused(_spec(tmp_path, ct="series"), "ct", str(tmp_path / "series"), tag)


def test_a_dicom_orientation_of_three_values_is_refused(tmp_path):
    """#17 anatomy re-trial: ImageOrientationPatient with 3 values gave a ValueError traceback."""
    _dicom_refused(tmp_path, "ImageOrientationPatient", ImageOrientationPatient=[1, 0, 0])


def test_a_dicom_pixel_spacing_of_one_value_is_refused(tmp_path):
    """#17 anatomy re-trial: PixelSpacing with 1 value gave a TypeError traceback."""
    _dicom_refused(tmp_path, "PixelSpacing", PixelSpacing=[2])


def test_a_dicom_slice_without_rows_is_refused(tmp_path):
    """#17 anatomy re-trial: a slice without Rows gave an AttributeError traceback."""
    _dicom_refused(tmp_path, "Rows", Rows=None)


def test_a_dicom_pixel_spacing_that_is_not_a_number_is_refused(tmp_path):
    """#17 anatomy re-trial: PixelSpacing 'abc' gave a ValueError traceback."""
    _ct_and_labels(tmp_path)
    series = _dicom_series(tmp_path / "series", PixelSpacing=pydicom.DataElement(0x00280030, "LO", "abc"))
    for f in series.iterdir():  # pydicom writes no DS 'abc': write it as LO, then say DS
        data = f.read_bytes()
        f.write_bytes(data.replace(b"\x28\x00\x30\x00LO", b"\x28\x00\x30\x00DS", 1))
    _refused(_spec(tmp_path, ct="series"), "ct", str(series), "PixelSpacing")


def test_an_all_zero_dicom_orientation_is_named(tmp_path):
    """#17 anatomy re-trial: an all-zero ImageOrientationPatient was reported as 'slices are not evenly spaced'."""
    out = _dicom_refused(tmp_path, "ImageOrientationPatient", ImageOrientationPatient=[0, 0, 0, 0, 0, 0])
    assert "evenly spaced" not in out


# ----------------------------------------------------------------------------- paths

def test_a_symlink_loop_is_refused_by_the_path_written(volume):
    """#17 anatomy re-trial: `ct: cts/loop` (a link to itself) gave 'RuntimeError: Symlink loop'."""
    (volume / "cts").mkdir()
    os.symlink("loop", volume / "cts" / "loop")
    _refused(_spec(volume, ct="cts/loop"), "ct", "cts/loop")


def test_a_dangling_link_is_reported_by_the_path_written(volume):
    """#17 anatomy re-trial: a dangling link was reported by its target, not by the path the user wrote."""
    os.symlink(volume / "gone" / "labels.nii.gz", volume / "link.nii.gz")
    _refused(_spec(volume, labels="link.nii.gz"), "labels", str(volume / "link.nii.gz"))


# ----------------------------------------------------------------------------- trial C: volumes that read but are wrong

def _generate(spec: Path, out: Path):
    result = CliRunner().invoke(cli_main, ["generate", str(spec), "-o", str(out), "--no-qc", "-q"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def test_a_truncated_nifti_gz_stored_lps_exits_2_naming_it(tmp_path):
    """Trial C: a cut .nii.gz not stored RAS (most CTs are LPS) is read whole by nibabel's reorientation, outside
    the voxel reader's error handling: 'Aborted!', exit 1."""
    _ct_and_labels(tmp_path)
    lps = np.diag([-2.0, -2.0, 2.5, 1.0])
    labels = np.asarray(nib.load(str(tmp_path / "labels.nii.gz")).dataobj)
    nib.save(nib.Nifti1Image(labels, lps), str(tmp_path / "labels.nii.gz"))
    noise = np.random.default_rng(0).integers(-1000, 1000, (16, 16, 8)).astype(np.int16)
    full = gzip.compress(nib.Nifti1Image(noise, lps).to_bytes())
    (tmp_path / "cut.nii.gz").write_bytes(full[:len(full) // 2])
    result = _generate(_spec(tmp_path, ct="cut.nii.gz"), tmp_path / "out")
    assert result.exit_code == 2 and str(tmp_path / "cut.nii.gz") in result.output, result.output
    assert "Aborted" not in result.output


def test_a_ct_not_in_hounsfield_units_is_refused_not_projected(tmp_path):
    """Trial C: a CT scaled 0-1 made films of noise, labelled, and qc passed them."""
    _ct_and_labels(tmp_path)
    hu = np.asarray(nib.load(str(tmp_path / "ct.nii.gz")).dataobj).astype(np.float32)
    nib.save(nib.Nifti1Image((hu + 1024) / 4095, AFFINE), str(tmp_path / "ct01.nii.gz"))
    result = _generate(_spec(tmp_path, ct="ct01.nii.gz"), tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "ct01.nii.gz does not look like a CT in Hounsfield units" in result.output
    assert not list((tmp_path / "out").rglob("*.png"))


def test_ct_and_label_map_swapped_are_named(tmp_path):
    _ct_and_labels(tmp_path)
    result = _generate(_spec(tmp_path, ct="labels.nii.gz", labels="ct.nii.gz"), tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "does not hold structure numbers" in result.output and "swapped" in result.output


@pytest.mark.parametrize("findings, needed", [("[{finding: cardiomegaly, weight: 1}]", "needed for cardiomegaly"),
                                              ("[{finding: no_finding, weight: 1}]", "needed for every film")])
def test_a_structure_the_map_names_but_does_not_hold_is_named_before_any_case(tmp_path, monkeypatch, findings,
                                                                              needed):
    """Trial C: structures.csv names the heart, the label map has no heart voxel: a FindingNotDrawable traceback
    mid-run (exit 1); under Ray a RayTaskError dump."""
    _ct_and_labels(tmp_path)
    labels = np.asarray(nib.load(str(tmp_path / "labels.nii.gz")).dataobj).copy()
    labels[labels == BASE_NAMES.index("heart") + 1] = 0
    nib.save(nib.Nifti1Image(labels, AFFINE), str(tmp_path / "labels.nii.gz"))
    monkeypatch.setattr(sys.modules[__name__], "FINDINGS", findings)
    result = _generate(_spec(tmp_path), tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "has no voxel of heart" in result.output and needed in result.output


def test_a_structure_of_a_single_voxel_is_named_too(tmp_path):
    """Re-trial: a heart of one voxel drew 'severe cardiomegaly' from 1-2 mask pixels, and qc passed it."""
    _ct_and_labels(tmp_path)
    labels = np.asarray(nib.load(str(tmp_path / "labels.nii.gz")).dataobj).copy()
    heart = BASE_NAMES.index("heart") + 1
    labels[labels == heart] = 0
    labels[8, 8, 4] = heart
    nib.save(nib.Nifti1Image(labels, AFFINE), str(tmp_path / "labels.nii.gz"))
    result = _generate(_spec(tmp_path), tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "has only 0.01 ml of heart" in result.output


def test_a_resume_after_the_users_ct_changed_names_the_ct_file(volume):
    """A kept chunk was projected from the user's CT; after the CT file changes, --resume refuses (exit 2) and names
    the CT files of generator.anatomy, not only a hash, so the user knows what to restore."""
    from synthmed.build import CHUNK_SIZE, generate
    from synthmed.build.errors import BuildError
    from synthmed.spec import load_spec

    spec = load_spec(f"spec_version: 1\nname: ct\ncount: {CHUNK_SIZE + 2}\nimage: {{size: 64}}\n"
                     f"qc: {{enabled: false}}\nfindings: {FINDINGS}\ngenerator:\n  backend: drr\n  anatomy:\n"
                     f"    - {{ct: '{volume}/ct.nii.gz', labels: '{volume}/labels.nii.gz', "
                     f"structures: '{volume}/structures.csv', id: mine}}\n")
    generate(spec, volume / "out", progress=False, limit=CHUNK_SIZE)
    hu = np.full((16, 16, 8), -1000, np.int16)
    hu[2:14, 3:13, 1:7] = 60  # another CT under the same name
    nib.save(nib.Nifti1Image(hu, AFFINE), str(volume / "ct.nii.gz"))
    with pytest.raises(BuildError) as refused:
        generate(spec, volume / "out", progress=False, resume=True)
    assert refused.value.exit_code == 2
    assert f"this run's, the CT files of generator.anatomy ({volume}/ct.nii.gz" in str(refused.value)
    assert len(list((volume / "out" / "images").rglob("*.png"))) == CHUNK_SIZE
