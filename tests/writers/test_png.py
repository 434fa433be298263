"""PNG writer: exact round trips through Pillow, text chunks, deterministic bytes, 12 stored bits to 8 or 16."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from synthmed.writers.png import png_bytes, png_values, to_stored


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as check:
        check.verify()  # signature, chunk CRCs
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + payload) & 0xFFFFFFFF, kind
        out.append((kind, payload))
        pos += 12 + length
    return out


def test_uint8_round_trip_is_exact():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (13, 7), dtype=np.uint8)  # not square: width and height must not swap
    a[0, 0], a[-1, -1] = 0, 255
    im = decode(png_bytes(a))
    assert im.mode == "L" and im.size == (7, 13)
    got = np.array(im)
    assert got.dtype == np.uint8 and np.array_equal(got, a)


def test_uint16_round_trip_is_exact():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 65536, (9, 11), dtype=np.uint16)
    a[0, :4] = [0, 65535, 0x0102, 0x0201]  # both ends, and byte order
    im = decode(png_bytes(a))
    assert im.mode == "I;16" and im.size == (11, 9)
    got = np.array(im)
    assert np.array_equal(got.astype(np.uint32), a.astype(np.uint32))
    assert got[0, 2] == 0x0102 and got[0, 3] == 0x0201


def test_bool_mask_round_trip():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True
    im = decode(png_bytes(mask))
    assert im.mode == "L" and im.size == (12, 10)
    got = np.array(im)
    assert np.array_equal(got, mask.astype(np.uint8) * 255)


def test_text_chunks_ascii_latin1_and_chinese_in_order():
    text = {"case_id": "case-0000001", "synthetic": "yes", "Description": "café au lait",
            "prompt": "[重点:轻度肺炎][位置:右下肺叶] 右下肺叶肺炎"}
    data = png_bytes(np.zeros((4, 4), np.uint16), text)
    im = decode(data)
    assert im.text == text
    keys = [payload.split(b"\x00", 1)[0].decode("latin-1") for kind, payload in chunks(data)
            if kind in (b"tEXt", b"iTXt")]
    assert keys == list(text)
    kinds = [kind for kind, _ in chunks(data)]
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    assert kinds.index(b"IDAT") > max(i for i, k in enumerate(kinds) if k in (b"tEXt", b"iTXt"))


def test_bytes_are_deterministic_and_independent_of_memory_layout():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 4096, (32, 24), dtype=np.uint16)
    text = {"synthetic": "yes", "prompt": "右肺"}
    first = png_bytes(a, text)
    assert png_bytes(a.copy(), dict(text)) == first
    assert png_bytes(np.asfortranarray(a), text) == first
    wide = np.zeros((32, 48), np.uint16)
    wide[:, ::2] = a
    assert png_bytes(wide[:, ::2], text) == first  # a strided view
    b = a.copy()
    b[5, 5] ^= 1
    assert png_bytes(b, text) != first
    assert png_bytes(a, {"synthetic": "no", "prompt": "右肺"}) != first


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 1), np.uint16),
                                 np.zeros(16, np.uint8), np.zeros((4, 4), np.float32),
                                 np.zeros((4, 4), np.float64), np.zeros((4, 4), np.int32)])
def test_png_bytes_rejects_other_shapes_and_dtypes(bad):
    with pytest.raises(ValueError):
        png_bytes(bad)


def test_png_values_widen_every_12_bit_value_reversibly():
    v = np.arange(4096, dtype=np.uint16)
    w = png_values(v)
    assert w.dtype == np.uint16
    assert np.array_equal(w >> 4, v)
    assert w[0] == 0 and w[4095] == 65535
    assert np.all(np.diff(w.astype(np.int64)) > 0)  # strictly increasing
    assert np.abs(w - v.astype(np.float64) * 65535 / 4095).max() <= 1  # proportional over the full range
    u8 = np.arange(256, dtype=np.uint8)
    assert np.array_equal(png_values(u8), u8) and png_values(u8).dtype == np.uint8
    with pytest.raises(ValueError):
        png_values(v.astype(np.int32))
    assert np.array_equal(png_values(v, 16), w)


def test_png_values_8_bit_is_every_12_bit_value_rounded():
    """#20: the default 8-bit PNG holds round(v * 255 / 4095) of the DICOM's v, exactly (no value is a tie)."""
    from fractions import Fraction

    v = np.arange(4096, dtype=np.uint16)
    got = png_values(v, 8)
    assert got.dtype == np.uint8
    exact = [Fraction(int(x) * 255, 4095) for x in v]
    assert all(f - int(f) != Fraction(1, 2) for f in exact)
    assert got.tolist() == [int(f + Fraction(1, 2)) for f in exact]
    assert got[0] == 0 and got[4095] == 255 and set(got.tolist()) == set(range(256))  # every level, both ends
    assert np.all(np.diff(got.astype(np.int64)) >= 0)


