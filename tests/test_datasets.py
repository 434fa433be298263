"""synthmed.datasets: readers of real chest X-ray datasets, over tiny fake folders in each layout.

Each fixture writes the dataset's real file and column names and value conventions (CheXpert's 1.0/0.0/-1.0/blank,
MIMIC's split tables and report files, NIH's ``|`` labels and its four-way split box header) with a few
generated images; no real data.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from synthmed.cells import FindingLabel
from synthmed.datasets import (
    LATERAL, MISSING, NIH_LABELS, NO_FINDINGS, NO_REPORT, NOTE_LABELS_FOR_REPORT, NOTE_NO_FINDING, NOTE_UNCERTAIN,
    DatasetError, load_column_map, mimic_impression, prepare_image, read_dataset, read_image, training_pairs,
)
from synthmed.prompts import build_prompt
from synthmed.sampler import Case
from synthmed.spec import load_spec
from synthmed.vocabulary import CHEXPERT_COLUMNS, get_vocabulary
from synthmed.writers.manifest import MANIFEST_COLUMNS


def write_csv(path: Path, header: list[str], rows: list[dict], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = (lambda: gzip.open(path, "wt", newline="", encoding="utf-8")) if gz else \
        (lambda: open(path, "w", newline="", encoding="utf-8"))
    with opener() as fh:
        writer = csv.DictWriter(fh, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def jpeg(path: Path, value: int = 100, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path, "JPEG")
    return path


def chexpert_labels(**named: str) -> dict[str, str]:
    """The 14 label cells, blank unless named (CheXpert's values: 1.0, 0.0, -1.0 or blank)."""
    return {c: named.get(c.replace(" ", "_"), "") for c in CHEXPERT_COLUMNS}


# ----------------------------------------------------------------------------- CheXpert

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_COLUMNS]


@pytest.fixture
def chexpert(tmp_path: Path) -> Path:
    """CheXpert-v1.0-small/ with train.csv and valid.csv; paths start with the dataset folder's name."""
    root = tmp_path / "CheXpert-v1.0-small"
    p1 = "CheXpert-v1.0-small/train/patient00001/study1"
    jpeg(root / "train/patient00001/study1/view1_frontal.jpg")
    jpeg(root / "train/patient00001/study1/view2_lateral.jpg")
    jpeg(root / "train/patient00002/study1/view1_frontal.jpg")
    jpeg(root / "valid/patient64541/study1/view1_frontal.jpg")
    jpeg(tmp_path / "secret.jpg")  # outside the dataset: must never be read
    sick = chexpert_labels(Pneumonia="1.0", Pleural_Effusion="-1.0", Cardiomegaly="0.0")
    write_csv(root / "train.csv", CHEXPERT_HEADER, [
        {"Path": f"{p1}/view1_frontal.jpg", "Sex": "Female", "Age": "68", "Frontal/Lateral": "Frontal",
         "AP/PA": "PA", **sick},
        {"Path": f"{p1}/view2_lateral.jpg", "Sex": "Female", "Age": "68", "Frontal/Lateral": "Lateral",
         "AP/PA": "", **sick},
        {"Path": "train/patient00002/study1/view1_frontal.jpg", "Sex": "Male", "Age": "41",  # relative to the csv
         "Frontal/Lateral": "Frontal", "AP/PA": "AP", **chexpert_labels(No_Finding="1.0", Support_Devices="1.0")},
        {"Path": "../secret.jpg", "Sex": "Male", "Age": "50", "Frontal/Lateral": "Frontal", "AP/PA": "AP",
         **chexpert_labels(No_Finding="1.0")},
        {"Path": "CheXpert-v1.0-small/../../secret.jpg", "Sex": "Male", "Age": "50", "Frontal/Lateral": "Frontal",
         "AP/PA": "AP", **chexpert_labels(No_Finding="1.0")},
        {"Path": str(tmp_path / "secret.jpg"), "Sex": "Male", "Age": "50", "Frontal/Lateral": "Frontal",
         "AP/PA": "AP", **chexpert_labels(No_Finding="1.0")},
        {"Path": "..\\secret.jpg", "Sex": "Male", "Age": "50", "Frontal/Lateral": "Frontal",  # Windows separators
         "AP/PA": "AP", **chexpert_labels(No_Finding="1.0")},
        {"Path": "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg", "Sex": "Unknown", "Age": "0",
         "Frontal/Lateral": "Frontal", "AP/PA": "AP", **chexpert_labels(Edema="1.0")},
    ])
    write_csv(root / "valid.csv", CHEXPERT_HEADER, [
        {"Path": "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Sex": "Male", "Age": "73",
         "Frontal/Lateral": "Frontal", "AP/PA": "AP", **chexpert_labels(Edema="1.0", Atelectasis="0.0")},
    ])
    return root


def by_id(ds) -> dict:
    return {r.source_id: r for r in ds.records}


