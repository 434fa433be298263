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
from synthmed.writers.dicom import dicom_dataset, image_uid_root
from synthmed.writers import sr as sr_module
from synthmed.writers.sr import SR_SOP_CLASS_UID, SRReadError, finding_tracking_uid, read_sr_labels, sr_bytes

PROVENANCE = dict(dataset_name="pneumonia-demo", spec_hash="ab" * 32, backend="phantom", model_id="phantom-1",
                  model_hash="sha256:" + "0" * 64, prompt="PA chest radiograph, moderate right pleural effusion",
                  synthmed_version="0.1.0")
KW = {k: v for k, v in PROVENANCE.items() if k not in ("dataset_name", "prompt")}  # what the SR takes

highdicom_sr = sr_module._sr_bytes_highdicom  # the reference: highdicom every time, no template

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
    assert [g.tracking_uid for g in groups] == [finding_tracking_uid(image_uid_root(image, KW["spec_hash"]), case.case_id, n)
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

    sr_module._TEMPLATES.clear()  # the first write goes through highdicom, under the real clock
    first = write_sr(make_case())

    class Later(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2031, 7, 9, 13, 14, 15, 161718)

    fake = type("fake_datetime_module", (), {"datetime": Later, "date": datetime.date, "time": datetime.time})
    monkeypatch.setattr(highdicom.base, "datetime", fake)
    monkeypatch.setattr(highdicom.sr.sop, "datetime", fake)
    assert write_sr(make_case()) == first
    case = make_case()
    assert highdicom_sr(image_of(case), case, **KW) == first  # highdicom itself, under the fake clock
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


# ----------------------------------------------------------------------------- templates (the fast path)

RUN_B = dict(spec_hash="cd" * 32, backend="drr", model_id="drr-physics-2", model_hash="sha256:" + "7" * 64,
             synthmed_version="0.2.0")


@pytest.fixture
def fresh_templates():
    sr_module._TEMPLATES.clear()
    yield
    sr_module._TEMPLATES.clear()


@pytest.fixture
def highdicom_calls(monkeypatch, fresh_templates):
    """The cases sr_bytes builds with highdicom (the others come from a template), by case id."""
    calls = []

    def spy(image, case, **kw):
        calls.append(case.case_id)
        return highdicom_sr(image, case, **kw)

    monkeypatch.setattr(sr_module, "_sr_bytes_highdicom", spy)
    return calls


SHAPES = {
    "no-finding": (FindingLabel("no_finding"),),
    "site-and-severity": (FindingLabel("pneumonia", "right_lower_lobe", "mild"),),
    "site-only": (FindingLabel("pneumothorax", "left", None),),
    "severity-only": (FindingLabel("cardiomegaly", None, "severe"),),
    "bare": (FindingLabel("edema"),),
    "local-code": (FindingLabel("support_devices", None, "moderate"),),  # 99SYNTHMED: a coding scheme item
    "three": make_case().findings,
}
CASE_IDS = ("case-0000001", "case-0000002", "case-0012345", "x", "c-17-characters-x", "case 7 b",
            "id-" + "9" * 61)


def varied_inputs(count: int = 64) -> list[tuple[Case, dict, dict, dict]]:
    """(case, image arguments, image provenance, SR provenance): every shape, both IODs, views with and without
    geometry, patients with and without sex and age, case ids of several lengths, two runs -- each template key
    several times with other per-case values, in a shuffled (fixed) order so the cache is exercised across
    shapes and runs."""
    import random

    rng = random.Random(20240611)
    runs = [(PROVENANCE, KW), (dict(PROVENANCE, dataset_name="drr-set", **RUN_B), RUN_B)]
    shapes = list(SHAPES.values())
    worlds = [(0, "dx", shape) for shape in shapes] + [(1, "dx", shapes[1]), (1, "dx", shapes[-1]),
                                                       (0, "sc", shapes[0]), (1, "sc", shapes[-1])]
    patients = [dict(sex="F", age=58), dict(sex="M", age=7), dict(sex=None, age=63), dict(sex="M", age=None),
                dict(sex=None, age=102), dict(sex="F", age=31)]
    views = [("PA", None), ("AP", "geometry"), ("LL", None), (None, None), ("LL", "geometry"), ("PA", "geometry")]
    inputs = []
    for n in range(count):
        run, iod, shape = worlds[n] if n < len(worlds) else worlds[rng.randrange(len(worlds))]
        (view, geometry), bits = views[rng.randrange(len(views))], rng.choice([8, 12])
        image_provenance, sr_provenance = runs[run]
        case = make_case(CASE_IDS[rng.randrange(len(CASE_IDS))], findings=shape, view=view,
                         split=rng.choice(["train", "val", None]), seed=rng.choice([1, 99, None]),
                         **patients[rng.randrange(len(patients))])
        image_kw = dict(iod=iod, bits=bits, geometry=make_geometry(view or "PA") if geometry else None)
        inputs.append((case, image_kw, dict(image_provenance, prompt=f"prompt {n}"), sr_provenance))
    rng.shuffle(inputs)
    return inputs


def image_with(case, image_kw, image_provenance):
    pixels = np.zeros((16, 16), np.uint16 if image_kw["bits"] == 12 else np.uint8)
    return dicom_dataset(pixels, case, iod=image_kw["iod"], bits_stored=image_kw["bits"],
                         geometry=image_kw["geometry"], **image_provenance)


def test_templates_give_highdicom_bytes_for_every_case(highdicom_calls):
    inputs = varied_inputs()
    keys, fallbacks = set(), 0
    for n, (case, image_kw, image_provenance, provenance) in enumerate(inputs):
        image = image_with(case, image_kw, image_provenance)
        fast = sr_bytes(image, case, **provenance)
        assert fast == highdicom_sr(image, case, **provenance), f"input {n}: {case} {image_kw} {provenance}"
        if sr_module._slot_values(image, case, provenance["spec_hash"]) is None:
            fallbacks += 1
        else:
            keys.add(sr_module._template_key(image, case, provenance))
    # highdicom made the first SR of each key and those a template cannot take; templates made the others
    assert len(highdicom_calls) == len(keys) + fallbacks and len(sr_module._TEMPLATES) == len(keys)
    assert len(inputs) - len(highdicom_calls) >= len(inputs) // 2, highdicom_calls


def test_a_cached_template_is_not_changed_by_later_cases(highdicom_calls):
    a = make_case("case-0000001", sex="F", age=58)
    b = make_case("case-0000222-longer-id", sex="M", age=None)
    image_a, image_b = image_of(a), image_of(b, "dx", geometry=None)
    first = sr_bytes(image_a, a, **KW)
    b_bytes = sr_bytes(image_b, b, **KW)
    c = make_case("case-0000333", sex="M", age=33)
    c_bytes = sr_bytes(image_of(c), c, **KW)
    assert sr_bytes(image_a, a, **KW) == first
    assert highdicom_calls == ["case-0000001", "case-0000222-longer-id"]  # b: no Patient's Age, another key
    assert c_bytes != first and b_bytes != first
    assert highdicom_sr(image_of(c), c, **KW) == c_bytes


def test_the_same_shape_in_another_run_is_another_template(highdicom_calls):
    case = make_case()
    image_a = image_of(case)
    image_b = dicom_dataset(np.zeros((16, 16), np.uint16), case, **dict(PROVENANCE, **RUN_B))
    a, b = sr_bytes(image_a, case, **KW), sr_bytes(image_b, case, **RUN_B)
    assert len(highdicom_calls) == 2 and a != b
    assert sr_bytes(image_a, case, **KW) == a and sr_bytes(image_b, case, **RUN_B) == b
    assert len(highdicom_calls) == 2


def test_values_a_template_cannot_carry_go_the_highdicom_way(highdicom_calls):
    # a non-ASCII case id: pydicom encodes it in the image's character set (UTF-8), so no template takes it
    for case_id in ("cäse-0000001", "cäse-0000002"):
        case = make_case(case_id)
        image = image_of(case)
        assert sr_bytes(image, case, **KW) == sr_bytes(image, case, **KW) == highdicom_sr(image, case, **KW)
    assert highdicom_calls == ["cäse-0000001", "cäse-0000001", "cäse-0000002", "cäse-0000002"]
    assert len(sr_module._TEMPLATES) == 0
    # an image attribute the template key cannot hold (a sequence highdicom copies) goes the same way
    case = make_case()
    image = image_of(case)
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "113100", "DCM", "Basic Application"
    image.DeidentificationMethodCodeSequence = [item]
    assert sr_bytes(image, case, **KW) == sr_bytes(image, case, **KW)
    assert highdicom_calls[-2:] == ["case-0000001", "case-0000001"]


def test_errors_are_the_same_with_a_template(highdicom_calls):
    sr_bytes(image_of(make_case("case-0000001")), make_case("case-0000001"), **KW)
    with pytest.raises(ValueError, match="not the image of case-0000002"):
        sr_bytes(image_of(make_case("case-0000001")), make_case("case-0000002"), **KW)
    with pytest.raises(ValueError, match="case.findings"):
        write_sr(make_case(findings=()))


def test_threads_share_the_templates(fresh_templates):
    from concurrent.futures import ThreadPoolExecutor

    inputs = varied_inputs()[:16]
    images = [image_with(case, image_kw, image_provenance) for case, image_kw, image_provenance, _ in inputs]
    expected = [highdicom_sr(image, case, **provenance)
                for image, (case, _, _, provenance) in zip(images, inputs)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda n: sr_bytes(images[n], inputs[n][0], **inputs[n][3]), list(range(16)) * 2))
    assert got == expected * 2


def test_the_template_cache_is_bounded():
    cache = sr_module._TemplateCache(2)
    for key in "abc":
        cache.put(key, key)
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") == "c"
    cache.get("b")
    cache.put("d", "d")
    assert cache.get("b") == "b" and cache.get("c") is None


@needs_dciodvfy
@pytest.mark.parametrize("iod", ("sc", "dx"))
def test_dciodvfy_reports_no_errors_for_an_sr_from_a_template(tmp_path, highdicom_calls, iod):
    for n, case in enumerate((make_case("case-0000001"), make_case("case-0000002-x", sex="M", view="AP"))):
        path = tmp_path / f"sr{n}.dcm"
        path.write_bytes(write_sr(case, iod))
        assert dciodvfy_errors(path) == []
    assert highdicom_calls == ["case-0000001"]  # the second one came from the template
