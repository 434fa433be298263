"""synthmed.data: ManifestDataset and manifest_records over small output folders of the pattern backend.

The folders are 64 wide x 80 high (not square, so that [1, H, W] and MONAI's [W, H] are told
apart), with every case's finding, location and severity fixed by the spec so that each split
holds a pneumothorax, an effusion with cardiomegaly, and a normal film.
"""

from __future__ import annotations

import csv
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from synthmed.build import generate  # noqa: E402
from synthmed.data import manifest_records, read_image  # noqa: E402
from synthmed.spec import load_spec  # noqa: E402
from synthmed.vocabulary import CHEXPERT_COLUMNS  # noqa: E402

WIDTH, HEIGHT = 64, 80
SPEC = """\
spec_version: 1
name: data-loader-test
seed: 11
count: 9
splits: {{train: 0.34, val: 0.33, test: 0.33}}
image: {{size: [{w}, {h}], formats: {formats}, bit_depth: {bits}, png_bit_depth: {png_bits}}}
findings:
  - {{finding: no_finding, weight: 1}}
  - {{finding: pneumothorax, weight: 1, location: {{left: 1}}, severity: {{moderate: 1}}}}
  - {{finding: [pleural_effusion, cardiomegaly], weight: 1, location: {{right: 1}}, severity: {{severe: 1}}}}
"""


def build(out: Path, formats: str = "[dicom, png]", bits: int = 16, png_bits: int = 8) -> Path:
    spec = load_spec(SPEC.format(w=WIDTH, h=HEIGHT, formats=formats, bits=bits, png_bits=png_bits))
    generate(spec, out, backend="pattern", progress=False)
    return out


def manifest_rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("data") / "out")


@pytest.fixture(scope="module")
def ManifestDataset():
    from synthmed.data import ManifestDataset

    return ManifestDataset


# ----------------------------------------------------------------------------- items

def test_items_match_the_manifest(out, ManifestDataset):
    rows = manifest_rows(out)
    ds = ManifestDataset(out)
    assert isinstance(ds, torch.utils.data.Dataset)
    assert len(ds) == len(rows) == 9
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    for row, item in zip(rows, ds):
        assert set(item) == {"image", "label", "case_id", "findings"}
        assert item["case_id"] == row["case_id"]
        assert item["findings"] == row["findings"]
        image, label = item["image"], item["label"]
        assert image.shape == (1, HEIGHT, WIDTH) and image.dtype == torch.float32
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert label.shape == (14,) and label.dtype == torch.float32
        assert label.tolist() == [float(row[c]) for c in CHEXPERT_COLUMNS]
    labels = {r["findings"].split(":")[0]: r for r in rows}
    effusion = ds[[r["case_id"] for r in rows].index(labels["pleural_effusion"]["case_id"])]["label"]
    assert [CHEXPERT_COLUMNS[j] for j in np.flatnonzero(effusion.numpy())] == ["Cardiomegaly", "Pleural Effusion"]
    assert ds.labels.shape == (9, 14)
    assert ds[-1]["case_id"] == rows[-1]["case_id"]
    with pytest.raises(IndexError):
        ds[9]


def test_pixels_are_the_png_samples_scaled(out, ManifestDataset):
    ds = ManifestDataset(out / "manifest.csv")  # the manifest path works as well as the folder
    item = ds[0]
    png = np.asarray(Image.open(out / manifest_rows(out)[0]["png_path"]))
    assert png.dtype == np.uint8  # the default
    np.testing.assert_array_equal(np.rint(item["image"][0].numpy() * 255).astype(np.uint8), png)


def test_dicom_when_no_png_and_8_and_16_bit_png(out, tmp_path, ManifestDataset):
    default = ManifestDataset(out)
    sixteen = ManifestDataset(build(tmp_path / "sixteen", formats="[png]", png_bits=16))
    dicom_only = ManifestDataset(build(tmp_path / "dicom", formats="[dicom]"))
    assert all(r["png_path"] == "" and r["dicom_path"] for r in manifest_rows(tmp_path / "dicom"))
    eight = ManifestDataset(build(tmp_path / "eight", formats="[png]", bits=8))
    for i in range(len(sixteen)):
        a, p = sixteen[i]["image"], default[i]["image"]
        d, e = dicom_only[i]["image"], eight[i]["image"]
        assert d.shape == e.shape == a.shape == p.shape
        assert float((a - d).abs().max()) < 2e-4     # the PNG holds the 12 DICOM bits, bit-replicated
        assert float((p - d).abs().max()) <= 0.5 / 255 + 1e-6  # round(v * 255 / 4095)
        assert float((a - e).abs().max()) <= 1 / 255 + 1e-6