def test_chexpert_is_told_by_its_columns_and_reads_views_sex_age_and_paths(chexpert: Path):
    ds = read_dataset(chexpert / "train.csv")
    assert ds.kind == "chexpert" and ds.root == chexpert
    frontal, lateral = ds.records[0], ds.records[1]
    assert frontal.path == chexpert / "train/patient00001/study1/view1_frontal.jpg" and frontal.path.is_absolute()
    assert (frontal.view, frontal.sex, frontal.age, frontal.split) == ("PA", "F", 68, "train")
    assert lateral.view == "LL"  # CheXpert's Lateral, mapped to the left lateral
    assert ds.records[2].path == chexpert / "train/patient00002/study1/view1_frontal.jpg"  # Path relative to the csv
    assert ds.records[2].finding_ids == ("no_finding", "support_devices")
    assert all(r.path.is_relative_to(chexpert) for r in ds.records)


def test_chexpert_paths_that_escape_the_root_are_skipped_and_counted(chexpert: Path):
    ds = read_dataset(chexpert / "train.csv")
    assert ds.skipped == {"path escaping the root": 4, MISSING: 1}
    assert not any("secret" in str(r.path) for r in ds.records)
    assert len(ds.records) == 3


def test_uncertain_policies_give_different_findings(chexpert: Path):
    ignore = read_dataset(chexpert / "train.csv", uncertain="ignore").records[0]
    ones = read_dataset(chexpert / "train.csv", uncertain="positive").records[0]
    zeros = read_dataset(chexpert / "train.csv", uncertain="negative").records[0]
    # U-Ignore: neither present nor absent, listed as uncertain
    assert ignore.finding_ids == ("pneumonia",) and ignore.uncertain == ("pleural_effusion",)
    assert ignore.negative == ("cardiomegaly",)
    # U-Ones: present
    assert ones.finding_ids == ("pneumonia", "pleural_effusion") and ones.uncertain == ()
    # U-Zeros: absent
    assert zeros.finding_ids == ("pneumonia",) and set(zeros.negative) == {"cardiomegaly", "pleural_effusion"}
    assert all(f.location is None and f.severity is None for f in ones.findings)

    def effusion_column(policy):
        return read_dataset(chexpert / "train.csv", uncertain=policy).to_manifest_rows()[0]["Pleural Effusion"]

    assert [effusion_column(p) for p in ("ignore", "positive", "negative")] == ["", "1", "0"]


def test_frontal_only_drops_the_lateral(chexpert: Path):
    ds = read_dataset(chexpert / "train.csv", frontal_only=True)
    assert [r.view for r in ds.records] == ["PA", "AP"]
    assert ds.skipped["lateral view (frontal_only)"] == 1


def test_chexpert_folder_reads_train_and_valid_with_their_split(chexpert: Path):
    ds = read_dataset(chexpert)
    assert ds.kind == "chexpert" and len(ds.sources) == 2
    assert [r.split for r in ds.records] == ["train", "train", "train", "valid"]
    assert ds.records[-1].negative == ("atelectasis",)


def test_chexpert_finds_images_when_the_dataset_folder_was_renamed(chexpert: Path):
    renamed = chexpert.rename(chexpert.parent / "chexpert")
    ds = read_dataset(renamed / "train.csv")
    assert len(ds.records) == 3 and ds.records[0].path == renamed / "train/patient00001/study1/view1_frontal.jpg"


def test_a_bad_label_value_names_the_file_line_and_column(tmp_path: Path):
    jpeg(tmp_path / "a.jpg")
    write_csv(tmp_path / "train.csv", CHEXPERT_HEADER, [
        {"Path": "a.jpg", "Frontal/Lateral": "Frontal", "AP/PA": "PA", **chexpert_labels(Edema="2.0")}])
    with pytest.raises(DatasetError, match=r"train\.csv:2: column 'Edema' holds '2\.0'"):
        read_dataset(tmp_path / "train.csv")


def test_manifest_rows_use_the_manifest_columns(chexpert: Path):
    ds = read_dataset(chexpert / "train.csv")
    rows = ds.to_manifest_rows()
    assert all(set(r) <= set(MANIFEST_COLUMNS) for r in rows)
    first = rows[0]
    assert first["file_name"] == "train/patient00001/study1/view1_frontal.jpg"
    assert (ds.root / first["file_name"]).is_file()
    assert first["findings"] == "pneumonia::"
    assert first["finding_codes"] == str(get_vocabulary().findings["pneumonia"].code)
    assert (first["Pneumonia"], first["Cardiomegaly"], first["Edema"]) == ("1", "0", "")
    assert (first["sex"], first["age"], first["view"], first["split"]) == ("F", "68", "PA", "train")
    assert rows[1]["view"] == "LL" and rows[1]["case_id"].endswith("view2_lateral.jpg")
    assert rows[2]["findings"] == "no_finding::|support_devices::"


# ----------------------------------------------------------------------------- MIMIC-CXR-JPG

REPORT = """\
                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:

 There is a small left pleural effusion.  No pneumothorax.

 IMPRESSION:

 Small left pleural effusion.
 No pneumothorax.

 RECOMMENDATION(S):  Follow-up radiograph.
"""


