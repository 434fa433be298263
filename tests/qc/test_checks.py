"""Per-image checks: decoding (fast path against Pillow / pydicom), histogram figures against numpy,
the pixel verdicts, and check_row on files written by synthmed's own writers, then broken one way each."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from synthmed.qc.checks import (CHECKS, DEFAULT_GATE, PER_IMAGE_CHECKS, REGIONS, Expected, PixelLimits,
                                box_downsample, check_generated, check_row, decode_dicom, decode_png,
                                pixel_flags, pixel_stats, region_masks)
from synthmed.qc.dciodvfy import dciodvfy_errors
from synthmed.sampler import Case, FindingLabel
from synthmed.spec import DEFAULT_QC_GATE
from synthmed.backends.pattern import PatternBackend
from synthmed.writers.dicom import dicom_bytes
from synthmed.writers.png import png_bytes, png_values, to_stored

needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None,
                                    reason="dciodvfy (Debian package dicom3tools) is not installed")

CASE = Case("case-0000003", 3, "train", 424242, (FindingLabel("pneumonia", "right_lower_lobe", "moderate"),),
            "F", 61, "PA")


def pattern_pixels(size: int = 64, case: Case = CASE) -> np.ndarray:
    return PatternBackend(size, size).generate([case], [None])[0].pixels


def write_case(folder: Path, pixels: np.ndarray, bit_depth: int = 16, *, case: Case = CASE,
               dicom_pixels: np.ndarray | None = None, png_bit_depth: int | None = None) -> dict:
    """PNG + DICOM of one image with synthmed's writers, and the manifest row that names them."""
    stored = to_stored(pixels, bit_depth)
    png = png_bytes(png_values(stored, png_bit_depth), {"case_id": case.case_id})
    dcm = dicom_bytes(stored if dicom_pixels is None else dicom_pixels, case,
                      bits_stored=12 if bit_depth == 16 else 8, dataset_name="t", spec_hash="h" * 64,
                      backend="pattern", model_id="m", model_hash="x", prompt="p", synthmed_version="0.1.0")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "dicom").mkdir(parents=True, exist_ok=True)
    (folder / "images" / f"{case.case_id}.png").write_bytes(png)
    (folder / "dicom" / f"{case.case_id}.dcm").write_bytes(dcm)
    return {"case_id": case.case_id, "png_path": f"images/{case.case_id}.png",
            "png_sha256": hashlib.sha256(png).hexdigest(), "dicom_path": f"dicom/{case.case_id}.dcm",
            "dicom_sha256": hashlib.sha256(dcm).hexdigest(), "mask_paths": "", "mask_sha256": ""}


EXPECTED = Expected(width=64, height=64, bit_depth=16)


# ----------------------------------------------------------------------------- names

def test_check_names_and_default_gate():
    assert set(PER_IMAGE_CHECKS) <= set(CHECKS)
    assert DEFAULT_GATE == DEFAULT_QC_GATE  # the spec's default and the checks' agree
    assert "intensity" not in DEFAULT_GATE and "sha256" in DEFAULT_GATE


# ----------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_decode_png_round_trip(dtype):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, np.iinfo(dtype).max, size=(37, 53), endpoint=True).astype(dtype)
    decoded, depth = decode_png(png_bytes(pixels, {"k": "v"}))
    assert depth == (16 if dtype == np.uint16 else 8)
    assert decoded.dtype == dtype and np.array_equal(decoded, pixels)


@pytest.mark.parametrize("mode", ["L", "I;16"])
def test_decode_png_with_filters_falls_back_to_pillow(mode):
    rng = np.random.default_rng(1)
    if mode == "L":
        pixels = np.tile(np.arange(64, dtype=np.uint8), (40, 1)) + rng.integers(0, 4, (40, 64)).astype(np.uint8)
    else:
        pixels = (np.tile(np.arange(64, dtype=np.uint16) * 900, (40, 1)) + rng.integers(0, 7, (40, 64))).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=True)  # Pillow filters rows
    decoded, depth = decode_png(buf.getvalue())
    assert np.array_equal(decoded, pixels)
    assert depth == (8 if mode == "L" else 16)


@pytest.mark.parametrize("data", [b"", b"not a png at all", png_bytes(np.zeros((8, 8), np.uint8))[:40]])
def test_decode_png_refuses_broken_bytes(data):
    with pytest.raises(ValueError):
        decode_png(data)