def test_dtype_and_label_columns(out, ManifestDataset):
    ds = ManifestDataset(out, dtype=torch.float64, label_columns=["Pneumothorax", "No Finding"])
    item = ds[0]
    row = manifest_rows(out)[0]
    assert item["image"].dtype == item["label"].dtype == torch.float64
    assert item["label"].tolist() == [float(row["Pneumothorax"]), float(row["No Finding"])]
    with pytest.raises(ValueError, match="'Lung Nodule'"):
        ManifestDataset(out, label_columns=["Lung Nodule"])
    with pytest.raises(TypeError, match="floating-point"):
        ManifestDataset(out, dtype=torch.int64)


# ----------------------------------------------------------------------------- splits, masks, transform

def test_split_filter(out, ManifestDataset):
    rows = manifest_rows(out)
    for split in ("train", "val", "test"):
        ds = ManifestDataset(out, split=split)
        assert ds.case_ids == [r["case_id"] for r in rows if r["split"] == split]
        assert len(ds) == 3
    assert len(ManifestDataset(out, split=["train", "val"])) == 6
    with pytest.raises(ValueError, match=r"split 'validation' is not in .*manifest.csv; its splits are: .*train"):
        ManifestDataset(out, split="validation")


def with_statuses(out: Path, target: Path, statuses: dict[int, str]) -> Path:
    """A copy of the manifest (and nothing else: paths stay relative to ``out``) with some qc_status changed."""
    rows = manifest_rows(out)
    for i, status in statuses.items():
        rows[i]["qc_status"] = status
    path = out / target.name  # beside the images, so the relative paths still resolve
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_qc_status_filter(out, ManifestDataset, tmp_path):
    from synthmed.data import manifest_records

    rows = manifest_rows(out)
    assert {r["qc_status"] for r in rows} == {"pass"}
    manifest = with_statuses(out, tmp_path / "qc-manifest.csv", {1: "fail", 4: "warn", 7: "fail"})
    try:
        ids = [r["case_id"] for r in rows]
        usable = ManifestDataset(manifest, qc_status=("pass", "warn"))
        assert usable.case_ids == [c for i, c in enumerate(ids) if i not in (1, 7)]
        assert [r["case_id"] for r in manifest_records(manifest, qc_status="fail")] == [ids[1], ids[7]]
        assert ManifestDataset(manifest, split=rows[4]["split"], qc_status="warn").case_ids == [ids[4]]
        with pytest.raises(ValueError, match="qc_status 'ok' is not one of pass, warn, fail"):
            ManifestDataset(manifest, qc_status="ok")
    finally:
        manifest.unlink()
    assert len(ManifestDataset(out, qc_status="pass")) == len(rows)  # the manifest qc wrote: its verdicts hold
    original = (out / "manifest.csv").read_bytes()
    try:  # a hand edit qc then fails leaves the old qc_status (qc never rewrites a user's file): not trusted
        (out / "manifest.csv").write_bytes(original.replace(b"case-0000001,", b"case-0000001 ,", 1))
        with pytest.raises(ValueError, match=r"manifest.csv changed since synthmed wrote it, so its qc_status"):
            ManifestDataset(out, qc_status="pass")
        assert len(ManifestDataset(out)) == len(rows)  # no filter, no complaint
    finally:
        (out / "manifest.csv").write_bytes(original)
    split = out / "images" / "train" / "metadata.csv"  # the same for a split's metadata.csv, which qc also writes
    assert len(ManifestDataset(split, qc_status="pass")) == sum(r["split"] == "train" for r in rows)
    kept = split.read_bytes()
    try:
        split.write_bytes(kept[:-1] + b" \n" if kept.endswith(b"\n") else kept + b" ")
        with pytest.raises(ValueError, match=r"metadata.csv changed since synthmed wrote it"):
            ManifestDataset(split, qc_status="pass")
    finally:
        split.write_bytes(kept)
    unchecked = with_statuses(out, tmp_path / "unchecked.csv", {i: "" for i in range(len(rows))})
    try:
        with pytest.raises(ValueError, match=r"unchecked.csv, line 2: no qc_status .*synthmed qc"):
            manifest_records(unchecked, qc_status="pass")
        assert len(manifest_records(unchecked)) == len(rows)  # no filter, no complaint
    finally:
        unchecked.unlink()


