"""DICOM writer: write, validate with dciodvfy and dcmdump, read back with pydicom, compare pixels and tags.

Tiny images (64x64) and Case records built directly; each IOD x bit depth is checked the same way.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import shutil
import subprocess

import re
from collections import Counter

import numpy as np
import pydicom
import pytest

from synthmed.sampler import Case, FindingLabel
from synthmed.writers.dicom import PRIVATE_CREATOR, SOP_CLASS_UIDS, derive_uid, dicom_bytes, image_uid_root

IODS = ("sc", "dx")
BITS = (8, 12)
PROVENANCE = dict(dataset_name="pneumonia-demo", spec_hash="ab" * 32, backend="diffusers", model_id="org/tiny-model",
                  model_hash="sha256:" + "0" * 64, prompt="PA chest radiograph, moderate right pleural effusion",
                  synthmed_version="0.1.0")
DCMDUMP_SOP_NAMES = {"sc": "SecondaryCaptureImageStorage", "dx": "DigitalXRayImageStorageForPresentation"}

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None,
                                    reason="dciodvfy (Debian package dicom3tools) is not installed")
needs_dcmdump = pytest.mark.skipif(shutil.which("dcmdump") is None,
                                   reason="dcmdump (Debian package dcmtk) is not installed")


def make_case(case_id: str = "case-0000001", **changes) -> Case:
    fields = dict(case_id=case_id, index=1, split="train", seed=12345,
                  findings=(FindingLabel("pleural_effusion", "right", "moderate"),
                            FindingLabel("nodule", "right_upper_zone", "severe"),
                            FindingLabel("enlarged_cardiomediastinum", None, "mild")),
                  sex="F", age=58, view="PA")
    fields.update(changes)
    return Case(**fields)


def make_pixels(bits: int, shape: tuple[int, ...] = (64, 64), seed: int = 0) -> np.ndarray:
    dtype = np.uint16 if bits == 12 else np.uint8
    pixels = np.random.default_rng(seed).integers(0, 2 ** bits, shape).astype(dtype)
    pixels.flat[0], pixels.flat[-1] = 0, 2 ** bits - 1  # both ends of the stored range
    return pixels


def write(tmp_path, iod: str, bits: int, case: Case | None = None, pixels: np.ndarray | None = None):
    pixels = make_pixels(bits) if pixels is None else pixels
    data = dicom_bytes(pixels, case or make_case(), iod=iod, bits_stored=bits, **PROVENANCE)
    path = tmp_path / f"{iod}{bits}.dcm"
    path.write_bytes(data)
    return path, pixels


def dciodvfy(path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dciodvfy; its exit code is not reliable, so its output is read."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return ([line for line in lines if line.startswith("Error")],
            [line for line in lines if "Warning" in line])


def print_warnings(label: str, warnings: list[str]) -> None:
    """Log dciodvfy's warnings once each, with the private tags folded together."""
    folded = Counter(re.sub(r"\(0x0009,0x10[0-9a-f]{2}\)", "(0009,10xx)", line) for line in warnings)
    for line, count in sorted(folded.items()):
        print(f"dciodvfy {label}: {count} x {line}")


def private_findings(ds) -> list[dict]:
    """The private Finding Sequence as [{finding, location, severity}] of (scheme, value, meaning) tuples."""
    block = ds.private_block(0x0009, PRIVATE_CREATOR)
    out = []
    for item in block[0x10].value:
        item_block = item.private_block(0x0009, PRIVATE_CREATOR)

        def code(offset):
            seq = item_block[offset].value
            if not seq:
                return None
            c = seq[0]
            return (c.CodingSchemeDesignator, c.get("CodeValue") or c.get("LongCodeValue"), c.CodeMeaning)

        out.append({"finding_id": item_block[0x11].value, "finding": code(0x12),
                    "location_id": item_block[0x13].value or None, "location": code(0x14),
                    "severity_id": item_block[0x15].value or None, "severity": code(0x16)})
    return out


# ----------------------------------------------------------------------------- validators