@pytest.mark.parametrize("bit_depth", [8, 16])
def test_decode_dicom_fast_path_equals_pydicom(bit_depth):
    stored = to_stored(pattern_pixels(), bit_depth)
    data = dicom_bytes(stored, CASE, bits_stored=12 if bit_depth == 16 else 8, dataset_name="t", spec_hash="h",
                       backend="b", model_id="m", model_hash="x", prompt="p", synthmed_version="0.1.0")
    decoded = decode_dicom(data)
    assert np.array_equal(decoded.pixels, pydicom.dcmread(io.BytesIO(data)).pixel_array)
    assert np.array_equal(decoded.pixels, stored)
    assert (decoded.rows, decoded.columns) == (64, 64)
    assert (decoded.bits_allocated, decoded.bits_stored) == ((16, 12) if bit_depth == 16 else (8, 8))
    with pytest.raises(ValueError, match="DICOM does not decode"):
        decode_dicom(data[:200])


def _file_with_meta(syntax: str | None) -> bytes:
    """A small DICOM file whose file meta names ``syntax``; None: a file meta written with implicit VR."""
    import struct

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ImplicitVRLittleEndian, SecondaryCaptureImageStorage

    if syntax is None:  # some writers did; pydicom reads it all the same
        def element(number: int, value: bytes) -> bytes:
            value += b"\0" * (len(value) % 2)
            return struct.pack("<HHI", 2, number, len(value)) + value

        body = (element(1, b"\0\1") + element(2, SecondaryCaptureImageStorage.encode()) + element(3, b"1.2.3.4")
                + element(0x10, ImplicitVRLittleEndian.encode()))
        return (b"\0" * 128 + b"DICM" + element(0, struct.pack("<I", len(body))) + body
                + struct.pack("<HHI", 0x10, 0x10, 2) + b"x ")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta, ds.SOPClassUID, ds.PatientName = meta, SecondaryCaptureImageStorage, "x"
    fp = io.BytesIO()
    ds.save_as(fp, enforce_file_format=True)
    return fp.getvalue()


@pytest.mark.filterwarnings("ignore:Expected explicit VR, but found implicit VR")
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", None, "synthmed"])
def test_read_file_meta_reads_what_pydicom_reads(syntax, tmp_path):
    """The file meta as pydicom's public read_file_meta_info reads it, and the stream left at the dataset."""
    from pydicom.filereader import read_file_meta_info, read_preamble

    from synthmed.qc.checks import read_file_meta

    data = (dicom_bytes(to_stored(pattern_pixels(), 16), CASE, bits_stored=12, dataset_name="t", spec_hash="h",
                        backend="b", model_id="m", model_hash="x", prompt="p", synthmed_version="0.1.0")
            if syntax == "synthmed" else _file_with_meta(syntax))
    (tmp_path / "f.dcm").write_bytes(data)
    fp = io.BytesIO(data)
    read_preamble(fp, False)
    meta = read_file_meta(fp)
    assert meta == read_file_meta_info(tmp_path / "f.dcm") and len(meta) >= 4
    assert fp.tell() == 128 + 4 + 12 + meta.FileMetaInformationGroupLength  # the dataset starts here


# ----------------------------------------------------------------------------- pixel figures

@pytest.mark.parametrize("full_scale", [255, 4095])
def test_pixel_stats_match_numpy(full_scale):
    rng = np.random.default_rng(2)
    values = np.clip(rng.normal(0.4 * full_scale, 0.2 * full_scale, size=(50, 70)), 0, full_scale)
    values = values.astype(np.uint8 if full_scale == 255 else np.uint16)
    stats = pixel_stats(values, full_scale)
    x = values.astype(np.float64) / full_scale
    assert stats.mean == pytest.approx(x.mean(), abs=1e-12)
    assert stats.std == pytest.approx(x.std(), abs=1e-9)
    for q, got in ((0.01, stats.p1), (0.5, stats.p50), (0.99, stats.p99)):
        assert got == pytest.approx(np.quantile(x, q, method="inverted_cdf"), abs=1e-12)
    assert stats.low_fraction == pytest.approx((values == 0).mean())
    assert stats.high_fraction == pytest.approx((values == full_scale).mean())
    assert stats.histogram.shape == (32,) and stats.histogram.sum() == pytest.approx(1.0)
    assert stats.dynamic_range == pytest.approx(stats.p99 - stats.p1)