def test_masks(out, ManifestDataset):
    rows = manifest_rows(out)
    ds = ManifestDataset(out, masks=True)
    for row, item in zip(rows, ds):
        expected = {Path(p).stem.split("_mask_")[1]: p for p in row["mask_paths"].split("|") if p}
        assert set(item["masks"]) == set(expected)
        for finding, relative in expected.items():
            mask = item["masks"][finding]
            assert mask.shape == (1, HEIGHT, WIDTH) and mask.dtype == torch.bool
            np.testing.assert_array_equal(mask[0].numpy(), np.asarray(Image.open(out / relative)) > 0)
            assert mask.any()
    assert {f for item in ds for f in item["masks"]} == {"pneumothorax", "pleural_effusion", "cardiomegaly"}


def test_masks_by_name_batch_with_the_default_collate(out, ManifestDataset):
    ds = ManifestDataset(out, masks=["pneumothorax", "pleural_effusion"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=9)))
    assert batch["image"].shape == (9, 1, HEIGHT, WIDTH)
    assert batch["label"].shape == (9, 14)
    assert batch["masks"]["pneumothorax"].shape == (9, 1, HEIGHT, WIDTH)
    has_mask = batch["masks"]["pneumothorax"].flatten(1).any(1)
    assert has_mask.tolist() == (batch["label"][:, CHEXPERT_COLUMNS.index("Pneumothorax")] == 1).tolist()


def test_transform_hook(out, ManifestDataset):
    seen = []

    def flip_and_keep(item):
        seen.append(sorted(item))
        return {"x": item["image"].flip(-1), "y": item["label"]}

    plain = ManifestDataset(out, split="val")
    ds = ManifestDataset(out, split="val", masks=True, transform=flip_and_keep)
    item = ds[1]
    assert seen == [["case_id", "findings", "image", "label", "masks"]]
    assert torch.equal(item["x"], plain[1]["image"].flip(-1))
    with pytest.raises(TypeError, match="transform must be callable"):
        ManifestDataset(out, transform="flip")


def test_pickles_for_worker_processes(out, ManifestDataset):
    ds = ManifestDataset(out, split="train")
    again = pickle.loads(pickle.dumps(ds))
    assert type(again) is type(ds)
    assert torch.equal(again[0]["image"], ds[0]["image"])


# ----------------------------------------------------------------------------- errors

def test_missing_manifest_names_the_path(tmp_path, ManifestDataset):
    with pytest.raises(FileNotFoundError, match="nowhere.* does not exist"):
        ManifestDataset(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"no manifest at {tmp_path / 'manifest.csv'}"):
        ManifestDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest.csv"):
        manifest_records(tmp_path)


def test_missing_image_names_the_file_and_row(out, tmp_path, ManifestDataset):
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    row = manifest_rows(copy)[4]
    (copy / row["png_path"]).unlink()
    ds = ManifestDataset(copy)
    with pytest.raises(FileNotFoundError) as e:
        ds[4]
    message = str(e.value)
    assert row["png_path"] in message and row["case_id"] in message and "line 6 of" in message
    assert ds[3]["case_id"]  # the other rows still load
    mask_row = next(i for i, r in enumerate(manifest_rows(copy)) if r["mask_paths"])
    mask = manifest_rows(copy)[mask_row]["mask_paths"].split("|")[0]
    (copy / mask).unlink()
    with pytest.raises(FileNotFoundError, match=f"mask file .*{mask}"):
        ManifestDataset(copy, masks=True)[mask_row]


def test_a_csv_that_is_not_a_manifest(tmp_path, ManifestDataset):
    (tmp_path / "labels.csv").write_text("path,label\na.png,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a synthmed manifest: it has no column 'case_id'"):
        ManifestDataset(tmp_path / "labels.csv")