@needs_dciodvfy
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("iod", IODS)
def test_dciodvfy_reports_no_errors(tmp_path, iod, bits):
    path, _ = write(tmp_path, iod, bits)
    errors, warnings = dciodvfy(path)
    print_warnings(f"{iod}/{bits}", warnings)
    assert errors == []


@needs_dciodvfy
@pytest.mark.parametrize("iod", IODS)
@pytest.mark.parametrize("case", [
    make_case(view=None, sex=None, age=None, split=None, seed=None),
    make_case(findings=(FindingLabel("no_finding"),), view="AP", sex="M", age=0),
    make_case(findings=(), view="AP", age=999),
], ids=["unknown-patient-and-view", "no-finding-AP", "no-labels"])
def test_dciodvfy_reports_no_errors_for_edge_cases(tmp_path, iod, case):
    path, _ = write(tmp_path, iod, 12, case=case)
    errors, warnings = dciodvfy(path)
    print_warnings(f"{iod}/edge-case", warnings)
    assert errors == []


@needs_dcmdump
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("iod", IODS)
def test_dcmdump_reads_it_and_shows_the_sop_class(tmp_path, iod, bits):
    path, _ = write(tmp_path, iod, bits)
    run = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"(0008,0016) UI ={DCMDUMP_SOP_NAMES[iod]}" in run.stdout


# ----------------------------------------------------------------------------- read back

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("iod", IODS)
def test_read_back_pixels_equal_exactly(tmp_path, iod, bits):
    path, pixels = write(tmp_path, iod, bits)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation) == (64, 64, 1, "MONOCHROME2")
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (
        (16, 12, 11, 0) if bits == 12 else (8, 8, 7, 0))
    assert ds.pixel_array.dtype == pixels.dtype
    np.testing.assert_array_equal(ds.pixel_array, pixels)
    # the window covers the stored range exactly: [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] = [0, 2**b - 1]
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    assert (c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2) == (0, 2 ** bits - 1)


def test_big_endian_and_non_contiguous_input_reads_back(tmp_path):
    pixels = make_pixels(12, shape=(48, 64)).T.astype(">u2")  # 64x48, Fortran order, big-endian
    path, _ = write(tmp_path, "dx", 12, pixels=pixels)
    ds = pydicom.dcmread(path)
    assert (ds.Rows, ds.Columns) == (64, 48)
    np.testing.assert_array_equal(ds.pixel_array, pixels)


def test_odd_sized_8_bit_image_is_padded_and_reads_back(tmp_path):
    pixels = make_pixels(8, shape=(63, 65))
    path, _ = write(tmp_path, "sc", 8, pixels=pixels)
    ds = pydicom.dcmread(path)
    assert len(ds.PixelData) % 2 == 0
    np.testing.assert_array_equal(ds.pixel_array, pixels)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("iod", IODS)
def test_read_back_marks_it_synthetic(tmp_path, iod, bits):
    path, _ = write(tmp_path, iod, bits)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SOP_CLASS_UIDS[iod] == ds.file_meta.MediaStorageSOPClassUID
    assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    if iod == "sc":
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
        assert ds.ConversionType == "SYN"
        assert ds.Modality == "OT"
    else:
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
        assert ds.Modality == "DX"
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert ds.ImageLaterality == "U"
        assert ds.ViewPosition == "PA"
        view = ds.ViewCodeSequence[0]
        assert (view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning) == (
            "272479007", "SCT", "postero-anterior")
    purpose = ds.ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "109100", "DCM", "Synthesizing Equipment")
    assert ds.Manufacturer == "synthmed" == ds.ContributingEquipmentSequence[0].Manufacturer
    assert ds.ManufacturerModelName == "diffusers/org/tiny-model"
    assert ds.SoftwareVersions == "0.1.0"
    assert ds.PatientIdentityRemoved == "YES"
    assert "SYNTHETIC" in ds.DeidentificationMethod
    assert ds.BurnedInAnnotation == "NO"
    assert ds.PatientName == "SYNTHETIC^case-0000001"
    assert ds.PatientID == "case-0000001-" + "ab" * 6  # the case id with the set's spec hash
    assert (ds.PatientSex, ds.PatientAge) == ("F", "058Y")
    for text in (ds.StudyDescription, ds.SeriesDescription, ds.ImageComments):
        assert "SYNTHETIC" in text and "pneumonia-demo" in text
    assert PROVENANCE["prompt"] in ds.ImageComments
    assert "pleural effusion (right, moderate)" in ds.ImageComments
    assert ds.BodyPartExamined == "CHEST"
    region = ds.AnatomicRegionSequence[0]
    assert (region.CodeValue, region.CodingSchemeDesignator) == ("816094009", "SCT")
    assert (ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime) == ("20000101", "000000", "20000101", "000000")