@pytest.fixture
def mimic(tmp_path: Path) -> Path:
    root = tmp_path / "mimic-cxr-jpg" / "2.0.0"
    s1 = root / "files/p10/p10000032/s50414267"
    s2 = root / "files/p11/p11000011/s51111111"
    ids = ["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962",
           "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714"]
    jpeg(s1 / f"{ids[0]}.jpg")
    jpeg(s1 / f"{ids[1]}.jpg")
    jpeg(s2 / f"{ids[2]}.jpg")
    (root / "files/p10/p10000032/s50414267.txt").write_text(REPORT, encoding="utf-8")  # s2 has no report file
    labels = ["subject_id", "study_id", *CHEXPERT_COLUMNS]
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", labels, [
        {"subject_id": "10000032", "study_id": "50414267", **chexpert_labels(Pleural_Effusion="1.0",
                                                                            Pneumothorax="0.0", Edema="-1.0")},
        {"subject_id": "11000011", "study_id": "51111111", **chexpert_labels(No_Finding="1.0")},
    ], gz=True)
    meta = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
            "Columns", "StudyDate", "StudyTime"]
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv", meta, [
        {"dicom_id": ids[0], "subject_id": "10000032", "study_id": "50414267", "ViewPosition": "PA",
         "StudyDate": "21800506"},
        {"dicom_id": ids[1], "subject_id": "10000032", "study_id": "50414267", "ViewPosition": "LATERAL",
         "StudyDate": "21800506"},
        {"dicom_id": ids[2], "subject_id": "11000011", "study_id": "51111111", "ViewPosition": "AP AXIAL"},
        {"dicom_id": ids[3], "subject_id": "12000000", "study_id": "52000000", "ViewPosition": "AP"},  # no labels
    ])
    write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
              [{"dicom_id": i, "split": "train"} for i in ids[:2]] + [{"dicom_id": ids[2], "split": "test"}])
    write_csv(root / "patients.csv", ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
              [{"subject_id": "10000032", "gender": "F", "anchor_age": "52", "anchor_year": "2180"}])
    return root


def test_mimic_joins_labels_and_images_and_reads_the_impression(mimic: Path):
    ds = read_dataset(mimic)
    assert ds.kind == "mimic"
    pa, lateral, axial = ds.records
    assert pa.path == mimic / "files/p10/p10000032/s50414267" / f"{pa.source_id}.jpg"
    assert pa.finding_ids == ("pleural_effusion",) and pa.uncertain == ("edema",) and pa.negative == ("pneumothorax",)
    assert pa.impression == "Small left pleural effusion. No pneumothorax."
    assert lateral.impression == pa.impression and lateral.view == "LL"
    assert axial.impression is None  # its study's report file is not there
    assert axial.view is None and ds.unknown_values == {"view: AP AXIAL": 1}
    assert ds.skipped == {"no label row for its study": 1}
    assert (pa.sex, pa.age, pa.split, axial.sex, axial.split) == ("F", 52, "train", None, "test")


def test_mimic_frontal_only_drops_lateral_and_unknown_views(mimic: Path):
    ds = read_dataset(mimic / "mimic-cxr-2.0.0-chexpert.csv.gz", frontal_only=True)
    assert [r.view for r in ds.records] == ["PA"]
    assert ds.skipped["lateral view (frontal_only)"] == 1 and ds.skipped["unknown view (frontal_only)"] == 1


def test_mimic_impression_stops_at_the_next_section_and_is_none_without_one():
    assert mimic_impression(REPORT) == "Small left pleural effusion. No pneumothorax."
    assert mimic_impression("FINDINGS: Clear lungs.\n") is None
    assert mimic_impression("IMPRESSION:\n\n") is None


# ----------------------------------------------------------------------------- NIH ChestX-ray14

NIH_HEADER = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
              "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", ""]


@pytest.fixture
def nih(tmp_path: Path) -> Path:
    root = tmp_path / "nih"
    for name in ("00000001_000.png", "00000001_001.png"):
        (root / "images_001/images").mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 50).save(root / "images_001/images" / name)
    (root / "images").mkdir()
    Image.new("L", (8, 8), 50).save(root / "images/00000003_000.png")
    write_csv(root / "Data_Entry_2017.csv", NIH_HEADER, [
        {"Image Index": "00000001_000.png", "Finding Labels": "Cardiomegaly|Emphysema", "Patient Age": "58",
         "Patient Gender": "M", "View Position": "PA"},
        {"Image Index": "00000001_001.png", "Finding Labels": "Effusion|Hernia|Infiltration", "Patient Age": "058Y",
         "Patient Gender": "M", "View Position": "AP"},
        {"Image Index": "00000003_000.png", "Finding Labels": "No Finding", "Patient Age": "414",
         "Patient Gender": "F", "View Position": "PA"},
        {"Image Index": "00000004_000.png", "Finding Labels": "Mass", "Patient Age": "30",
         "Patient Gender": "F", "View Position": "PA"},
    ])
    # the real header: the box column's name "Bbox [x,y,w,h]" is split by the CSV's commas
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_001.png,Infiltrate,100.5,200,50,40,,,\n"
        "00000001_001.png,Effusion,10,20,30,40,,,\n"
        "00000001_001.png,Effusion,500,20,30,40,,,\n", encoding="utf-8")
    (root / "test_list.txt").write_text("00000003_000.png\n", encoding="utf-8")
    return root