def test_importing_synthmed_data_does_not_load_torch():
    code = ("import sys, synthmed.data; from synthmed.data import manifest_records; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- MONAI-style records

def test_manifest_records(out):
    rows = manifest_rows(out)
    records = manifest_records(out)
    assert [r["case_id"] for r in records] == [r["case_id"] for r in rows]
    for record, row in zip(records, rows):
        assert Path(record["image"]).is_absolute() and Path(record["image"]).is_file()
        assert Path(record["image"]) == (out / row["png_path"]).resolve()
        assert record["label"].dtype == np.float32
        assert record["label"].tolist() == [float(row[c]) for c in CHEXPERT_COLUMNS]
        assert (record["split"], record["findings"]) == (row["split"], row["findings"])
    assert {r["split"] for r in manifest_records(out, split="test")} == {"test"}
    with pytest.raises(ValueError, match="its splits are"):
        manifest_records(out, split="holdout")


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning")  # MONAI without NVIDIA's codec: expected
def test_monai_reads_the_records_like_manifest_dataset(out, ManifestDataset):
    pytest.importorskip("monai")
    from monai.data import DataLoader, Dataset
    from monai.transforms import LoadImaged

    records = manifest_records(out, split="train")
    monai_set = Dataset(data=records, transform=LoadImaged(keys="image", image_only=True))
    ours = ManifestDataset(out, split="train")
    assert len(monai_set) == len(ours) == 3
    for i in range(len(ours)):
        theirs = monai_set[i]
        # MONAI's PIL reader gives [W, H] (its spatial axes are x first) and the raw 8-bit samples
        assert tuple(theirs["image"].shape) == (WIDTH, HEIGHT)
        np.testing.assert_allclose(np.asarray(theirs["image"]).T / 255.0, ours[i]["image"][0].numpy(), atol=1e-6)
        np.testing.assert_array_equal(theirs["label"], ours[i]["label"].numpy())
    batch = next(iter(DataLoader(monai_set, batch_size=3)))
    assert tuple(batch["image"].shape) == (3, WIDTH, HEIGHT) and tuple(batch["label"].shape) == (3, 14)


def test_read_image_refuses_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no image file"):
        read_image(tmp_path / "x.png")


# ----------------------------------------------------------------------------- masks for MONAI / TorchIO, collate

def test_mask_pngs_are_0_1_label_maps(out):
    masks = [p for row in manifest_rows(out) for p in row["mask_paths"].split("|") if p]
    assert masks
    for relative in masks:
        with Image.open(out / relative) as im:
            assert im.mode == "L" and set(np.unique(np.asarray(im)).tolist()) == {0, 1}, relative


def test_records_with_masks_name_each_mask(out):
    rows = manifest_rows(out)
    for record, row in zip(manifest_records(out, masks=True), rows):
        expected = {Path(p).stem.split("_mask_")[1]: str((out / p).resolve()) for p in row["mask_paths"].split("|")
                    if p}
        assert record["mask_paths"] == expected
        assert {k: v for k, v in record.items() if k.startswith("mask_") and k != "mask_paths"} == {
            f"mask_{f}": p for f, p in expected.items()}
    assert not [k for k in manifest_records(out)[0] if k.startswith("mask")]


@pytest.fixture(scope="module")
def dicom_only(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("data") / "dicom-only", formats="[dicom]")


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning")
@pytest.mark.filterwarnings("ignore:PydicomReader:UserWarning")
@pytest.mark.parametrize("formats", ["png", "dicom"])
def test_load_transform_gives_rows_first_and_each_box_covers_its_mask(request, formats, ManifestDataset):
    """The PNG, or the DICOM file of a set without PNGs (which MONAI's pydicom reader once gave as [W, H] while the
    masks stayed rows first: a square film's masks lay transposed on it, unseen)."""
    pytest.importorskip("monai")
    import json

    from monai.data import DataLoader, Dataset

    from synthmed.data import MASK_FINDINGS, load_transform

    out = request.getfixturevalue("out" if formats == "png" else "dicom_only")
    rows = manifest_rows(out)
    monai_set = Dataset(data=manifest_records(out, masks=True), transform=load_transform(masks=True))
    ours = ManifestDataset(out, masks=True)
    boxes_seen = 0
    for i, row in enumerate(rows):
        item = monai_set[i]
        image, mask, label_map = np.asarray(item["image"]), np.asarray(item["mask"]), np.asarray(item["label_map"])
        assert image.shape == (1, HEIGHT, WIDTH) and mask.shape == (len(MASK_FINDINGS), HEIGHT, WIDTH)
        scale = 255.0 if formats == "png" else 2.0 ** 12 - 1  # the DICOM keeps 12 bits
        np.testing.assert_allclose(image / scale, ours[i]["image"].numpy(), atol=1e-6)  # same frame, same values
        for finding, (x0, y0, x1, y1) in (json.loads(row["bboxes"]) if row["bboxes"] else {}).items():
            channel = mask[MASK_FINDINGS.index(finding)]
            inside = np.zeros_like(channel)
            inside[y0:y1 + 1, x0:x1 + 1] = 1  # the box drawn on the MONAI-loaded image
            assert channel.any() and not (channel & (1 - inside)).any(), (row["case_id"], finding)
            assert channel[y0, :].any() and channel[y1, :].any() and channel[:, x0].any() and channel[:, x1].any()
            assert (label_map[0][channel == 1] > 0).all()
            boxes_seen += 1
        assert set(np.unique(label_map).tolist()) <= {0} | {MASK_FINDINGS.index(f) + 1 for f in ours[i]["masks"]}
    assert boxes_seen >= 3
    batch = next(iter(DataLoader(monai_set, batch_size=9)))  # mixed findings batch together
    assert tuple(batch["mask"].shape) == (9, len(MASK_FINDINGS), HEIGHT, WIDTH)
    assert tuple(batch["label_map"].shape) == (9, 1, HEIGHT, WIDTH)


def test_collate_batches_masks_of_mixed_findings(out, ManifestDataset):
    from synthmed.data import collate

    ds = ManifestDataset(out, masks=True)
    with pytest.raises(KeyError):  # what the default collate does with cases of different findings
        next(iter(torch.utils.data.DataLoader(ds, batch_size=9)))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=9, collate_fn=collate)))
    assert batch["image"].shape == (9, 1, HEIGHT, WIDTH) and batch["label"].shape == (9, 14)
    assert set(batch["masks"]) == {"pneumothorax", "pleural_effusion", "cardiomegaly"}
    for finding, masks in batch["masks"].items():
        assert masks.shape == (9, 1, HEIGHT, WIDTH) and masks.dtype == torch.bool
        for i in range(9):
            own = ds[i]["masks"].get(finding)
            assert torch.equal(masks[i], own) if own is not None else not masks[i].any()


