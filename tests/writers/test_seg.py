"""DICOM SEG writer: dciodvfy, masks read back pixel for pixel with highdicom, codes, references, bytes."""

from __future__ import annotations

import datetime
import io

import numpy as np
import pydicom
import pytest

from synthmed.qc.dciodvfy import dciodvfy_available, dciodvfy_errors
from synthmed.sampler import Case, FindingLabel
from synthmed.writers.dicom import dicom_dataset, image_uid_root
from synthmed.writers.seg import SEGReadError, read_seg_masks, seg_bytes
from synthmed.writers.sr import finding_tracking_uid

PROVENANCE = dict(dataset_name="pneumonia-demo", spec_hash="ab" * 32, backend="phantom", model_id="phantom-1",
                  model_hash="sha256:" + "0" * 64, prompt="PA chest radiograph", synthmed_version="0.1.0")
KW = {k: v for k, v in PROVENANCE.items() if k not in ("dataset_name", "prompt")}  # what the SEG takes
SHAPE = (24, 32)  # rows, columns: not square, so a transposed mask cannot pass

needs_dciodvfy = pytest.mark.skipif(not dciodvfy_available(),
                                    reason="dciodvfy (Debian package dicom3tools) is not installed")


def make_case(case_id: str = "case-0000001", **changes) -> Case:
    fields = dict(case_id=case_id, index=1, split="train", seed=12345,
                  findings=(FindingLabel("pleural_effusion", "right", "moderate"),
                            FindingLabel("pneumonia", "left_lower_lobe", "mild"),
                            FindingLabel("endotracheal_tube", None, None)),
                  sex="F", age=58, view="PA")
    fields.update(changes)
    return Case(**fields)