def test_nih_labels_map_and_hernia_is_reported_unmapped(nih: Path):
    ds = read_dataset(nih)
    assert ds.kind == "nih"
    first, second, third = ds.records
    assert first.finding_ids == ("cardiomegaly",) and first.unmapped == ("Emphysema",)
    assert second.finding_ids == ("pleural_effusion", "lung_opacity") and second.unmapped == ("Hernia",)
    assert third.finding_ids == ("no_finding",)
    assert ds.unmapped == {"Emphysema": 1, "Hernia": 1}
    assert ds.skipped == {MISSING: 1}
    # NIH lists every label it found: a mapped finding it does not list is absent
    assert "pneumothorax" in first.negative and "no_finding" in first.negative
    row = ds.to_manifest_rows()[0]
    assert (row["Cardiomegaly"], row["Pneumothorax"], row["No Finding"], row["Fracture"]) == ("1", "0", "0", "")


def test_nih_images_ages_splits_and_boxes(nih: Path):
    first, second, third = read_dataset(nih / "Data_Entry_2017.csv").records
    assert first.path == nih / "images_001/images/00000001_000.png"
    assert third.path == nih / "images/00000003_000.png"
    assert (first.age, second.age, third.age) == (58, 58, None)  # 414 is no age
    assert (first.sex, third.sex, second.view) == ("M", "F", "AP")
    assert (third.split, first.split) == ("test", None)
    assert second.boxes == {"lung_opacity": [[100.5, 200.0, 150.5, 240.0]],
                            "pleural_effusion": [[10.0, 20.0, 40.0, 60.0], [500.0, 20.0, 530.0, 60.0]]}
    assert first.boxes == {}


def test_nih_table_names_vocabulary_findings():
    vocab = get_vocabulary()
    for label, finding in NIH_LABELS.items():
        if finding is None:  # documented as unmapped: the vocabulary must indeed lack it
            assert vocab.resolve("finding", label) is None, label
        else:
            assert finding in vocab.findings, label


# ----------------------------------------------------------------------------- plain CSV with a column map

@pytest.fixture
def plain(tmp_path: Path) -> Path:
    jpeg(tmp_path / "imgs/a.jpg")
    jpeg(tmp_path / "imgs/b.jpg")
    jpeg(tmp_path / "imgs/c.jpg")
    write_csv(tmp_path / "data.csv", ["file", "gender", "years", "projection", "labels", "effusion", "text", "uid"], [
        {"file": "imgs/a.jpg", "gender": "Female", "years": "70", "projection": "frontal",
         "labels": "Pneumonia;Bronchiectasis;pneumothorax:right:mild", "effusion": "-1", "text": "Right pneumonia.",
         "uid": "A1"},
        {"file": "imgs/b.jpg", "gender": "Male", "years": "", "projection": "side", "labels": "", "effusion": "1",
         "uid": "B2"},
        {"file": "../imgs/c.jpg", "gender": "Male", "years": "40", "projection": "frontal", "labels": "",
         "effusion": "0", "uid": "C3"},
    ])
    return tmp_path


MAP = """\
path: file
id: uid
sex: gender
age: years
view: projection
report: text
findings: {column: labels, separator: ";"}
labels: {effusion: pleural_effusion}
values:
  sex: {Female: F, Male: M}
  view: {frontal: PA, side: LL}
"""


def test_plain_csv_reads_through_its_column_map(plain: Path):
    (plain / "map.yaml").write_text(MAP, encoding="utf-8")
    ds = read_dataset(plain / "data.csv", column_map=plain / "map.yaml")
    assert ds.kind == "csv"
    a, b = ds.records
    assert (a.source_id, a.sex, a.age, a.view, a.impression) == ("A1", "F", 70, "PA", "Right pneumonia.")
    assert a.findings == (FindingLabel("pneumonia"), FindingLabel("pneumothorax", "right", "mild"))
    assert a.unmapped == ("Bronchiectasis",) and a.uncertain == ("pleural_effusion",)
    assert (b.view, b.age, b.finding_ids) == ("LL", None, ("pleural_effusion",))
    assert ds.skipped == {"path escaping the root": 1}
    assert ds.to_manifest_rows()[0]["findings"] == "pneumonia::|pneumothorax:right:mild"


def test_column_map_errors_name_the_bad_key_with_its_line():
    bad = "path: file\nfindings: {column: labels}\nsexx: gender\nlabels: {effusion: plural_effusion}\n"
    with pytest.raises(DatasetError) as err:
        load_column_map(bad)
    message = str(err.value)
    assert "<text>:3:1: unknown key 'sexx'" in message
    assert "<text>:4:10: labels.effusion: 'plural_effusion' is not a finding" in message
    assert "pleural_effusion" in message  # the suggestion
    with pytest.raises(DatasetError, match=r"values\.view\.side: 'lateral' is not one of PA, AP, LL"):
        load_column_map("path: file\nfindings: labels\nvalues: {view: {side: lateral}}\n")
    with pytest.raises(DatasetError, match="key 'path'"):
        load_column_map("findings: labels\n")