def test_load_masks_refuses_a_finding_outside_its_channels(out):
    from synthmed.data import LoadMasks

    record = next(r for r in manifest_records(out, masks=True) if "mask_pneumothorax" in r)
    with pytest.raises(ValueError, match=r"has a mask of 'pneumothorax', which is not one of the channels"):
        LoadMasks(("cardiomegaly",))(record)
    with pytest.raises(KeyError, match="masks=True"):
        LoadMasks()({"image": record["image"]})


# ----------------------------------------------------------------------------- the field's loaders read stored values

def stored_png_values(out: Path, row: dict) -> np.ndarray:
    """What the PNG must hold: the writer's 8-bit values of the DICOM's 12 stored bits, round(v * 255 / 4095)."""
    import pydicom

    v = pydicom.dcmread(out / row["dicom_path"]).pixel_array.astype(np.int64)
    assert v.max() > 255  # really 12 bits, so the test tells 8-bit rounding from a cast
    return np.floor(v * 255 / 4095 + 0.5).astype(np.uint8)


@pytest.mark.slow
def test_hugging_face_imagefolder_and_convert_rgb_give_the_stored_values(out, tmp_path, monkeypatch):
    """#20: torchvision's pil_loader does img.convert("RGB"); on the 16-bit PNGs it saturated 83 % of the pixels."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    datasets = pytest.importorskip("datasets")
    copy = tmp_path / "out"
    shutil.copytree(out, copy)  # the cache must not touch the shared folder
    loaded = datasets.load_dataset("imagefolder", data_dir=str(copy), cache_dir=str(tmp_path / "hf-cache"))
    rows = {r["case_id"]: r for r in manifest_rows(out)}
    seen = 0
    for part in loaded.values():
        for example in part:
            want = stored_png_values(out, rows[example["case_id"]])
            rgb = np.asarray(example["image"].convert("RGB"))
            assert rgb.shape == (HEIGHT, WIDTH, 3)
            for channel in range(3):
                np.testing.assert_array_equal(rgb[..., channel], want)
            seen += 1
    assert seen == 9


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning")
def test_monai_load_imaged_gives_the_stored_values(out):
    pytest.importorskip("monai")
    from monai.transforms import LoadImaged

    load = LoadImaged(keys="image", image_only=True)
    for record, row in zip(manifest_records(out), manifest_rows(out)):
        image = np.asarray(load(record)["image"])
        np.testing.assert_array_equal(image.T, stored_png_values(out, row))  # MONAI's PIL reader: [W, H]


def test_torchio_reads_masks_as_0_1_label_maps(out):
    tio = pytest.importorskip("torchio")
    rows = [r for r in manifest_rows(out) if r["mask_paths"]]
    assert rows
    for row in rows:
        for relative in row["mask_paths"].split("|"):
            label = tio.LabelMap(out / relative)
            values = set(torch.unique(label.data).tolist())
            assert values == {0, 1}, relative
            with Image.open(out / relative) as im:  # TorchIO's 2-D images are [C, W, H, 1]
                np.testing.assert_array_equal(label.data[0, :, :, 0].numpy().T, np.asarray(im))


# ----------------------------------------------------------------------------- hand-made sets: what the loaders refuse

def write_manifest(path: Path, rows: list[dict]) -> Path:
    header = ["case_id", "split", "png_path", "mask_paths", *CHEXPERT_COLUMNS]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def tiny_set(folder: Path) -> tuple[Path, list[dict]]:
    """A set made by hand (no generate): two 6 x 4 PNGs in images/train, c0 with a pneumonia mask; its rows."""
    (folder / "images" / "train").mkdir(parents=True)
    (folder / "masks" / "train").mkdir(parents=True)
    rows = []
    for n in range(2):
        Image.fromarray(np.full((4, 6), 60 * (n + 1), np.uint8)).save(folder / f"images/train/c{n}.png")
        rows.append({"case_id": f"c{n}", "split": "train", "png_path": f"images/train/c{n}.png"})
    Image.fromarray(np.eye(4, 6, dtype=np.uint8)).save(folder / "masks/train/c0_mask_pneumonia.png")
    rows[0]["mask_paths"] = "masks/train/c0_mask_pneumonia.png"
    write_manifest(folder / "manifest.csv", rows)
    return folder, rows


def test_paths_leading_out_of_the_folder_are_refused_naming_the_line(tmp_path, ManifestDataset):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(elsewhere / "x.png")
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(elsewhere / "c0_mask_pneumonia.png")
    cases = [("png_path", "../elsewhere/x.png"), ("png_path", str(elsewhere / "x.png")),
             ("mask_paths", "../elsewhere/c0_mask_pneumonia.png")]
    for n, (column, value) in enumerate(cases):
        folder, rows = tiny_set(tmp_path / f"set{n}")
        rows[0][column] = value
        write_manifest(folder / "manifest.csv", rows)
        expected = rf"manifest.csv names files outside .*set{n}.*: line 2 \(c0\) {column} '{value}'"
        with pytest.raises(ValueError, match=expected):
            ManifestDataset(folder, masks=True)
        with pytest.raises(ValueError, match=expected):
            manifest_records(folder, masks=True)
    # a linked folder: images/train now lies elsewhere
    folder, _ = tiny_set(tmp_path / "linked")
    (folder / "images" / "train").rename(tmp_path / "outside-train")
    (folder / "images" / "train").symlink_to(tmp_path / "outside-train", target_is_directory=True)
    with pytest.raises(ValueError, match=r"line 2 \(c0\) png_path 'images/train/c0.png'; line 3 \(c1\)"):
        ManifestDataset(folder)
    with pytest.raises(ValueError, match=r"line 2 \(c0\) png_path"):
        manifest_records(folder)
    # a linked file that leads out, and a link inside the folder that stays inside (fine)
    folder, _ = tiny_set(tmp_path / "linked-file")
    (folder / "images" / "train" / "c1.png").unlink()
    (folder / "images" / "train" / "c1.png").symlink_to(elsewhere / "x.png")
    with pytest.raises(ValueError, match=r"line 3 \(c1\) png_path 'images/train/c1.png'"):
        ManifestDataset(folder)
    folder, _ = tiny_set(tmp_path / "inner-link")
    (folder / "images" / "train").rename(folder / "real")
    (folder / "images" / "train").symlink_to(folder / "real", target_is_directory=True)
    assert ManifestDataset(folder)[1]["image"].shape == (1, 4, 6) and len(manifest_records(folder)) == 2


def test_a_short_or_long_row_is_refused_naming_the_line(tmp_path, ManifestDataset):
    folder, rows = tiny_set(tmp_path / "set")
    manifest = folder / "manifest.csv"
    header_fields = len(manifest.read_text(encoding="utf-8").splitlines()[0].split(","))
    text = manifest.read_text(encoding="utf-8")
    for extra, fields in ((",,,\n", 4), ("c9,train\n", 2), (text.splitlines()[1] + ",x\n", header_fields + 1)):
        manifest.write_text(text + extra, encoding="utf-8")
        expected = rf"manifest.csv, line 4: the row has {fields} fields, the header {header_fields}"
        with pytest.raises(ValueError, match=expected):
            ManifestDataset(folder)
        with pytest.raises(ValueError, match=expected):
            ManifestDataset(folder, split="validation")
        with pytest.raises(ValueError, match=expected):
            manifest_records(folder)
    # a full row with a blank split: the message for an unknown split names it
    write_manifest(manifest, rows + [{"case_id": "c2", "png_path": "images/train/c1.png"}])
    with pytest.raises(ValueError, match=r"split 'validation' is not in .*; its splits are: train, \(blank\)"):
        ManifestDataset(folder, split="validation")


def test_a_mask_of_another_size_than_its_image_names_both_files(tmp_path, ManifestDataset):
    from synthmed.data import LoadMasks

    folder, _ = tiny_set(tmp_path / "set")
    image = folder / "images/train/c0.png"
    Image.open(image).resize((3, 2)).save(image)  # a user's resize
    expected = r"mask file .*c0_mask_pneumonia.png is 6x4, its image .*images/train/c0.png 3x2 \(case c0 \(line 2"
    for masks in (True, ["pneumonia"]):
        with pytest.raises(ValueError, match=expected):
            ManifestDataset(folder, masks=masks)[0]
    assert ManifestDataset(folder, masks=True)[1]["masks"] == {}  # the other row still loads
    record = manifest_records(folder, masks=True)[0]
    with pytest.raises(ValueError, match=r"c0_mask_pneumonia.png is 6x4, the image of c0 3x2"):
        LoadMasks(("pneumonia",))({**record, "image": np.zeros((1, 2, 3), np.float32)})


def test_a_split_metadata_csv_reads_its_paths_from_the_dataset_folder(tmp_path, ManifestDataset):
    folder, rows = tiny_set(tmp_path / "set")
    metadata = folder / "images/train/metadata.csv"
    header = ["file_name", "case_id", "split", "png_path", "mask_paths", *CHEXPERT_COLUMNS]
    with open(metadata, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows({**row, "file_name": Path(row["png_path"]).name} for row in rows)
    split, whole = ManifestDataset(metadata, masks=True), ManifestDataset(folder, masks=True)
    assert split.root == folder and split.case_ids == ["c0", "c1"]
    assert torch.equal(split[0]["image"], whole[0]["image"]) and torch.equal(split[0]["masks"]["pneumonia"],
                                                                             whole[0]["masks"]["pneumonia"])
    assert manifest_records(metadata)[1]["image"] == str((folder / "images/train/c1.png").resolve())
    rows[0]["png_path"] = "../../images/train/c0.png"  # still held to the dataset folder
    write_manifest(metadata, rows)
    with pytest.raises(ValueError, match=r"metadata.csv names files outside .*set \("):
        ManifestDataset(metadata)


def test_a_build_result_and_numpy_integers_are_taken(tmp_path, ManifestDataset):
    from synthmed.build import BuildResult

    folder, _ = tiny_set(tmp_path / "set")
    result = BuildResult(out=folder, total=2, written=2, reused=0, interrupted=False, seconds=0.0)
    ds = ManifestDataset(result)
    assert ds.case_ids == ["c0", "c1"] and ds[np.int64(1)]["case_id"] == "c1" and ds[np.int32(-1)]["case_id"] == "c1"
    assert [r["case_id"] for r in manifest_records(result)] == ["c0", "c1"]
    with pytest.raises(TypeError, match=r"root_or_manifest: give an output folder .* BuildResult .*, not int"):
        ManifestDataset(42)


@pytest.mark.parametrize("side", [(6, 4), (5, 5)])
def test_load_masks_after_monais_load_image_lies_on_the_image_as_it_was_read(tmp_path, side):
    """MONAI's LoadImaged (PIL reader, reverse_indexing by default) gives [W, H]: LoadMasks after it lays the masks
    out the same way, a square image included (where no shape tells), so each mask covers its finding's pixels."""
    pytest.importorskip("monai")
    from monai.data import PILReader
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd

    from synthmed.data import LoadMasks

    width, height = side
    drawn = np.zeros((height, width), np.uint8)
    drawn[0, :] = 1
    drawn[1:, 0] = 1
    drawn[height - 1, width - 2] = 1  # no symmetry that would hide a swap
    (tmp_path / "images/train").mkdir(parents=True)
    (tmp_path / "masks/train").mkdir(parents=True)
    Image.fromarray(20 + 200 * drawn).save(tmp_path / "images/train/c0.png")
    Image.fromarray(drawn).save(tmp_path / "masks/train/c0_mask_pneumonia.png")
    write_manifest(tmp_path / "manifest.csv", [{"case_id": "c0", "split": "train", "png_path": "images/train/c0.png",
                                                "mask_paths": "masks/train/c0_mask_pneumonia.png"}])
    record = manifest_records(tmp_path, masks=True)[0]
    for reader in (None, PILReader(reverse_indexing=False)):
        load = LoadImaged(keys="image", reader=reader) if reader else LoadImaged(keys="image")
        item = Compose([load, EnsureChannelFirstd(keys="image"), ScaleIntensityd(keys="image"),
                        LoadMasks(("pneumonia",))])(dict(record))
        image = np.asarray(item["image"])[0]
        assert item["mask"].shape[1:] == image.shape
        np.testing.assert_array_equal(item["mask"][0], (image > 0.5).astype(np.uint8))


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader:UserWarning")
@pytest.mark.filterwarnings("ignore:PydicomReader:UserWarning")
def test_load_masks_after_monais_own_dicom_reader_lies_on_the_image_as_it_was_read(tmp_path, ManifestDataset,
                                                                                    monkeypatch):
    """A square DICOM-only set read by LoadImaged's defaults ([W, H]): LoadMasks lays the masks out the same way,
    reading a file again only for an image with masks whose layout it is not told."""
    pytest.importorskip("monai")
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    import synthmed.data as data
    from synthmed.data import MASK_FINDINGS, LoadMasks

    told = []
    monkeypatch.setattr(data, "_read_transposed", lambda image, _tell=data._read_transposed: told.append(1) or
                        _tell(image))

    out = tmp_path / "square"
    generate(load_spec(SPEC.format(w=64, h=64, formats="[dicom]", bits=16, png_bits=8)), out, backend="pattern",
             progress=False)
    ours = ManifestDataset(out, masks=True)
    load = Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), LoadMasks()])
    said = Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), LoadMasks(image_layout="columns")])
    with pytest.raises(ValueError, match="image_layout must be one of auto, rows, columns"):
        LoadMasks(image_layout="xy")
    checked = 0
    for i, record in enumerate(manifest_records(out, masks=True)):
        item = load(record)
        np.testing.assert_array_equal(item["mask"], said(dict(record))["mask"])  # told, or found: the same
        image = np.asarray(item["image"])[0]
        np.testing.assert_allclose(image.T / (2.0 ** 12 - 1), ours[i]["image"][0].numpy(), atol=1e-6)  # as read
        for finding, mask in ours[i]["masks"].items():
            np.testing.assert_array_equal(item["mask"][MASK_FINDINGS.index(finding)], mask[0].numpy().T)
            checked += 1
    with_masks = sum(bool(r["mask_paths"]) for r in manifest_records(out, masks=True))
    assert checked >= 3 and len(told) == with_masks < len(ours)  # "columns" reads nothing, nor a row without masks
    from monai.transforms import ToNumpyd

    plain = Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), ToNumpyd(keys="image"),
                     LoadMasks()])  # the meta gone: it cannot tell, and says so once
    records = [r for r in manifest_records(out, masks=True) if r["mask_paths"]]
    with pytest.warns(UserWarning, match="cannot tell how this square image was read") as said_once:
        for record in records[:2]:
            plain(dict(record))
    assert len([w for w in said_once if "cannot tell" in str(w.message)]) == 1