def make_masks(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    effusion = np.zeros(SHAPE, bool)
    effusion[12:, 2:14] = True
    return {"pleural_effusion": effusion, "pneumonia": rng.random(SHAPE) > 0.6,  # overlaps the effusion
            "endotracheal_tube": np.zeros(SHAPE, bool)}  # empty


def image_of(case: Case, iod: str = "dx", bits: int = 12, geometry=None):
    pixels = np.zeros(SHAPE, np.uint16 if bits == 12 else np.uint8)
    return dicom_dataset(pixels, case, iod=iod, bits_stored=bits, geometry=geometry, **PROVENANCE)


def write_seg(case: Case | None = None, masks=None, iod: str = "dx", **image_kw) -> bytes:
    case = case or make_case()
    return seg_bytes(image_of(case, iod, **image_kw), case, make_masks() if masks is None else masks, **KW)


# ----------------------------------------------------------------------------- validators

@needs_dciodvfy
@pytest.mark.parametrize("bits", (8, 12))
@pytest.mark.parametrize("iod", ("sc", "dx"))
def test_dciodvfy_reports_no_errors(tmp_path, iod, bits):
    path = tmp_path / "seg.dcm"
    path.write_bytes(write_seg(iod=iod, bits=bits))
    assert dciodvfy_errors(path) == []


@needs_dciodvfy
@pytest.mark.parametrize("iod", ("sc", "dx"))
def test_dciodvfy_reports_no_errors_with_geometry(tmp_path, iod):
    from synthmed.backends import ImageGeometry

    case = make_case(view="AP")
    path = tmp_path / "seg.dcm"
    path.write_bytes(write_seg(case, iod=iod, geometry=ImageGeometry("AP", (1.4, 1.4), 1000.0, 850.0, ("L", "F"))))
    assert dciodvfy_errors(path) == []
    # an image with Pixel Spacing: highdicom's own reader still reads the SEG
    assert all(np.array_equal(read_seg_masks(path)[f], m) for f, m in make_masks().items())


# ----------------------------------------------------------------------------- read back

@pytest.mark.parametrize("iod", ("sc", "dx"))
def test_masks_read_back_pixel_for_pixel(iod):
    masks = make_masks()
    back = read_seg_masks(write_seg(masks=masks, iod=iod))
    assert list(back) == list(masks)
    for finding, mask in masks.items():
        assert back[finding].shape == SHAPE and back[finding].dtype == np.bool_
        assert np.array_equal(back[finding], mask), finding


def test_all_empty_masks_read_back_empty(tmp_path):
    back = read_seg_masks(write_seg(masks={"pneumonia": np.zeros(SHAPE, bool)}))
    assert list(back) == ["pneumonia"] and not back["pneumonia"].any()


def test_it_is_binary_and_compact():
    seg = pydicom.dcmread(io.BytesIO(write_seg()))
    assert (seg.SegmentationType, seg.BitsAllocated) == ("BINARY", 1)
    assert int(seg.NumberOfFrames) == 2  # the empty endotracheal tube mask has no frame
    assert len(write_seg()) < 2000 + 2 * SHAPE[0] * SHAPE[1] // 8 + 4000


def test_segments_are_coded_like_the_sr_and_reference_the_image():
    case = make_case()
    image = image_of(case)
    seg = pydicom.dcmread(io.BytesIO(seg_bytes(image, case, make_masks(), **KW)))
    effusion, pneumonia, tube = seg.SegmentSequence
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["pleural_effusion", "pneumonia", "endotracheal_tube"]
    assert effusion.SegmentedPropertyTypeCodeSequence[0].CodeValue == "60046008"
    assert effusion.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # abnormal structure
    assert tube.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "260787004"  # physical object
    region = effusion.AnatomicRegionSequence[0]
    assert (region.CodeValue, region.AnatomicRegionModifierSequence[0].CodeValue) == ("816094009", "24028007")
    assert pneumonia.AnatomicRegionSequence[0].CodeValue == "41224006"  # left lower lobe
    assert [s.TrackingUID for s in seg.SegmentSequence] == [finding_tracking_uid(image_uid_root(image, KW["spec_hash"]), case.case_id, n)
                                                            for n in range(3)]
    assert seg.SourceImageSequence[0].ReferencedSOPInstanceUID == image.SOPInstanceUID
    assert seg.StudyInstanceUID == image.StudyInstanceUID and seg.PatientID == image.PatientID
    assert seg.SeriesInstanceUID not in (image.SeriesInstanceUID,)


def test_it_says_it_is_synthetic():
    seg = pydicom.dcmread(io.BytesIO(write_seg()))
    assert str(seg.PatientName).startswith("SYNTHETIC^") and seg.PatientIdentityRemoved == "YES"
    assert seg.SeriesDescription.startswith("SYNTHETIC") and seg.ContentDescription.startswith("SYNTHETIC")
    assert seg.ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109100"


# ----------------------------------------------------------------------------- determinism

def test_same_inputs_give_identical_bytes_and_no_clock(monkeypatch):
    import highdicom.base

    first = write_seg()

    class Later(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2031, 7, 9, 13, 14, 15, 161718)

    monkeypatch.setattr(highdicom.base, "datetime",
                        type("fake_datetime_module", (), {"datetime": Later, "date": datetime.date,
                                                          "time": datetime.time}))
    assert write_seg() == first  # also: no random UID (highdicom draws the Dimension Organization UID)
    assert datetime.date.today().strftime("%Y%m%d").encode() not in first


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("masks, message", [
    ({}, "`masks` of case-0000001 is empty"),
    ({"pneumonia": np.zeros(SHAPE[::-1], bool)}, r"`masks\['pneumonia'\]` of case-0000001 has shape \(32, 24\)"),
    ({"pneumonia": np.full(SHAPE, 255, np.uint8)}, r"`masks\['pneumonia'\]` .* must be bool or 0/1"),
    ({"unicorn": np.zeros(SHAPE, bool)}, "'unicorn' is not a finding in the vocabulary"),
])
def test_bad_masks_are_refused_naming_the_finding(masks, message):
    with pytest.raises(ValueError, match=message):
        write_seg(masks=masks)


def test_reading_an_image_as_a_seg_names_the_file(tmp_path):
    from synthmed.writers.dicom import part10_bytes

    path = tmp_path / "image.dcm"
    path.write_bytes(part10_bytes(image_of(make_case())))
    with pytest.raises(SEGReadError, match="image.dcm"):
        read_seg_masks(path)