def test_column_map_naming_a_column_the_csv_lacks_is_refused(plain: Path):
    (plain / "map.yaml").write_text("path: file\nsex: sex\nfindings: {column: labels, separator: ';'}\n",
                                    encoding="utf-8")
    with pytest.raises(DatasetError, match=r"map\.yaml:2:1: sex: column 'sex' is not in .*data\.csv"):
        read_dataset(plain / "data.csv", column_map=plain / "map.yaml")


# ----------------------------------------------------------------------------- the entry point

def test_an_unknown_layout_says_which_layouts_are_known(tmp_path: Path):
    write_csv(tmp_path / "x.csv", ["a", "b"], [{"a": "1", "b": "2"}])
    with pytest.raises(DatasetError, match=r"cannot tell the layout .*chexpert.*mimic.*nih.*column_map"):
        read_dataset(tmp_path / "x.csv")
    with pytest.raises(DatasetError, match="none of its files"):
        read_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"uncertain='maybe'.*ignore, positive, negative"):
        read_dataset(tmp_path / "x.csv", uncertain="maybe")


# ----------------------------------------------------------------------------- images

def write_dicom(path: Path, pixels: np.ndarray, photometric: str, **tags) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_monochrome1_reads_bright_where_monochrome2_of_the_same_pixels_reads_dark(tmp_path: Path):
    pixels = np.full((4, 5), 500, dtype=np.uint16)
    pixels[0, 0] = 3500
    window = {"WindowCenter": 2048, "WindowWidth": 4096}
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2", **window))
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1", **window))
    assert mono2.dtype == np.float32 and mono2.shape == (4, 5)
    assert mono2[1, 1] < 0.2 and mono1[1, 1] > 0.8
    assert np.allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_dicom_window_and_rescale_are_applied_as_a_viewer_would(tmp_path: Path):
    pixels = np.array([[400, 450, 500, 550, 600]], dtype=np.uint16)
    # stored * 2 - 1000 = -200, -100, 0, 100, 200; a window of centre 0, width 201 spans [-100, 100]
    image = read_image(write_dicom(tmp_path / "w.dcm", pixels, "MONOCHROME2", RescaleSlope=2, RescaleIntercept=-1000,
                                   WindowCenter=0, WindowWidth=201))
    assert image[0, 0] == 0.0 and image[0, -1] == 1.0
    assert abs(image[0, 2] - 0.5) < 0.01 and image[0, 1] < 0.01 and image[0, 3] > 0.99
    unwindowed = read_image(write_dicom(tmp_path / "n.dcm", pixels, "MONOCHROME2"))
    assert np.allclose(unwindowed, pixels / 4095, atol=1e-6)  # no VOI: the stored bits' range


def test_dicom_voi_lut_sequence_is_applied(tmp_path: Path):
    lut = pydicom.Dataset()
    lut.add_new(0x00283002, "US", [4096, 0, 16])  # LUT Descriptor: entries, first value mapped, bits
    lut.add_new(0x00283006, "US", [65535 - 16 * v for v in range(4096)])  # LUT Data: an inverting ramp
    pixels = np.array([[0, 4095]], dtype=np.uint16)
    image = read_image(write_dicom(tmp_path / "lut.dcm", pixels, "MONOCHROME2",
                                   VOILUTSequence=pydicom.Sequence([lut])))
    assert image[0, 0] == 1.0 and image[0, 1] < 0.01


