"""DICOM SR writer: dciodvfy, read back with highdicom into the same labels, references, synthetic markers, bytes."""

from __future__ import annotations

import datetime
import io

import numpy as np
import pydicom
import pytest

from synthmed.qc.dciodvfy import dciodvfy_available, dciodvfy_errors
from synthmed.sampler import Case, FindingLabel
from synthmed.vocabulary import get_vocabulary
from synthmed.writers.dicom import dicom_dataset
from synthmed.writers.sr import SR_SOP_CLASS_UID, SRReadError, finding_tracking_uid, read_sr_labels, sr_bytes

PROVENANCE = dict(dataset_name="pneumonia-demo", spec_hash="ab" * 32, backend="phantom", model_id="phantom-1",
                  model_hash="sha256:" + "0" * 64, prompt="PA chest radiograph, moderate right pleural effusion",
                  synthmed_version="0.1.0")
KW = {k: v for k, v in PROVENANCE.items() if k not in ("dataset_name", "prompt")}  # what the SR takes

needs_dciodvfy = pytest.mark.skipif(not dciodvfy_available(),
                                    reason="dciodvfy (Debian package dicom3tools) is not installed")


def make_case(case_id: str = "case-0000001", **changes) -> Case:
    fields = dict(case_id=case_id, index=1, split="train", seed=12345,
                  findings=(FindingLabel("pleural_effusion", "right", "moderate"),
                            FindingLabel("nodule", "right_upper_zone", "severe"),
                            FindingLabel("enlarged_cardiomediastinum", None, "mild")),
                  sex="F", age=58, view="PA")
    fields.update(changes)
    return Case(**fields)


def make_geometry(view: str = "PA"):
    from synthmed.backends import ImageGeometry

    sid, sod = {"PA": (1800.0, 1650.0), "AP": (1000.0, 850.0), "LL": (1800.0, 1610.0)}[view]
    return ImageGeometry(view, (1.40625, 1.40625), sid, sod, ("P", "F") if view == "LL" else ("L", "F"))


def image_of(case: Case, iod: str = "dx", bits: int = 12, geometry=None):
    pixels = np.zeros((16, 16), np.uint16 if bits == 12 else np.uint8)
    return dicom_dataset(pixels, case, iod=iod, bits_stored=bits, geometry=geometry, **PROVENANCE)


def write_sr(case: Case, iod: str = "dx", **image_kw) -> bytes:
    return sr_bytes(image_of(case, iod, **image_kw), case, **KW)


def vocabulary_cases() -> list[Case]:
    """Every finding, every location and every severity of the vocabulary, in three cases."""
    vocab = get_vocabulary()
    severities = list(vocab.severities)
    locations = list(vocab.locations)
    return [
        make_case(findings=tuple(FindingLabel(f, None, None) for f in vocab.findings)),
        make_case(findings=tuple(FindingLabel("pneumonia", loc, severities[i % len(severities)])
                                 for i, loc in enumerate(locations))),
        make_case(findings=tuple(FindingLabel("pleural_effusion", locations[i], s) for i, s in enumerate(severities))),
    ]


# ----------------------------------------------------------------------------- validators

@needs_dciodvfy
@pytest.mark.parametrize("iod", ("sc", "dx"))
@pytest.mark.parametrize("case", [make_case(), make_case(findings=(FindingLabel("no_finding"),), view="AP"),
                                  make_case(view=None, sex=None, age=None, split=None, seed=None)],
                         ids=["findings", "no-finding", "unknown-patient-and-view"])
def test_dciodvfy_reports_no_errors(tmp_path, iod, case):
    path = tmp_path / "sr.dcm"
    path.write_bytes(write_sr(case, iod))
    assert dciodvfy_errors(path) == []
    assert pydicom.dcmread(path).SOPClassUID == SR_SOP_CLASS_UID


# ----------------------------------------------------------------------------- read back

@pytest.mark.parametrize("case", vocabulary_cases(), ids=["findings", "locations", "severities"])
def test_every_vocabulary_label_reads_back_the_same(case):
    assert read_sr_labels(write_sr(case)) == case.findings


def test_read_from_a_path_and_an_open_file(tmp_path):
    data = write_sr(make_case())
    path = tmp_path / "sr.dcm"
    path.write_bytes(data)
    assert read_sr_labels(path) == read_sr_labels(str(path)) == read_sr_labels(io.BytesIO(data)) == make_case().findings


def test_it_is_a_tid_1500_report_with_coded_finding_site_and_severity():
    import highdicom as hd
    from pydicom.sr.codedict import codes

    case = make_case(findings=(FindingLabel("pneumonia", "right_lower_lobe", "severe"),
                               FindingLabel("pleural_effusion", "left", "mild")))
    sr = hd.sr.srread(io.BytesIO(write_sr(case)))
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    pneumonia, effusion = sr.content.get_image_measurement_groups()
    assert (pneumonia.finding_type.scheme_designator, pneumonia.finding_type.value) == ("SCT", "233604007")
    site = pneumonia.finding_sites[0]
    assert (site.value.value, site.laterality.value) == ("266005", "24028007")  # right lower lobe, right
    assert (effusion.finding_sites[0].value.value, effusion.finding_sites[0].laterality.value) == \
        ("816094009", "7771000")  # the chest, left
    severity = pneumonia.get_qualitative_evaluations(name=hd.sr.CodedConcept("246112005", "SCT", "Severity"))
    assert severity[0].value.value == "24484000"  # severe
    observer = sr.content.get_observer_contexts(observer_type=codes.DCM.Device)
    assert observer, "the labels are stated by a device observer"