def test_pixel_flags_thresholds():
    limits = PixelLimits(min_dynamic_range=0.05, max_saturated_fraction=0.2)
    flat = np.full((20, 20), 2000, np.uint16)
    flat[0, :3] = 2100  # 0.75% of the pixels: below the 1st-99th percentile range
    assert sorted(pixel_flags(pixel_stats(flat, 4095), limits)) == ["blank"]
    white = (np.arange(400).reshape(20, 20) * 10).astype(np.uint16)
    white[:5] = 4095  # 25% at full white
    flags = pixel_flags(pixel_stats(white, 4095), limits)
    assert sorted(flags) == ["saturated"] and "full white" in flags["saturated"] and "25.0%" in flags["saturated"]
    black = white.copy()
    black[:5] = 0  # 25% black: air beside the body, as on real films
    assert pixel_flags(pixel_stats(black, 4095), limits) == {}
    black[:13] = 0  # 65% black: more than max_black_fraction 0.6
    assert "65.0% of pixels at black" in pixel_flags(pixel_stats(black, 4095), limits)["saturated"]
    white[:4] = 1000  # 5% at white: fine
    assert pixel_flags(pixel_stats(white, 4095), limits) == {}


def test_check_generated_names_each_problem():
    clean = pattern_pixels()
    assert check_generated(clean, width=64, height=64, bit_depth=16) == {}
    assert sorted(check_generated(np.zeros((64, 64)), width=64, height=64, bit_depth=16)) == ["blank", "saturated"]
    assert sorted(check_generated(np.ones((64, 64)), width=64, height=64, bit_depth=8)) == ["blank", "saturated"]
    with_nan = clean.copy()
    with_nan[3, 4] = np.nan
    assert list(check_generated(with_nan, width=64, height=64, bit_depth=16)) == ["nan"]
    assert "1 NaN" in check_generated(with_nan, width=64, height=64, bit_depth=16)["nan"]
    assert list(check_generated(clean[:32], width=64, height=64, bit_depth=16)) == ["size"]
    half = clean.copy()
    half[:32] = 1.0
    assert list(check_generated(half, width=64, height=64, bit_depth=16)) == ["saturated"]


def test_box_downsample_and_regions():
    image = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    small = box_downsample(image, 8)
    assert small.shape == (8, 8) and small[0, 0] == pytest.approx(image[:8, :8].mean())
    assert box_downsample(image, 64) is not None and box_downsample(np.ones((50, 70)), 32, 16).shape == (32, 16)
    masks = region_masks(64)
    assert set(masks) == set(REGIONS)
    assert masks["whole"].all()
    assert not (masks["right_lung"] & masks["left_lung"]).any()
    assert masks["right_lung"][:, :32].sum() == masks["right_lung"].sum()  # the patient's right is the image's left


# ----------------------------------------------------------------------------- one row's files

def test_check_row_clean(tmp_path):
    row = write_case(tmp_path, pattern_pixels())
    result, pixels = check_row(tmp_path, row, EXPECTED)
    assert result.flags == {}
    assert pixels.shape == (64, 64) and pixels.dtype == np.float32 and 0.0 <= pixels.min() <= pixels.max() <= 1.0
    assert set(result.regions) == set(REGIONS) and result.thumb.shape == (32, 32)
    # the file's verdict equals the verdict on the backend's output
    assert check_generated(pattern_pixels(), width=64, height=64, bit_depth=16) == {}


def test_check_row_8_bit(tmp_path):
    row = write_case(tmp_path, pattern_pixels(), bit_depth=8)
    assert check_row(tmp_path, row, Expected(64, 64, 8))[0].flags == {}
    result, _ = check_row(tmp_path, row, EXPECTED)  # the spec says 16
    assert list(result.flags) == ["bit_depth"]
    assert "PNG is 8-bit" in result.flags["bit_depth"] and "Bits Allocated 8" in result.flags["bit_depth"]


def test_check_row_blank_and_saturated_files(tmp_path):
    row = write_case(tmp_path, np.zeros((64, 64)))
    assert sorted(check_row(tmp_path, row, EXPECTED)[0].flags) == ["blank", "saturated"]
    half = pattern_pixels()
    half[:, :40] = 1.0
    row = write_case(tmp_path, half)
    assert sorted(check_row(tmp_path, row, EXPECTED)[0].flags) == ["saturated"]


def test_check_row_wrong_size(tmp_path):
    row = write_case(tmp_path, pattern_pixels(32))
    result, _ = check_row(tmp_path, row, EXPECTED)
    assert list(result.flags) == ["size"]
    assert "PNG is 32x32" in result.flags["size"] and "DICOM is 32x32" in result.flags["size"]


def test_check_row_tampered_file_fails_sha256_only(tmp_path):
    row = write_case(tmp_path, pattern_pixels())
    with open(tmp_path / row["png_path"], "ab") as fh:
        fh.write(b"trailing bytes after IEND")  # still decodes, same pixels
    result, _ = check_row(tmp_path, row, EXPECTED)
    assert list(result.flags) == ["sha256"] and row["png_path"] in result.flags["sha256"]