def test_16_bit_png_rgb_jpeg_and_8_bit_png_read_in_0_1(tmp_path: Path):
    deep = np.array([[0, 1000, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image.dtype == np.float32 and np.allclose(image, deep / 65535, atol=1e-7)  # all 16 bits kept
    Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "red.jpg", quality=95)
    assert abs(float(read_image(tmp_path / "red.jpg").mean()) - 0.299) < 0.03  # BT.601 luma of pure red
    Image.new("L", (3, 3), 51).save(tmp_path / "grey.png")
    assert np.allclose(read_image(tmp_path / "grey.png"), 0.2)


def test_a_file_that_is_not_an_image_is_refused_by_name(tmp_path: Path):
    (tmp_path / "notes.png").write_text("not an image", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"notes\.png is not an image"):
        read_image(tmp_path / "notes.png")
    (tmp_path / "fake.dcm").write_bytes(b"\x00" * 50)
    with pytest.raises(DatasetError, match=r"fake\.dcm"):
        read_image(tmp_path / "fake.dcm")
    with pytest.raises(DatasetError, match=r"no image file .*absent\.jpg"):
        read_image(tmp_path / "absent.jpg")


def test_an_image_beyond_pillows_safety_limit_is_refused_by_name(tmp_path: Path):
    """A 20000 x 20000 1-bit PNG (a few kB on disk) trips Pillow's decompression-bomb check: a DatasetError."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(bytes(2501)) for _ in range(20000)) + packer.flush()
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    for name in ("huge.png", "huge.dcm"):  # a .dcm name is tried by Pillow first too
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DatasetError, match=rf"{name}.*larger than Pillow's safety limit"):
            read_image(tmp_path / name)


# ----------------------------------------------------------------------------- training pairs

def test_label_prompts_are_synthmeds_own_template_filled_from_the_record(chexpert: Path):
    pairs = training_pairs(read_dataset(chexpert))
    first, lateral, normal, valid = pairs
    assert first.prompt == "PA chest radiograph of a 68 year old female. Pneumonia."
    # the same text a spec's case with these labels gets
    case = Case("x", 0, "train", 1, (FindingLabel("pneumonia"),), "F", 68, "PA")
    assert first.prompt == build_prompt(case, load_spec("spec_version: 1\nname: x\ncount: 1\nfindings:\n"
                                                        "  - {finding: pneumonia, weight: 1}\n").prompt).text
    assert (first.path, first.case_id, first.split, first.source) == (
        chexpert / "train/patient00001/study1/view1_frontal.jpg",
        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "train", "labels")
    assert lateral.prompt.startswith("LL chest radiograph")
    # CheXpert's No Finding with Support Devices is synthmed's support devices alone: no note
    assert normal.prompt == "AP chest radiograph of a 41 year old male. Support devices."
    assert (valid.split, valid.prompt) == ("valid", "AP chest radiograph of a 73 year old male. Pulmonary edema.")
    # the uncertain pleural effusion (policy ignore) is not in the prompt, and that is said
    assert pairs.notes == {NOTE_UNCERTAIN: 2} and pairs.skipped == {} and pairs.template_id == "synthmed-v1"
    assert "4 training pairs" in pairs.summary()


def test_label_prompts_take_any_template_and_refuse_a_bad_one(chexpert: Path):
    ds = read_dataset(chexpert)
    assert training_pairs(ds, template="roentgen-v1")[0].prompt == "Pneumonia"
    custom = training_pairs(ds, template="{findings} on a {view_long} film")
    assert custom[1].prompt == "Pneumonia on a left lateral film" and custom.template_id.startswith("custom-")
    with pytest.raises(DatasetError, match=r"unknown placeholder '\{gender\}'.*synthmed-v1"):
        training_pairs(ds, template="{findings}, {gender}")
    with pytest.raises(DatasetError, match="must contain {findings}"):
        training_pairs(ds, template="synthmed-v2")
    with pytest.raises(DatasetError, match=r"prompts='impressions': use one of labels, reports"):
        training_pairs(ds, prompts="impressions")


def test_split_and_frontal_only_filters_are_counted(chexpert: Path):
    ds = read_dataset(chexpert)
    valid = training_pairs(ds, split="valid")
    assert [p.split for p in valid] == ["valid"] and valid.skipped == {"split train (not valid)": 3}
    # frontal_only at reading or here: the same pairs, the lateral counted either way
    frontal = training_pairs(ds, frontal_only=True)
    assert frontal.skipped == {LATERAL: 1}
    read_frontal = read_dataset(chexpert, frontal_only=True)
    assert training_pairs(read_frontal).pairs == frontal.pairs and read_frontal.skipped[LATERAL] == 1
    assert all("lateral" not in str(p.path) for p in frontal)


def test_records_with_nothing_to_prompt_or_contradicting_labels_are_reported(tmp_path: Path):
    for name in "abcd":
        jpeg(tmp_path / f"{name}.jpg")
    row = {"Sex": "Male", "Age": "60", "Frontal/Lateral": "Frontal", "AP/PA": "PA"}
    write_csv(tmp_path / "train.csv", CHEXPERT_HEADER, [
        {"Path": "a.jpg", **row, **chexpert_labels(No_Finding="1.0", Pneumonia="1.0")},  # the labeler contradicts
        {"Path": "b.jpg", **row, **chexpert_labels(Edema="-1.0")},  # uncertain only
        {"Path": "c.jpg", **row, **chexpert_labels()},  # all blank
        {"Path": "d.jpg", **row, "Age": "", **chexpert_labels(Edema="1.0")},  # no age, which synthmed-v1 names
    ])
    ds = read_dataset(tmp_path)
    pairs = training_pairs(ds)
    assert [p.prompt for p in pairs] == ["PA chest radiograph of a 60 year old male. Pneumonia."]
    assert pairs.notes == {NOTE_NO_FINDING: 1}
    assert pairs.skipped == {NO_FINDINGS: 2, "no age (template synthmed-v1 needs it)": 1}
    assert len(training_pairs(ds, template="roentgen-v1")) == 2  # a findings-only template needs no age
    assert [p.prompt for p in training_pairs(read_dataset(tmp_path, uncertain="positive"), template="roentgen-v1")
            ] == ["Pneumonia", "Pulmonary edema", "Pulmonary edema"]


def test_nih_unmapped_labels_are_noted_where_the_prompt_leaves_them_out(nih: Path):
    pairs = training_pairs(read_dataset(nih), template="roentgen-v1")
    assert [p.prompt for p in pairs] == ["Cardiomegaly", "Pleural effusion and lung opacity",
                                         "No acute cardiopulmonary abnormality"]
    assert pairs.notes == {"unmapped label left out of the prompt: Emphysema": 1,
                           "unmapped label left out of the prompt: Hernia": 1}
    assert [p.split for p in pairs] == ["train", "train", "test"]  # NIH's test list; no list: train


def test_report_prompts_are_the_impression_and_records_without_one_are_skipped_or_use_labels(mimic: Path):
    ds = read_dataset(mimic)
    reports = training_pairs(ds, prompts="reports")
    assert [p.prompt for p in reports] == ["Small left pleural effusion. No pneumothorax."] * 2
    assert [p.source for p in reports] == ["report", "report"] and reports.skipped == {NO_REPORT: 1}
    # the AP AXIAL image has no report; its labels need no view, sex or age under a findings-only template
    fallback = training_pairs(ds, prompts="reports", no_report="labels", template="roentgen-v1")
    assert [(p.source, p.prompt) for p in fallback][2] == ("labels", "No acute cardiopulmonary abnormality")
    assert fallback.notes == {NOTE_LABELS_FOR_REPORT: 1} and fallback.skipped == {}
    # under synthmed-v1 it lacks all three: left out, and said why
    strict = training_pairs(ds, prompts="reports", no_report="labels")
    assert len(strict) == 2 and strict.skipped == {"no age or sex or view (template synthmed-v1 needs it)": 1}
    labels = training_pairs(ds)
    assert labels[0].prompt == "PA chest radiograph of a 52 year old female. Pleural effusion."
    assert training_pairs(ds, prompts="reports", split="test").skipped == {"split train (not test)": 2, NO_REPORT: 1}
    with pytest.raises(DatasetError, match="no_report='fallback'"):
        training_pairs(ds, prompts="reports", no_report="fallback")


# ----------------------------------------------------------------------------- image preparation

def lanczos(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """The reference: Pillow's Lanczos resize of the float image."""
    return np.asarray(Image.fromarray(pixels.astype(np.float32)).resize((width, height), Image.Resampling.LANCZOS))


def smooth(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth image in (0.1, 0.9) with structure everywhere (so every crop differs)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    phase = np.random.default_rng(seed).uniform(0, 6, 4)
    return 0.5 + 0.2 * np.sin(7 * x + phase[0]) * np.cos(5 * y + phase[1]) + 0.15 * np.sin(11 * (x + y) + phase[2])


def test_a_portrait_16_bit_png_is_resized_from_its_16_bits_and_centre_cropped(tmp_path: Path):
    deep = (smooth(90, 60) * 65535).astype(np.uint16)  # H 90, W 60
    Image.fromarray(deep).save(tmp_path / "deep.png")
    out = prepare_image(tmp_path / "deep.png", 32)
    assert out.dtype == np.float32 and out.shape == (32, 32)
    # shorter side (60) to 32, aspect kept: 48 rows, of which the middle 32
    reference = lanczos(deep / 65535, 32, 48)
    assert np.allclose(out, np.clip(reference[8:40], 0, 1), atol=1e-6)
    # the low bits count: a ramp within one 8-bit step keeps its levels
    ramp = np.tile(np.arange(0, 256, 2, dtype=np.uint16) + 1000, (64, 1))  # 64 x 128, 1000..1254 of 65535
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    fine = prepare_image(tmp_path / "ramp.png", 16)
    assert 0 < fine.max() - fine.min() < 1 / 255 and len(np.unique(fine.round(7))) > 8


def test_a_landscape_jpeg_crops_across_its_width_and_a_small_image_is_enlarged(tmp_path: Path):
    picture = (smooth(50, 80, seed=1) * 255).astype(np.uint8)  # H 50, W 80
    Image.fromarray(picture).save(tmp_path / "wide.jpg", quality=95)
    pixels = read_image(tmp_path / "wide.jpg")
    out = prepare_image(tmp_path / "wide.jpg", 40)
    reference = np.clip(lanczos(pixels, 64, 40), 0, 1)  # 80 x 50 -> 64 x 40
    assert out.shape == (40, 40) and np.allclose(out, reference[:, 12:52], atol=1e-6)
    small = prepare_image(pixels[:10, :20], 64)  # an array works too; 20 x 10 -> 128 x 64, then the middle
    assert small.shape == (64, 64) and np.allclose(small, np.clip(lanczos(pixels[:10, :20], 128, 64), 0, 1)[:, 32:96],
                                                   atol=1e-6)


def test_random_crops_come_from_the_generator_and_lie_in_the_resized_image(tmp_path: Path):
    pixels = smooth(48, 120, seed=2).astype(np.float32)
    reference = np.clip(lanczos(pixels, 80, 32), 0, 1)  # 120 x 48 -> 80 x 32: offsets 0..48 across
    centre = prepare_image(pixels, 32)
    crops = [prepare_image(pixels, 32, crop="random", rng=np.random.default_rng(seed)) for seed in range(6)]
    again = prepare_image(pixels, 32, crop="random", rng=np.random.default_rng(3))
    assert np.array_equal(crops[3], again)  # the same seed, the same crop
    assert len({c.tobytes() for c in crops}) > 1 and any(not np.allclose(c, centre) for c in crops)
    for crop in crops:  # each is a window of the resized image, at a whole-pixel offset
        assert any(np.allclose(crop, reference[:, x:x + 32], atol=1e-6) for x in range(49))
    assert np.allclose(centre, reference[:, 24:56], atol=1e-6)
    square = smooth(40, 40).astype(np.float32)  # nothing to draw: the whole image
    assert np.array_equal(prepare_image(square, 40, crop="random", rng=np.random.default_rng(0)),
                          prepare_image(square, 40))


def test_a_monochrome1_dicom_is_prepared_as_a_viewer_shows_it(tmp_path: Path):
    pixels = (smooth(30, 45) * 4095).astype(np.uint16)  # 12 bits stored, landscape
    window = {"WindowCenter": 2048, "WindowWidth": 4096}
    mono1 = prepare_image(write_dicom(tmp_path / "m1.dcm", pixels, "MONOCHROME1", **window), 20)
    mono2 = prepare_image(write_dicom(tmp_path / "m2.dcm", pixels, "MONOCHROME2", **window), 20)
    assert mono1.shape == (20, 20) and np.allclose(mono1, 1.0 - mono2, atol=1e-5)
    assert np.corrcoef(mono1.ravel(), prepare_image(pixels / 4095.0, 20).ravel())[0, 1] < -0.99  # inverted


def test_prepare_image_refuses_bad_arguments_by_name(tmp_path: Path):
    image = np.zeros((8, 12), np.float32)
    with pytest.raises(DatasetError, match=r"crop='random' draws its offset from rng="):
        prepare_image(image, 8, crop="random")
    with pytest.raises(DatasetError, match=r"crop='top': use one of center, random"):
        prepare_image(image, 8, crop="top")
    with pytest.raises(DatasetError, match=r"size=0"):
        prepare_image(image, 0)
    with pytest.raises(DatasetError, match=r"shape \(2, 8, 12\)"):
        prepare_image(np.zeros((2, 8, 12)), 8)
    with pytest.raises(DatasetError, match=r"no image file .*absent\.png"):
        prepare_image(tmp_path / "absent.png", 8)


def test_prepare_image_reads_uint8_by_its_range_and_refuses_arrays_that_do_not_say_theirs():
    ramp = np.tile(np.arange(0, 256, 5, dtype=np.uint8), (40, 1))  # 40 x 52, as np.asarray(Image.open(f)) gives
    out = prepare_image(ramp, np.int64(20))  # a numpy integer is a size too
    assert out.shape == (20, 20) and np.allclose(out, prepare_image(ramp / 255, 20), atol=1e-6) and out.max() < 1
    for bad, words in ((ramp.astype(np.uint16) * 16, r"an array of uint16 \(values 0 to 4080\) does not say its"),
                       (ramp.astype(np.int32), r"an array of int32"), (ramp > 100, r"an array of bool"),
                       (np.full((8, 8), np.nan, np.float32), r"NaN or infinity \(64 values\)"),
                       (np.where(ramp > 100, np.inf, 0.5), r"NaN or infinity"),
                       (ramp.astype(np.float32), r"values from 0 to 255; give floats in \[0, 1\]"),
                       (ramp.astype(str), r"not one of dtype <U3")):
        with pytest.raises(DatasetError, match=rf"image: .*{words}"):
            prepare_image(bad, 8)


@pytest.mark.parametrize("header_only", [False, True])
def test_a_csv_that_is_not_utf8_names_the_line_and_says_save_it_as_utf8(tmp_path: Path, header_only: bool):
    """A spreadsheet's Latin-1 export: the line of the first byte that is not UTF-8, and what to do (the decoder's
    own position is within a block of text, not the file)."""
    jpeg(tmp_path / "a.jpg")
    rows = "".join(f"a.jpg,Frontal,PA{',' * 14}\n" for _ in range(3))
    header = "Path,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_COLUMNS)
    if header_only:
        header = header.replace("Path", "P\xe4th")
    text = header + "\n" + rows + ("" if header_only else "a.jpg,Frontal,PA,Dr. M\xfcller" + "," * 13 + "\n")
    (tmp_path / "train.csv").write_bytes(text.encode("latin-1"))
    line = 1 if header_only else 5
    with pytest.raises(DatasetError, match=rf"train\.csv, line {line}: byte 0x(e4|fc) is not UTF-8 .* save the file "
                                           "as UTF-8"):
        read_dataset(tmp_path / "train.csv")


def test_an_uncompressed_dicom_cut_short_is_not_blamed_on_a_missing_decoder(tmp_path: Path):
    path = write_dicom(tmp_path / "full.dcm", np.zeros((64, 64), np.uint16), "MONOCHROME2")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-4000])
    with pytest.raises(DatasetError) as err:
        read_image(cut)
    assert "cut short or damaged" in str(err.value) and "needs a decoder" not in str(err.value)