def test_it_references_the_image_in_the_image_study():
    case = make_case()
    image = image_of(case)
    sr = pydicom.dcmread(io.BytesIO(sr_bytes(image, case, **KW)))
    assert sr.StudyInstanceUID == image.StudyInstanceUID and sr.PatientID == image.PatientID
    assert sr.SeriesInstanceUID != image.SeriesInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (evidence.ReferencedSOPClassUID, evidence.ReferencedSOPInstanceUID) == (image.SOPClassUID,
                                                                                   image.SOPInstanceUID)
    import highdicom as hd

    groups = hd.sr.srread(io.BytesIO(sr_bytes(image, case, **KW))).content.get_image_measurement_groups()
    assert [g.source_images[0].referenced_sop_instance_uid for g in groups] == [image.SOPInstanceUID] * len(groups)
    assert [g.tracking_uid for g in groups] == [finding_tracking_uid(KW["spec_hash"], case.case_id, n)
                                                for n in range(len(case.findings))]


def test_it_says_it_is_synthetic():
    sr = pydicom.dcmread(io.BytesIO(write_sr(make_case())))
    assert str(sr.PatientName).startswith("SYNTHETIC^") and sr.PatientIdentityRemoved == "YES"
    assert sr.SeriesDescription.startswith("SYNTHETIC")
    purposes = [item.PurposeOfReferenceCodeSequence[0].CodeValue for item in sr.ContributingEquipmentSequence]
    assert purposes[0] == "109100"  # Synthesizing Equipment
    assert sr.ContributingEquipmentSequence[0].ContributionDescription.startswith("SYNTHETIC labels")
    assert b"SYNTHETIC ground truth" in write_sr(make_case())


# ----------------------------------------------------------------------------- determinism

def test_same_inputs_give_identical_bytes_and_no_clock(monkeypatch):
    import highdicom.base
    import highdicom.sr.sop

    first = write_sr(make_case())

    class Later(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2031, 7, 9, 13, 14, 15, 161718)

    fake = type("fake_datetime_module", (), {"datetime": Later, "date": datetime.date, "time": datetime.time})
    monkeypatch.setattr(highdicom.base, "datetime", fake)
    monkeypatch.setattr(highdicom.sr.sop, "datetime", fake)
    assert write_sr(make_case()) == first
    assert datetime.date.today().strftime("%Y%m%d").encode() not in first


def test_uids_are_derived_and_differ_between_cases():
    uids = []
    for case_id in ("case-0000001", "case-0000002"):
        sr = pydicom.dcmread(io.BytesIO(write_sr(make_case(case_id))))
        uids.append({sr.SeriesInstanceUID, sr.SOPInstanceUID})
        assert sr.file_meta.ImplementationClassUID.startswith("2.25.")  # synthmed's, not pydicom's or highdicom's
    assert not uids[0] & uids[1]


# ----------------------------------------------------------------------------- errors

def test_a_case_without_findings_is_refused():
    with pytest.raises(ValueError, match="case.findings"):
        write_sr(make_case(findings=()))


def test_the_image_of_another_case_is_refused():
    with pytest.raises(ValueError, match="not the image of case-0000002"):
        sr_bytes(image_of(make_case("case-0000001")), make_case("case-0000002"), **KW)


def test_reading_an_image_as_an_sr_names_the_file(tmp_path):
    from synthmed.writers.dicom import part10_bytes

    path = tmp_path / "image.dcm"
    path.write_bytes(part10_bytes(image_of(make_case())))
    with pytest.raises(SRReadError, match="image.dcm"):
        read_sr_labels(path)


def test_a_code_outside_the_vocabulary_is_named():
    sr = pydicom.dcmread(io.BytesIO(write_sr(make_case(findings=(FindingLabel("cardiomegaly", None, "mild"),)))))
    for elem in sr.iterall():
        if elem.keyword == "CodeValue" and elem.value == "8186001":  # cardiomegaly
            elem.value = "999999"
    buffer = io.BytesIO()
    sr.save_as(buffer)
    with pytest.raises(SRReadError, match=r"measurement group 1: the finding code \(SCT, 999999"):
        read_sr_labels(buffer.getvalue())


@needs_dciodvfy
def test_dciodvfy_reports_no_errors_with_geometry(tmp_path):
    case = make_case(view="AP")
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_bytes(image_of(case, "dx", geometry=make_geometry("AP")), case, **KW))
    assert dciodvfy_errors(path) == []