def test_png_values_refuses_depths_it_cannot_make():
    with pytest.raises(ValueError, match="8 stored bits make an 8-bit PNG"):
        png_values(np.zeros((2, 2), np.uint8), 16)
    with pytest.raises(ValueError, match="png_bit_depth must be 8 or 16"):
        png_values(np.zeros((2, 2), np.uint16), 12)


def test_to_stored_ranges_and_rounding():
    x = np.array([[0.0, 1.0, 0.5, -0.2, 1.7]], dtype=np.float32)
    s16 = to_stored(x, 16)
    assert s16.dtype == np.uint16 and s16.tolist() == [[0, 4095, 2048, 0, 4095]]
    s8 = to_stored(x, 8)
    assert s8.dtype == np.uint8 and s8.tolist() == [[0, 255, 128, 0, 255]]
    grid = np.linspace(0, 1, 10001, dtype=np.float64).reshape(1, -1)
    assert to_stored(grid, 16).max() <= 4095


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_to_stored_rejects_nan_and_infinity(value):
    x = np.zeros((4, 4), np.float32)
    x[1, 2] = value
    with pytest.raises(ValueError):
        to_stored(x, 16)
    with pytest.raises(ValueError):
        to_stored(x, 8)


def test_to_stored_rejects_bad_shape_and_depth():
    with pytest.raises(ValueError):
        to_stored(np.zeros((4, 4, 3), np.float32), 16)
    with pytest.raises(ValueError):
        to_stored(np.zeros((4, 4), np.float32), 12)


TINY_SPEC = """\
spec_version: 1
name: png-12-bit
seed: 5
count: 3
image: {size: 64, bit_depth: 16, png_bit_depth: 16, formats: [dicom, png]}
findings:
  - finding: no_finding
    weight: 1
  - finding: pneumonia
    weight: 1
"""


def test_build_path_png_recovers_the_stored_12_bits(tmp_path):
    """#17: through generate, each PNG sample >> 4 is the DICOM's 12-bit value, which is the backend's pixels."""
    import csv

    import pydicom

    from synthmed import generate, load_spec, sample_cases
    from synthmed.backends.pattern import PatternBackend

    spec = load_spec(TINY_SPEC)
    out = tmp_path / "out"
    generate(spec, out, backend="pattern", progress=False, qc=False)
    cases = {c.case_id: c for c in sample_cases(spec)}
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3
    for row in rows:
        want = to_stored(PatternBackend(64, 64).generate([cases[row["case_id"]]], [None])[0].pixels, 16)
        ds = pydicom.dcmread(out / row["dicom_path"])
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
        assert np.array_equal(ds.pixel_array, want), row["case_id"]
        im = decode((out / row["png_path"]).read_bytes())
        assert im.mode == "I;16" and im.size == (64, 64)
        png = np.array(im).astype(np.uint16)
        assert np.array_equal(png >> 4, want), row["case_id"]
        assert np.array_equal(png & 0xF, want >> 8)  # the low bits repeat the top ones: 4095 -> 65535


def test_build_writes_8_bit_pngs_by_default_that_round_the_dicom_values(tmp_path):
    """#20: 8-bit PNG by default (what imagefolder, convert("RGB") and MONAI read right); the DICOM keeps 12 bits."""
    import csv

    import pydicom

    from synthmed import generate, load_spec

    out = tmp_path / "out"
    generate(load_spec(TINY_SPEC.replace(", png_bit_depth: 16", "")), out, backend="pattern", progress=False,
             qc=False)
    with open(out / "manifest.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        assert (row["bit_depth"], row["png_bit_depth"]) == ("16", "8")
        stored = pydicom.dcmread(out / row["dicom_path"]).pixel_array
        assert stored.max() > 255  # the DICOM keeps its full depth
        im = decode((out / row["png_path"]).read_bytes())
        assert im.mode == "L" and im.text["synthetic"] == "yes"
        want = np.floor(stored.astype(np.float64) * 255 / 4095 + 0.5)
        assert np.array_equal(np.array(im), want), row["case_id"]