@pytest.mark.parametrize("iod", IODS)
def test_read_back_codes_the_findings(tmp_path, iod):
    path, _ = write(tmp_path, iod, 12)
    ds = pydicom.dcmread(path)
    assert private_findings(ds) == [
        {"finding_id": "pleural_effusion", "finding": ("SCT", "60046008", "Pleural effusion"),
         "location_id": "right", "location": ("SCT", "24028007", "Right"),
         "severity_id": "moderate", "severity": ("SCT", "6736007", "Moderate")},
        {"finding_id": "nodule", "finding": ("SCT", "27925004", "Nodule"),
         "location_id": "right_upper_zone", "location": ("99SYNTHMED", "ZONE-RU", "Upper zone of right lung"),
         "severity_id": "severe", "severity": ("SCT", "24484000", "Severe")},
        # a code longer than 16 characters goes in Long Code Value
        {"finding_id": "enlarged_cardiomediastinum",
         "finding": ("99SYNTHMED", "ENLARGED-CARDIOMEDIASTINUM", "Enlarged cardiomediastinum"),
         "location_id": None, "location": None, "severity_id": "mild", "severity": ("SCT", "255604002", "Mild")},
    ]
    assert "CodeValue" not in ds.private_block(0x0009, PRIVATE_CREATOR)[0x10].value[2] \
        .private_block(0x0009, PRIVATE_CREATOR)[0x12].value[0]
    assert [s.CodingSchemeDesignator for s in ds.CodingSchemeIdentificationSequence] == ["99SYNTHMED"]
    block = ds.private_block(0x0009, PRIVATE_CREATOR)
    assert block[0x09].value == PROVENANCE["prompt"]
    assert block[0x02].value == PROVENANCE["spec_hash"]


def test_non_ascii_prompt_round_trips(tmp_path):
    data = dicom_bytes(make_pixels(8), make_case(), iod="sc", bits_stored=8,
                       **{**PROVENANCE, "prompt": "胸部X线, 右侧胸腔积液"})
    ds = pydicom.dcmread(io.BytesIO(data))
    assert "右侧胸腔积液" in ds.ImageComments


# ----------------------------------------------------------------------------- determinism and UIDs

@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("iod", IODS)
def test_same_inputs_give_identical_bytes(iod, bits):
    first = dicom_bytes(make_pixels(bits), make_case(), iod=iod, bits_stored=bits, **PROVENANCE)
    second = dicom_bytes(make_pixels(bits), make_case(), iod=iod, bits_stored=bits, **PROVENANCE)
    assert first == second


def test_no_clock_host_or_path_in_the_bytes():
    import os
    import socket

    data = dicom_bytes(make_pixels(12), make_case(), **PROVENANCE)
    today = datetime.date.today()
    for text in (today.strftime("%Y%m%d"), os.getcwd()):
        assert text.encode() not in data
    host = socket.gethostname()
    if len(host) >= 6:
        assert host.encode() not in data