def test_check_row_dicom_differs_from_png(tmp_path):
    pixels = pattern_pixels()
    other = to_stored(pixels, 16).copy()
    other[10:12, 10:20] = 7
    row = write_case(tmp_path, pixels, dicom_pixels=other)  # the manifest's sha256 is of this DICOM
    result, _ = check_row(tmp_path, row, EXPECTED)
    assert list(result.flags) == ["dicom_match"] and "20 of 4096 DICOM pixels differ" in result.flags["dicom_match"]


def test_check_row_missing_and_broken_files(tmp_path):
    row = write_case(tmp_path, pattern_pixels())
    (tmp_path / row["dicom_path"]).unlink()
    result, pixels = check_row(tmp_path, row, EXPECTED)
    assert list(result.flags) == ["readable"] and "is missing" in result.flags["readable"]
    assert pixels is not None  # the PNG still decodes
    data = (tmp_path / row["png_path"]).read_bytes()
    (tmp_path / row["png_path"]).write_bytes(data[: len(data) // 2])
    result, pixels = check_row(tmp_path, row, EXPECTED)
    assert pixels is None and sorted(result.flags) == ["readable", "sha256"]
    result, _ = check_row(tmp_path, {**row, "png_path": "", "dicom_path": ""}, EXPECTED)
    assert "names no PNG" in result.flags["readable"] and "names no DICOM" in result.flags["readable"]


def test_check_row_mask_hashes(tmp_path):
    row = write_case(tmp_path, pattern_pixels())
    mask = png_bytes(np.eye(64, dtype=bool))
    (tmp_path / "m.png").write_bytes(mask)
    row = {**row, "mask_paths": "m.png", "mask_sha256": hashlib.sha256(mask).hexdigest()}
    assert check_row(tmp_path, row, EXPECTED)[0].flags == {}
    (tmp_path / "m.png").write_bytes(png_bytes(np.zeros((64, 64), bool)))
    assert "m.png" in check_row(tmp_path, row, EXPECTED)[0].flags["sha256"]


@needs_dciodvfy
def test_dciodvfy_finds_no_error_in_a_synthmed_file(tmp_path):
    row = write_case(tmp_path, pattern_pixels())
    assert dciodvfy_errors(tmp_path / row["dicom_path"]) == []


# ----------------------------------------------------------------------------- #20: 8-bit PNG of a 12-bit DICOM

def rewrite_png(folder: Path, row: dict, samples: np.ndarray) -> dict:
    data = png_bytes(samples)
    (folder / row["png_path"]).write_bytes(data)
    return {**row, "png_sha256": hashlib.sha256(data).hexdigest()}


def test_check_row_8_bit_png_of_a_12_bit_dicom(tmp_path):
    row = write_case(tmp_path, pattern_pixels(), png_bit_depth=8)
    expected = Expected(64, 64, 16, png_bit_depth=8)
    assert check_row(tmp_path, row, expected)[0].flags == {}
    png = np.asarray(Image.open(tmp_path / row["png_path"])).copy()
    png[5, 7] += 1 if png[5, 7] < 255 else -1  # one sample other than round(v * 255 / 4095)
    result, _ = check_row(tmp_path, rewrite_png(tmp_path, row, png), expected)
    assert list(result.flags) == ["dicom_match"]
    assert "1 of 4096 DICOM pixels differ" in result.flags["dicom_match"]
    assert "round(v * 255 / 4095)" in result.flags["dicom_match"]
    # a 16-bit PNG where the spec asks for 8: its depth is named, its values still match the DICOM
    sixteen = rewrite_png(tmp_path, row, png_values(to_stored(pattern_pixels(), 16), 16))
    result, _ = check_row(tmp_path, sixteen, expected)
    assert list(result.flags) == ["bit_depth"] and "PNG is 16-bit, the spec asks for 8" in result.flags["bit_depth"]


def test_the_verdict_in_memory_is_the_verdict_of_the_files_at_either_png_depth(tmp_path):
    """QC judges the PNG's values where there is a PNG (what loaders read), else the DICOM's: as check_generated."""
    pixels = np.random.default_rng(4).uniform(0.2, 0.8, (64, 64))
    flat = pixels.reshape(-1)
    flat[:778] = 1.0                      # 19 % at full white: under max_saturated_fraction 0.2 ...
    flat[778:983] = 4090 / 4095           # ... 24 % once rounded to 8 bits (4090 -> 255)
    with_png = check_generated(pixels, width=64, height=64, bit_depth=16, png_bit_depth=8)
    assert list(with_png) == ["saturated"] and "24.0% of pixels at full white" in with_png["saturated"]
    row = write_case(tmp_path, pixels, png_bit_depth=8)
    result, _ = check_row(tmp_path, row, Expected(64, 64, 16, png_bit_depth=8))
    assert list(result.flags) == ["saturated"] and "24.0%" in result.flags["saturated"]
    assert check_generated(pixels, width=64, height=64, bit_depth=16) == {}  # the 12 bits of a DICOM alone
    dicom_only = {**row, "png_path": "", "png_sha256": ""}
    assert check_row(tmp_path, dicom_only, Expected(64, 64, 16, ("dicom",)))[0].flags == {}


# ----------------------------------------------------------------------------- the SR and SEG beside each image

LABELLED_SPEC = """\
spec_version: 1
name: qc-sr-seg
seed: 9
count: 3
image: {size: 64}
findings:
  - {finding: pneumonia, weight: 1, location: {right_lower_lobe: 1}, severity: {moderate: 1}}
"""


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    from synthmed import generate, load_spec
    from synthmed.writers.manifest import read_part

    out = tmp_path_factory.mktemp("labelled") / "out"
    spec = load_spec(LABELLED_SPEC)
    generate(spec, out, backend="pattern", progress=False, qc=False)
    rows = read_part(out / "manifest.csv")
    assert all(r["sr_path"] and r["seg_path"] for r in rows)
    return out, spec, rows


def test_check_row_covers_the_sr_and_seg(labelled, tmp_path):
    src, spec, rows = labelled
    out = tmp_path / "out"
    shutil.copytree(src, out)
    row = rows[0]
    expected = Expected.from_spec(spec)
    assert check_row(out, row, expected)[0].flags == {}

    def flags(**changes):
        return check_row(out, {**row, **changes}, expected)[0].flags

    sr, seg = out / row["sr_path"], out / row["seg_path"]
    original = sr.read_bytes()
    sr.write_bytes(original + b"\x00" * 8)
    assert list(flags()) == ["sha256"] and row["sr_path"] in flags()["sha256"]
    sr.write_bytes(original)
    # a SEG file that holds the SR (its sha256 the manifest's): not a SEG
    seg.write_bytes(sr.read_bytes())
    found = flags(seg_sha256=hashlib.sha256(sr.read_bytes()).hexdigest())
    assert list(found) == ["readable"] and "is not a DICOM SEG: its SOP Class is Comprehensive 3D SR Storage" in \
        found["readable"]
    sr.write_bytes(b"not DICOM at all" * 20)
    found = flags(sr_sha256="")
    assert "is not a DICOM file" in found["readable"] and row["sr_path"] in found["readable"]
    sr.unlink()
    assert f"{row['sr_path']} is missing" in flags()["readable"]
    assert "names no DICOM SR beside" in flags(sr_path="", sr_sha256="")["readable"]
    assert "names no DICOM SEG beside" in flags(seg_path="", seg_sha256="")["readable"]
    assert "SEG" not in flags(seg_path="", seg_sha256="", mask_paths="", mask_sha256="").get("readable", "")


@needs_dciodvfy
def test_dciodvfy_sample_checks_the_sr_and_seg_too(labelled, tmp_path):
    from synthmed.qc.dciodvfy import dciodvfy_sample

    src, _, rows = labelled
    out = tmp_path / "out"
    shutil.copytree(src, out)
    section = dciodvfy_sample(out, rows, 2)
    assert section["status"] == "pass" and section["checked"] == 2
    assert section["objects"] == {"image": 2, "sr": 2, "seg": 2} and section["files"] == 6
    ds = pydicom.dcmread(out / rows[1]["sr_path"])
    del ds.CompletionFlag  # Type 1 in the SR Document General module
    ds.save_as(out / rows[1]["sr_path"])
    section = dciodvfy_sample(out, rows, 2)
    assert section["status"] == "fail" and list(section["failures"]) == [rows[1]["case_id"]]
    name = Path(rows[1]["sr_path"]).name
    assert all(line.startswith(f"{name}: Error") for line in section["failures"][rows[1]["case_id"]])


def test_qc_refuses_an_sr_or_seg_path_outside_the_folder(labelled, tmp_path):
    from synthmed.qc import QCError, qc
    from synthmed.writers.manifest import write_part

    src, _, rows = labelled
    out = tmp_path / "out"
    shutil.copytree(src, out)
    for column in ("sr_path", "seg_path"):
        write_part(out / "manifest.csv", [{**rows[0], column: "../elsewhere.dcm"}] + rows[1:])
        with pytest.raises(QCError, match=f"{column} '../elsewhere.dcm'"):
            qc(out, full=False, dciodvfy_sample=0, write=False)