def test_different_case_ids_give_different_uids():
    uids = []
    for case_id in ("case-0000001", "case-0000002"):
        ds = pydicom.dcmread(io.BytesIO(dicom_bytes(make_pixels(12), make_case(case_id), **PROVENANCE)))
        uids.append((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        root = image_uid_root(ds, PROVENANCE["spec_hash"])
        assert ds.StudyInstanceUID == derive_uid(root, case_id, "study")
        assert ds.SeriesInstanceUID == derive_uid(root, case_id, "series")
        assert ds.SOPInstanceUID == derive_uid(root, case_id, "instance")
        assert len(set(uids[-1])) == 3
    assert not set(uids[0]) & set(uids[1])


def test_the_same_case_id_in_two_sets_is_two_patients():
    """Case ids start at case-0000000 in every set: the Patient ID carries the spec hash, so two sets' patients
    (another sex, another age) never merge in one PACS; the same spec gives the same ID."""
    ids = [pydicom.dcmread(io.BytesIO(dicom_bytes(make_pixels(12), make_case("case-0000001", sex=sex),
                                                  **{**PROVENANCE, "spec_hash": spec_hash}))).PatientID
           for spec_hash, sex in (("ab" * 32, "F"), ("cd" * 32, "M"), ("ab" * 32, "F"))]
    assert ids[0] != ids[1] and ids[0] == ids[2]
    assert all(i.startswith("case-0000001-") and len(i) <= 64 for i in ids)


def test_different_pixels_of_one_case_never_share_a_uid():
    """The same spec and case drawn differently (another model, backend or --steps: overrides the spec hash does
    not see) is another image: no UID in common, so one PACS can hold both sets. The same pixels give the same
    UIDs again."""
    case = make_case("case-0000001")
    pixels = make_pixels(12)
    other = pixels.copy()
    other[0, 0] ^= 1

    def uids(values):
        ds = pydicom.dcmread(io.BytesIO(dicom_bytes(values, case, **PROVENANCE)))
        return {ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID}

    assert not uids(pixels) & uids(other)
    assert uids(pixels) == uids(pixels.copy())


def test_derive_uid_is_2_25_and_the_first_128_bits_of_sha256():
    expected = "2.25." + str(int(hashlib.sha256(b"h\x00case-0000001\x00study").hexdigest()[:32], 16))
    uid = derive_uid("h", "case-0000001", "study")
    assert uid == expected
    assert len(uid) <= 64 and pydicom.uid.UID(uid).is_valid
    kinds = ("study", "series", "instance", "frame-of-reference")
    assert len({derive_uid("h", "case-0000001", k) for k in kinds}) == len(kinds)
    assert derive_uid("h", "case-0000001", "study") != derive_uid("h2", "case-0000001", "study")
    # fields are separated, so shifting a character between them changes the UID
    assert derive_uid("ab", "c", "study") != derive_uid("a", "bc", "study")


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("pixels, bits, message", [
    (np.zeros((8, 8), np.float32), 12, "dtype float32"),
    (np.zeros((8, 8), np.int16), 12, "dtype int16"),
    (np.zeros((8, 8), np.uint16), 8, "dtype uint16"),
    (np.zeros((8, 8), np.uint8), 12, "dtype uint8"),
    (np.full((8, 8), 4096, np.uint16), 12, "got max 4096"),
    (np.zeros((8, 8, 3), np.uint16), 12, "shape (8, 8, 3)"),
    (np.zeros((1, 8, 8), np.uint8), 8, "shape (1, 8, 8)"),
    (np.zeros((0, 8), np.uint8), 8, "shape (0, 8)"),
    ([[0, 1], [2, 3]], 8, "got list"),
])
def test_bad_pixels_are_refused_naming_the_argument(pixels, bits, message):
    with pytest.raises(ValueError, match="`pixels`") as info:
        dicom_bytes(pixels, make_case(), bits_stored=bits, **PROVENANCE)
    assert message in str(info.value)


@pytest.mark.parametrize("changes, argument", [
    ({"iod": "ct"}, "`iod`"),
    ({"bits_stored": 16}, "`bits_stored`"),
    ({"model_id": 3}, "`model_id`"),
    ({"dataset_name": " "}, "`dataset_name`"),
])
def test_bad_arguments_are_refused_naming_the_argument(changes, argument):
    kwargs = {"iod": "sc", "bits_stored": 12, **PROVENANCE, **changes}
    with pytest.raises(ValueError, match=argument):
        dicom_bytes(make_pixels(12), make_case(), **kwargs)


@pytest.mark.parametrize("changes, argument", [
    ({"sex": "X"}, "`case.sex`"),
    ({"age": 1000}, "`case.age`"),
    ({"view": "RL"}, "`case.view`"),  # a right lateral is not in the vocabulary (LL is)
    ({"case_id": "a\\b"}, "`case.case_id`"),
    ({"findings": (FindingLabel("unicorn"),)}, r"`case\.findings\[0\]\.finding`.*'unicorn'"),
    ({"findings": (FindingLabel("pneumonia", "left_foot"),)}, r"`case\.findings\[0\]\.location`.*'left_foot'"),
])
def test_bad_cases_are_refused_naming_the_field(changes, argument):
    with pytest.raises(ValueError, match=argument):
        dicom_bytes(make_pixels(12), make_case(**changes), **PROVENANCE)


# ----------------------------------------------------------------------------- geometry and the lateral (#18)

GEOMETRY_TAGS = ("PixelSpacing", "PixelSpacingCalibrationType", "PixelSpacingCalibrationDescription",
                 "EstimatedRadiographicMagnificationFactor", "DistanceSourceToDetector", "DistanceSourceToPatient")


def make_geometry(view: str = "PA"):
    from synthmed.backends import ImageGeometry

    sid, sod = {"PA": (1800.0, 1650.0), "AP": (1000.0, 850.0), "LL": (1800.0, 1610.0)}[view]
    return ImageGeometry(view, (1.40625, 1.40625), sid, sod, ("P", "F") if view == "LL" else ("L", "F"))


def write_with_geometry(tmp_path, iod: str, view: str):
    data = dicom_bytes(make_pixels(12), make_case(view=view), iod=iod, bits_stored=12, geometry=make_geometry(view),
                       **PROVENANCE)
    path = tmp_path / f"{iod}-{view}-geometry.dcm"
    path.write_bytes(data)
    return path


@needs_dciodvfy
@pytest.mark.parametrize("view", ["PA", "AP", "LL"])
@pytest.mark.parametrize("iod", IODS)
def test_dciodvfy_reports_no_errors_with_geometry(tmp_path, iod, view):
    """#18: the geometry tags are valid in both IODs (and SC gets none that its IOD lacks)."""
    errors, warnings = dciodvfy(write_with_geometry(tmp_path, iod, view))
    print_warnings(f"{iod}/{view}/geometry", warnings)
    assert errors == []
    assert not [w for w in warnings if "not present in standard" in w and "0x0009" not in w]


@pytest.mark.parametrize("view", ["PA", "AP", "LL"])
def test_dx_geometry_tags_are_present_and_consistent(tmp_path, view):
    """#18: ImagerPixelSpacing at the detector, PixelSpacing at the isocentre = imager / magnification = SID / SOD."""
    g = make_geometry(view)
    ds = pydicom.dcmread(write_with_geometry(tmp_path, "dx", view))
    imager = [float(v) for v in ds.ImagerPixelSpacing]
    patient = [float(v) for v in ds.PixelSpacing]
    mag = float(ds.EstimatedRadiographicMagnificationFactor)
    sid, sod = float(ds.DistanceSourceToDetector), float(ds.DistanceSourceToPatient)
    assert imager == pytest.approx(list(g.imager_pixel_spacing), rel=1e-9)
    assert (sid, sod) == (g.source_to_detector_mm, g.source_to_patient_mm)
    assert mag == pytest.approx(sid / sod, rel=1e-9)
    assert patient == pytest.approx([s / mag for s in imager], rel=1e-9)
    assert ds.PixelSpacingCalibrationType == "GEOMETRY"
    assert ds.ViewPosition == view
    assert list(ds.PatientOrientation) == (["P", "F"] if view == "LL" else ["L", "F"])
    assert "simulated" in ds.DetectorDescription


def test_sc_with_geometry_gets_the_calibrated_pixel_spacing_only(tmp_path):
    ds = pydicom.dcmread(write_with_geometry(tmp_path, "sc", "LL"))
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([1.40625 * 1610 / 1800] * 2, rel=1e-9)
    assert ds.PixelSpacingCalibrationType == "GEOMETRY"
    assert list(ds.PatientOrientation) == ["P", "F"]
    for absent in ("ImagerPixelSpacing", "ViewPosition", "DistanceSourceToDetector", "DistanceSourceToPatient",
                   "EstimatedRadiographicMagnificationFactor"):
        assert absent not in ds


@pytest.mark.parametrize("iod", IODS)
def test_without_geometry_dx_states_a_nominal_spacing_and_nothing_else(tmp_path, iod):
    """A backend that knows no geometry: DX states the nominal spacing as Imager Pixel Spacing and Pixel Spacing
    (loaders size things in mm from the latter), says it is nominal, and claims no calibration or distances; SC
    states nothing geometric."""
    path, _ = write(tmp_path, iod, 12)
    ds = pydicom.dcmread(path)
    assert list(ds.PatientOrientation) == ["L", "F"]
    if iod == "dx":
        nominal = pytest.approx([430 / 64] * 2, rel=1e-5)
        assert [float(v) for v in ds.ImagerPixelSpacing] == nominal and [float(v) for v in ds.PixelSpacing] == nominal
        assert "nominal" in ds.DetectorDescription and ds.DetectorDescription.startswith("SYNTHETIC")
        assert not [tag for tag in GEOMETRY_TAGS if tag in ds and tag != "PixelSpacing"]
    else:
        assert not [tag for tag in GEOMETRY_TAGS if tag in ds]


def test_dx_is_the_default_iod():
    from synthmed.spec import load_spec

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(make_pixels(12), make_case(), **PROVENANCE)))
    assert (ds.SOPClassUID, ds.Modality, ds.ViewPosition) == (SOP_CLASS_UIDS["dx"], "DX", "PA")
    assert load_spec("spec_version: 1\nname: d\ncount: 1\nfindings: [{finding: edema, weight: 1}]").image.dicom_iod \
        == "dx"


@needs_dciodvfy
@pytest.mark.parametrize("iod", IODS)
def test_a_lateral_without_geometry_is_valid_and_faces_left(tmp_path, iod):
    """#18: LL is a view of the writer; its display orientation is the lateral convention, P\\F, not L\\F."""
    path, _ = write(tmp_path, iod, 12, case=make_case(view="LL"))
    errors, _ = dciodvfy(path)
    assert errors == []
    ds = pydicom.dcmread(path)
    assert list(ds.PatientOrientation) == ["P", "F"]
    if iod == "dx":
        assert ds.ViewPosition == "LL"
        code = ds.ViewCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("399173006", "SCT", "left lateral")


@pytest.mark.parametrize("case_view, geometry, message", [
    ("PA", "LL", "`geometry.view` must be the case's view 'PA'"),
    (None, "AP", "`geometry.view` must be the case's view 'PA'"),
    ("PA", {"view": "PA"}, "`geometry` must be a synthmed.backends.ImageGeometry"),
])
def test_geometry_of_another_view_is_refused(case_view, geometry, message):
    geometry = make_geometry(geometry) if isinstance(geometry, str) else geometry
    with pytest.raises(ValueError, match=re.escape(message)):
        dicom_bytes(make_pixels(12), make_case(view=case_view), geometry=geometry, **PROVENANCE)


@pytest.mark.parametrize("kw, message", [
    (dict(imager_pixel_spacing=(0.0, 1.0)), "imager_pixel_spacing"),
    (dict(source_to_patient_mm=1900.0), "source_to_patient_mm < source_to_detector_mm"),
    (dict(patient_orientation=("X", "F")), "patient_orientation"),
])
def test_bad_geometry_is_refused_naming_the_field(kw, message):
    from synthmed.backends import ImageGeometry

    fields = dict(view="PA", imager_pixel_spacing=(1.0, 1.0), source_to_detector_mm=1800.0,
                  source_to_patient_mm=1650.0, patient_orientation=("L", "F"))
    with pytest.raises(ValueError, match=re.escape(message)):
        ImageGeometry(**{**fields, **kw})
