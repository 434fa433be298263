"""Per-image quality checks: one read of each file, then cheap tests on the bytes and pixels.

Every check has a name (the word that goes into the manifest's ``qc_flags``), and each image
gets a dict ``{check: message}`` of the checks it failed. Checks on files (:func:`check_row`)
and on a backend's output before it is written (:func:`check_generated`) share the pixel
tests, computed on the stored integer values, so an image that passes in memory passes on disk.

Checks:

- ``readable``: the PNG and DICOM files exist, stay inside the output folder, and decode within the size
  limits (:data:`MAX_IMAGE_PIXELS`, :data:`MAX_DECODED_BYTES`: a decompression bomb is refused before it is
  inflated); the SR and SEG files exist and are DICOM files of their kind (the SOP Class in their file meta).
- ``size``: width x height as the spec says (PNG header and DICOM Rows / Columns).
- ``bit_depth``: PNG bit depth (``image.png_bit_depth``) and DICOM Bits Allocated / Bits Stored
  (``image.bit_depth``) as the spec says.
- ``nan``: no NaN or infinite pixel (images from a backend; integer files cannot hold one).
- ``blank``: the 1st-99th percentile range covers at least ``min_dynamic_range`` of full scale.
- ``saturated``: at most ``max_saturated_fraction`` of the pixels sit at full white (clipped), and at most
  ``max_black_fraction`` at black. Air beside the body is black on real films too (20-40 % of a CR film),
  so black is allowed far more than white.
- ``sha256``: every file's sha256 (PNG, DICOM, SR, SEG, masks) equals the manifest's.
- ``empty_mask``: every mask file marks at least one pixel (a finding the manifest lists is drawn somewhere).
- ``dicom_match``: the PNG's samples are exactly what the writer makes of the DICOM's stored values
  (:func:`synthmed.writers.png.png_values`: ``round(v * 255 / 4095)`` for an 8-bit PNG of 12 stored bits).
The pixel tests (and the set-level figures) judge what loaders read, as a reference set's images are read: the
PNG's values where there is a PNG (``dicom_match`` ties it exactly to the DICOM's), else the DICOM's.

Set-level checks name the images they concern in ``qc_flags`` too: ``intensity`` (:mod:`synthmed.qc.intensity`),
``dciodvfy`` (:mod:`synthmed.qc.dciodvfy`), ``duplicates`` (:mod:`synthmed.qc.duplicates`) and ``memorisation``
(:mod:`synthmed.qc.memorisation`). Every check's name, meaning and default gate is in :mod:`synthmed.qc.registry`.

Example:
    >>> import numpy as np
    >>> flags = check_generated(np.zeros((64, 64), np.float32), width=64, height=64, bit_depth=16)
    >>> sorted(flags)
    ['blank', 'saturated']
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from . import registry
from .check_table import flag_row

if TYPE_CHECKING:  # pragma: no cover
    from .inputs import CheckInputs

# The names, meanings and default gate of the checks are the registry's (synthmed/qc/registry.py).
# check -> what failing it means on an image; the order is the order of qc_flags
CHECKS: dict[str, str] = registry.FLAG_MEANINGS
PER_IMAGE_CHECKS = registry.PER_IMAGE_CHECKS
# the default qc.gate: the per-image checks, dciodvfy, manifest_consistency and label_fidelity
DEFAULT_GATE = registry.DEFAULT_GATE
# what reject-and-regenerate can fix: checks on the pixels a backend made
GENERATED_CHECKS = registry.REGENERABLE_CHECKS

# What qc decodes at most, whatever a header declares: refused beyond, before anything is allocated or inflated.
# 64 Mpixel is 2.5 times a 5k x 5k detector; 512 MiB is that at 64 bits per pixel.
MAX_IMAGE_PIXELS = 64 * 2**20
MAX_DECODED_BYTES = 512 * 2**20
MAX_FILE_BYTES = MAX_DECODED_BYTES      # no file of an image within the limits is larger
MAX_DICOM_HEADER_BYTES = 4 * 2**20      # the data elements before Pixel Data, inflated

HISTOGRAM_BINS = 32
THUMB_SIDE = 32        # residual-hash thumbnails
REGION_SIDE = 64       # region means are taken on a 64 x 64 box-filtered copy

# Fixed boxes on a frontal chest film, as (x0, y0, x1, y1) fractions; the image's left is the
# patient's right. The backends give no anatomy masks, so these stand in for MAISI's organs.
REGIONS: dict[str, tuple[float, float, float, float]] = {
    "whole": (0.0, 0.0, 1.0, 1.0),
    "right_lung": (0.12, 0.2, 0.42, 0.75),
    "left_lung": (0.58, 0.2, 0.88, 0.75),
    "mediastinum": (0.43, 0.15, 0.57, 0.85),
}


@dataclass(frozen=True)
class PixelLimits:
    """Thresholds of the pixel checks, as fractions of full scale."""

    min_dynamic_range: float = 0.05
    max_saturated_fraction: float = 0.2
    max_black_fraction: float = 0.6

    @classmethod
    def from_thresholds(cls, thresholds) -> PixelLimits:
        """The pixel limits of a spec's ``qc.thresholds`` (a ``QCThresholds``)."""
        return cls(min_dynamic_range=thresholds.min_dynamic_range,
                   max_saturated_fraction=thresholds.max_saturated_fraction,
                   max_black_fraction=thresholds.max_black_fraction)


@dataclass(frozen=True)
class Expected:
    """What the spec says every image is."""

    width: int
    height: int
    bit_depth: int  # the stored image, as DICOM holds it: 8 or 16 (16: 12 bits stored)
    formats: tuple[str, ...] = ("dicom", "png")
    png_bit_depth: int | None = None  # the PNG's, 8 or 16; None: the same as bit_depth

    @property
    def png_depth(self) -> int:
        return self.bit_depth if self.png_bit_depth is None else self.png_bit_depth

    @classmethod
    def from_spec(cls, spec) -> Expected:
        """What a spec's ``image:`` section says every image is."""
        return cls(width=spec.image.width, height=spec.image.height, bit_depth=spec.image.bit_depth,
                   formats=spec.image.formats, png_bit_depth=spec.image.png_bit_depth)


@dataclass
class PixelStats:
    """Summary of one image's stored values, as fractions of full scale."""

    mean: float
    std: float
    p1: float
    p50: float
    p99: float
    low_fraction: float    # pixels at 0
    high_fraction: float   # pixels at full scale
    histogram: np.ndarray  # float64 [HISTOGRAM_BINS], sums to 1

    @property
    def dynamic_range(self) -> float:
        return self.p99 - self.p1

    def features(self) -> dict[str, float]:
        """The histogram figures the intensity check bounds."""
        return {"p1": self.p1, "p50": self.p50, "p99": self.p99, "dynamic_range": self.dynamic_range}


@dataclass
class ImageResult:
    """What the per-image checks found for one manifest row."""

    case_id: str
    flags: dict[str, str] = field(default_factory=dict)  # failed check -> message
    stats: PixelStats | None = None
    regions: dict[str, float] = field(default_factory=dict)  # region -> mean, fraction of full scale
    thumb: np.ndarray | None = None  # float16 [THUMB_SIDE, THUMB_SIDE]
    dhash: int | None = None         # filled at set level (residual hash)

    def fail(self, check: str, message: str) -> None:
        if check in self.flags:
            self.flags[check] += "; " + message
        else:
            self.flags[check] = message

    @property
    def flag_names(self) -> list[str]:
        return [c for c in CHECKS if c in self.flags]


# ----------------------------------------------------------------------------- decoding

class ImageTooLarge(ValueError):
    """An image declares more pixels or bytes than qc decodes (:data:`MAX_IMAGE_PIXELS`, :data:`MAX_DECODED_BYTES`)."""


def check_declared_size(what: str, width: int, height: int, bits_per_pixel: int, frames: int = 1) -> int:
    """The decoded size in bytes an image header declares; raises :class:`ImageTooLarge` beyond the limits.

    Example:
        >>> check_declared_size("PNG", 256, 256, 16)
        131072
    """
    pixels = int(width) * int(height) * max(int(frames), 1)
    decoded = pixels * max(int(bits_per_pixel), 1) // 8
    if pixels > MAX_IMAGE_PIXELS or decoded > MAX_DECODED_BYTES:
        frames_text = f" x {frames} frames" if frames > 1 else ""
        raise ImageTooLarge(
            f"{what} declares {width}x{height}{frames_text} pixels at {bits_per_pixel} bits "
            f"({decoded / 2**20:,.0f} MiB decoded), above the limit qc decodes "
            f"({MAX_IMAGE_PIXELS // 2**20} Mpixel, {MAX_DECODED_BYTES // 2**20} MiB)")
    return decoded


def _inflate(data: bytes, limit: int, wbits: int = zlib.MAX_WBITS, inflater=None) -> bytes:
    """Inflate ``data``, refusing (ValueError) more than ``limit`` bytes of output: the cap holds while inflating."""
    inflater = inflater or zlib.decompressobj(wbits)
    parts, total, pending = [], 0, data
    while not inflater.eof:
        chunk = inflater.decompress(pending, min(limit - total + 1, 1 << 24))  # max_length >= 1: 0 means no cap
        pending = inflater.unconsumed_tail
        total += len(chunk)
        if total > limit:
            raise ValueError(f"the compressed data inflate to more than {limit:,} bytes")
        parts.append(chunk)
        if not chunk and not pending:
            break  # truncated: the caller compares the length with what it expects
    return b"".join(parts)


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def decode_png(data: bytes) -> tuple[np.ndarray, int]:
    """Decode a grayscale PNG: (pixels uint8 or uint16 [H, W], bit depth).

    Unfiltered, non-interlaced grayscale (what synthmed writes) is decoded with zlib alone;
    anything else goes through Pillow. The header's size is checked against the limits before anything
    is inflated, and inflating stops at the size the header declares. Raises ValueError when the bytes
    are not a PNG image, or :class:`ImageTooLarge` (a ValueError) beyond the limits.

    Example:
        >>> from synthmed.writers.png import png_bytes
        >>> pixels, depth = decode_png(png_bytes(np.arange(12, dtype=np.uint16).reshape(3, 4)))
        >>> depth, int(pixels[2, 3])
        (16, 11)
    """
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file (bad signature)")
    pos, header, idat = 8, None, []
    try:
        while pos < len(data):
            length, kind = struct.unpack(">I4s", data[pos:pos + 8])
            payload = data[pos + 8:pos + 8 + length]
            if len(payload) != length:
                raise ValueError("truncated PNG chunk")
            if kind == b"IHDR":
                header = struct.unpack(">IIBBBBB", payload)
            elif kind == b"IDAT":
                idat.append(payload)
            elif kind == b"IEND":
                break
            pos += 12 + length
    except struct.error:
        raise ValueError("truncated PNG") from None
    if header is None or not idat:
        raise ValueError("PNG without IHDR or IDAT")
    width, height, depth, colour, _, _, interlace = header
    if width == 0 or height == 0 or colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise ValueError(f"PNG header is invalid (width {width}, height {height}, bit depth {depth}, "
                         f"colour type {colour})")
    check_declared_size("PNG", width, height, depth * _PNG_CHANNELS[colour])
    if colour == 0 and interlace == 0 and depth in (8, 16):
        row = 1 + width * depth // 8
        try:
            raw = _inflate(b"".join(idat), row * height)
        except (zlib.error, ValueError) as e:
            raise ValueError(f"PNG image data do not decompress to the {row * height:,} bytes its header "
                             f"declares: {e}") from None
        if len(raw) != row * height:
            raise ValueError(f"PNG image data hold {len(raw)} bytes, expected {row * height}")
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, row)
        if not rows[:, 0].any():  # every row unfiltered: the samples are the bytes
            samples = rows[:, 1:]
            if depth == 16:
                return samples.copy().view(">u2").astype(np.uint16), 16
            return samples.copy(), 8
    return _decode_png_pillow(data, depth)


def _decode_png_pillow(data: bytes, depth: int) -> tuple[np.ndarray, int]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode not in ("L", "I;16", "I;16B", "I", "1"):
                im = im.convert("L")
                depth = 8
            pixels = np.asarray(im)
    except Exception as e:  # Pillow raises many kinds on a broken file
        raise ValueError(f"PNG does not decode: {e}") from None
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255, 8
    if depth == 16 or pixels.dtype.itemsize > 1:
        return np.clip(pixels, 0, 65535).astype(np.uint16), 16
    return pixels.astype(np.uint8), 8


@dataclass
class DicomPixels:
    pixels: np.ndarray
    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int


def decode_dicom(data: bytes) -> DicomPixels:
    """Read a DICOM file's pixels and their geometry with pydicom. Raises ValueError when it does not decode.

    Rows x Columns x frames is checked against the limits before any pixel is decoded; a deflated
    transfer syntax is inflated with a cap (the header first, then no more than the pixels it declares).
    """
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        ds = _read_dicom(data)
        rows, columns, allocated = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        samples, frames = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("NumberOfFrames", 1) or 1)
        check_declared_size("DICOM", columns, rows, allocated * samples, frames)
        syntax = ds.file_meta.get("TransferSyntaxUID")
        plain = (syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) and allocated in (8, 16)
                 and samples == 1 and int(ds.get("PixelRepresentation", 0)) == 0 and frames == 1)
        if plain:  # what synthmed writes: the pixels are the bytes, no decoder needed (twice as fast)
            raw = np.frombuffer(ds.PixelData, dtype="<u2" if allocated == 16 else np.uint8)
            if raw.size < rows * columns:
                raise ValueError(f"Pixel Data holds {raw.size} values, Rows x Columns is {rows * columns}")
            pixels = raw[: rows * columns].reshape(rows, columns)
            stored = int(ds.BitsStored)
            if stored < allocated:
                pixels = pixels & ((1 << stored) - 1)
            pixels = pixels.astype(np.uint16 if allocated == 16 else np.uint8)
        else:
            pixels = np.asarray(ds.pixel_array)
        return DicomPixels(pixels=pixels, rows=rows, columns=columns, bits_allocated=allocated,
                           bits_stored=int(ds.BitsStored))
    except ImageTooLarge:
        raise
    except Exception as e:  # pydicom raises many kinds on a broken file
        raise ValueError(f"DICOM does not decode: {type(e).__name__}: {e}") from None


def read_file_meta(fp):
    """The File Meta group (0002,eeee) of a DICOM file, ``fp`` positioned after its preamble; ``fp`` ends at the
    dataset. Parsed as pydicom's own reader does, with its public :func:`pydicom.filereader.read_dataset`: as
    Explicit VR Little Endian (PS3.10 7.1), read again as Implicit VR where a writer wrote it so.

    Example:
        >>> fp = open("out/pneumonia/sr/train/case-0000000.dcm", "rb")  # doctest: +SKIP
        >>> pydicom.filereader.read_preamble(fp, False)  # doctest: +SKIP
        >>> read_file_meta(fp).MediaStorageSOPClassUID.name  # doctest: +SKIP
        'Comprehensive 3D SR Storage'
    """
    from pydicom.charset import default_encoding
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset

    def after_group_2(tag, vr, length) -> bool:
        return tag >> 16 != 2

    start = fp.tell()
    for implicit in (False, True):
        fp.seek(start)
        meta = FileMetaDataset(read_dataset(fp, is_implicit_VR=implicit, is_little_endian=True,
                                            stop_when=after_group_2))
        meta.set_original_encoding(is_implicit_vr=implicit, is_little_endian=True,
                                   character_encoding=default_encoding)
        elements = list(meta.elements())
        if implicit or not elements:
            return meta
        try:  # an element read as explicit VR that is not: pydicom cannot decode it (its issue #503)
            meta[elements[0].tag]
        except NotImplementedError:
            continue
        return meta
    return meta  # pragma: no cover - the loop returns


def _read_dicom(data: bytes):
    """pydicom's dataset of a file, with a deflated dataset inflated under a cap (pydicom inflates it whole)."""
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    fp = io.BytesIO(data)
    preamble = read_preamble(fp, False)
    meta = read_file_meta(fp)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return pydicom.dcmread(io.BytesIO(data))
    # PS3.5 A.5: everything after the file meta is deflated. Inflate the header (up to Pixel Data) first,
    # check its declared size, then inflate no more than the pixels it declares.
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = inflater.decompress(data[fp.tell():], MAX_DICOM_HEADER_BYTES)
    try:
        header = read_dataset(DicomBytesIO(head), False, True,
                              stop_when=lambda tag, vr, length: tag == 0x7FE00010)
        rows, columns = int(header.Rows), int(header.Columns)
        allocated, samples = int(header.BitsAllocated), int(header.get("SamplesPerPixel", 1) or 1)
        frames = int(header.get("NumberOfFrames", 1) or 1)
    except (AttributeError, EOFError, ValueError, TypeError):
        raise ValueError(f"its deflated header holds no Rows, Columns and Bits Allocated in its first "
                         f"{MAX_DICOM_HEADER_BYTES // 2**20} MiB") from None
    declared = check_declared_size("DICOM", columns, rows, allocated * samples, frames)
    rest = _inflate(inflater.unconsumed_tail, declared + MAX_DICOM_HEADER_BYTES, inflater=inflater)
    dataset = read_dataset(DicomBytesIO(head + rest), False, True)
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian  # the inflated bytes are that syntax
    return pydicom.dataset.FileDataset(None, dataset, preamble, meta, False, True)


def stored_values(png: np.ndarray, depth: int) -> tuple[np.ndarray, int]:
    """PNG samples -> (the values to judge, their full scale): 16-bit PNGs hold 12 stored bits (``>> 4``), 8-bit
    PNGs their own 8 bits."""
    if depth == 16:
        return png >> 4, 4095
    return png, 255


# ----------------------------------------------------------------------------- pixel tests

def pixel_stats(values: np.ndarray, full_scale: int) -> PixelStats:
    """Histogram figures of integer stored values in ``[0, full_scale]`` (one ``bincount``, no sort).

    Example:
        >>> s = pixel_stats(np.array([[0, 255], [255, 255]], np.uint8), 255)
        >>> s.mean, s.high_fraction, s.low_fraction
        (0.75, 0.75, 0.25)
    """
    flat = values.reshape(-1)
    counts = np.bincount(flat, minlength=full_scale + 1)[: full_scale + 1].astype(np.float64)
    n = float(flat.size)
    levels = np.arange(full_scale + 1, dtype=np.float64) / full_scale
    mean = float(counts @ levels / n)
    std = float(np.sqrt(max(counts @ (levels * levels) / n - mean * mean, 0.0)))
    cdf = np.cumsum(counts) / n
    p1, p50, p99 = (float(np.searchsorted(cdf, q, side="left")) / full_scale for q in (0.01, 0.5, 0.99))
    edges = np.linspace(0, full_scale + 1, HISTOGRAM_BINS + 1).astype(np.int64)
    histogram = np.add.reduceat(counts, edges[:-1]) / n
    return PixelStats(mean=mean, std=std, p1=p1, p50=p50, p99=p99, low_fraction=float(counts[0] / n),
                      high_fraction=float(counts[full_scale] / n), histogram=histogram)


def pixel_flags(stats: PixelStats, limits: PixelLimits = PixelLimits()) -> dict[str, str]:
    """``blank`` and ``saturated`` from an image's stats, each with a message giving the figure.

    Saturation is clipping at the top of the range (white: bone and metal never fill a fifth of a film) or a
    film mostly black (air beside the body is black on real films too, 20-40 % of a CR film, so black is
    allowed up to ``max_black_fraction``, by default 0.6).
    """
    flags = {}
    if stats.dynamic_range < limits.min_dynamic_range:
        flags["blank"] = (f"1st-99th percentile range {stats.dynamic_range:.4f} of full scale "
                          f"< min_dynamic_range {limits.min_dynamic_range:g}")
    saturated = []
    if stats.high_fraction > limits.max_saturated_fraction:
        saturated.append(f"{100 * stats.high_fraction:.1f}% of pixels at full white "
                         f"> max_saturated_fraction {limits.max_saturated_fraction:g}")
    if stats.low_fraction > limits.max_black_fraction:
        saturated.append(f"{100 * stats.low_fraction:.1f}% of pixels at black "
                         f"> max_black_fraction {limits.max_black_fraction:g}")
    if saturated:
        flags["saturated"] = "; ".join(saturated)
    return flags


def check_generated(pixels: np.ndarray, *, width: int, height: int, bit_depth: int,
                    png_bit_depth: int | None = None, limits: PixelLimits = PixelLimits()) -> dict[str, str]:
    """The pixel checks on a backend's float image, before it is written (for reject-and-regenerate).

    The image is stored exactly as the writers store it, so the verdict equals the one the file gets.

    Args:
        pixels: float [H, W] in [0, 1].
        width, height, bit_depth: what the spec asks for.
        png_bit_depth: the PNG's depth where a PNG is written (its values are judged then, as :func:`check_row`
            judges them); None judges the stored values (a DICOM alone).

    Returns:
        {check: message} of the failed checks among ``size``, ``nan``, ``blank``, ``saturated``.
    """
    from ..writers.png import to_stored

    flags: dict[str, str] = {}
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.shape != (height, width):
        flags["size"] = f"{'x'.join(map(str, pixels.shape[::-1]))} image, the spec asks for {width}x{height}"
        return flags
    finite = np.isfinite(pixels)
    if not finite.all():
        flags["nan"] = f"{int(pixels.size - finite.sum())} NaN or infinite pixels"
        return flags
    from ..writers.png import png_values

    stored = to_stored(pixels, bit_depth)
    if png_bit_depth is not None:
        stored, _ = stored_values(png_values(stored, png_bit_depth), png_bit_depth)
    flags.update(pixel_flags(pixel_stats(stored, 4095 if stored.dtype == np.uint16 else 255), limits))
    return flags


def box_downsample(image: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """Float32 [height, width] box-filtered copy of a 2-D image (exact block means when the sizes divide).

    Example:
        >>> box_downsample(np.arange(16, dtype=np.float32).reshape(4, 4), 2).tolist()
        [[2.5, 4.5], [10.5, 12.5]]
    """
    width = height if width is None else width
    h, w = image.shape
    if (h, w) == (height, width):
        return np.asarray(image, dtype=np.float32)
    if h % height == 0 and w % width == 0:
        return image.reshape(height, h // height, width, w // width).mean(axis=(1, 3), dtype=np.float32)
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
                      .resize((width, height), Image.Resampling.BOX), dtype=np.float32)


_REGION_MASKS: dict[int, dict[str, np.ndarray]] = {}


def region_masks(side: int = REGION_SIDE) -> dict[str, np.ndarray]:
    """Boolean [side, side] masks of :data:`REGIONS`."""
    if side not in _REGION_MASKS:
        masks = {}
        for name, (x0, y0, x1, y1) in REGIONS.items():
            mask = np.zeros((side, side), dtype=bool)
            mask[int(round(y0 * side)):int(round(y1 * side)), int(round(x0 * side)):int(round(x1 * side))] = True
            masks[name] = mask
        _REGION_MASKS[side] = masks
    return _REGION_MASKS[side]


def region_means(small: np.ndarray) -> dict[str, float]:
    """Mean of each region of :data:`REGIONS` on a [REGION_SIDE, REGION_SIDE] image."""
    from .metrics import region_stats

    return {name: region_stats(small, mask)[0] for name, mask in region_masks(small.shape[0]).items()}


# ----------------------------------------------------------------------------- one row

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_limited(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """A file's bytes; ValueError (naming the limit) when it is larger than ``limit``, before reading it."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise ImageTooLarge(f"the file is {size / 2**20:,.0f} MiB, above the {limit // 2**20} MiB qc reads")
        return fh.read(limit + 1)


def _read(out: Path, rel: str) -> bytes | str:
    """The bytes of a manifest path, or why not (missing, outside the folder, too large) as a message."""
    if not inside_folder(rel):
        return f"{rel} is outside the output folder"
    try:
        return read_limited(out / rel)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return f"{rel} is missing"
    except ImageTooLarge as e:
        return f"{rel}: {e}"
    except OSError as e:
        return f"{rel} cannot be read: {e.strerror or e}"


def inside_folder(rel: str) -> bool:
    """Whether a manifest path is relative and stays inside its folder by its words (no '..', not absolute)."""
    path = Path(rel)
    return bool(rel) and not path.is_absolute() and ".." not in path.parts and "\x00" not in rel


def check_row(out: Path, row: Mapping[str, str], expected: Expected,
              limits: PixelLimits = PixelLimits()) -> tuple[ImageResult, np.ndarray | None]:
    """Run the per-image checks on one manifest row's files; each file is read once.

    Args:
        out: the output folder the row's paths are relative to.
        row: a manifest row (``png_path``, ``png_sha256``, ``dicom_path``, ...).
        expected: what the spec says the image is.

    Returns:
        (result, pixels): pixels are float32 [H, W] in [0, 1] (the PNG's, else the DICOM's), or
        None when no image decoded.
    """
    result = ImageResult(case_id=row.get("case_id", ""))
    png, png_depth = None, expected.png_depth
    # 1. PNG: bytes -> sha256 -> pixels -> size and depth
    if row.get("png_path"):
        data = _read(out, row["png_path"])
        if isinstance(data, str):
            result.fail("readable", data)
        else:
            if row.get("png_sha256") and _sha256(data) != row["png_sha256"]:
                result.fail("sha256", f"{row['png_path']} does not match the manifest's sha256")
            try:
                png, png_depth = decode_png(data)
            except ValueError as e:
                result.fail("readable", f"{row['png_path']}: {e}")
            else:
                if png.shape != (expected.height, expected.width):
                    result.fail("size", f"PNG is {png.shape[1]}x{png.shape[0]}, the spec asks for "
                                        f"{expected.width}x{expected.height}")
                if png_depth != expected.png_depth:
                    result.fail("bit_depth", f"PNG is {png_depth}-bit, the spec asks for {expected.png_depth}")
    elif "png" in expected.formats:
        result.fail("readable", "the manifest names no PNG file")
    stored = None
    if png is not None:  # what loaders read is what is judged
        stored, full_scale = stored_values(png, png_depth)
    # 2. DICOM: bytes -> sha256 -> pixels -> geometry, then the PNG made from its values
    if row.get("dicom_path"):
        data = _read(out, row["dicom_path"])
        if isinstance(data, str):
            result.fail("readable", data)
        else:
            if row.get("dicom_sha256") and _sha256(data) != row["dicom_sha256"]:
                result.fail("sha256", f"{row['dicom_path']} does not match the manifest's sha256")
            try:
                dicom = decode_dicom(data)
            except ValueError as e:
                result.fail("readable", f"{row['dicom_path']}: {e}")
            else:
                _check_dicom(result, dicom, expected, png, png_depth)
                if stored is None and dicom.pixels.ndim == 2:
                    full_scale = (1 << dicom.bits_stored) - 1
                    stored = np.clip(dicom.pixels, 0, full_scale).astype(np.uint16 if full_scale > 255 else np.uint8)
    elif "dicom" in expected.formats:
        result.fail("readable", "the manifest names no DICOM file")
    # 3. the DICOM SR and SEG beside the image: sha256, and each is a DICOM object of its kind
    _check_labels_objects(out, row, result)
    # 4. masks: sha256, and something marked (a finding labelled but not drawn is a wrong label)
    if row.get("mask_paths"):
        for rel, digest in zip(row["mask_paths"].split("|"), (row.get("mask_sha256") or "").split("|")):
            data = _read(out, rel)
            if isinstance(data, str):
                result.fail("readable", data)
                continue
            if digest and _sha256(data) != digest:
                result.fail("sha256", f"{rel} does not match the manifest's sha256")
            try:
                mask, _ = decode_png(data)
            except ValueError as e:
                result.fail("readable", f"{rel}: {e}")
                continue
            if not mask.any():
                result.fail("empty_mask", f"{rel} marks no pixel: the manifest lists the finding, the mask shows "
                                          "nothing of it")
    if stored is None:
        return result, None
    # 5. pixels: histogram figures, blank, saturated; small copies for the set-level checks
    result.stats = pixel_stats(stored, full_scale)
    for check, message in pixel_flags(result.stats, limits).items():
        result.fail(check, message)
    pixels = stored.astype(np.float32) * np.float32(1.0 / full_scale)
    if min(pixels.shape) >= REGION_SIDE:
        small = box_downsample(pixels, REGION_SIDE)
        result.regions = region_means(small)
        result.thumb = box_downsample(small, THUMB_SIDE).astype(np.float16)
    elif min(pixels.shape) >= 1:
        result.thumb = box_downsample(pixels, THUMB_SIDE).astype(np.float16)
    return result, pixels


def _check_dicom(result: ImageResult, dicom: DicomPixels, expected: Expected, png: np.ndarray | None,
                 png_depth: int) -> None:
    from ..writers.png import png_values

    if (dicom.columns, dicom.rows) != (expected.width, expected.height):
        result.fail("size", f"DICOM is {dicom.columns}x{dicom.rows}, the spec asks for "
                            f"{expected.width}x{expected.height}")
    want = (16, 12) if expected.bit_depth == 16 else (8, 8)
    if (dicom.bits_allocated, dicom.bits_stored) != want:
        result.fail("bit_depth", f"DICOM has Bits Allocated {dicom.bits_allocated}, Bits Stored "
                                 f"{dicom.bits_stored}; the spec asks for {want[0]} and {want[1]}")
    if png is None:
        return
    if dicom.pixels.shape != png.shape:
        result.fail("dicom_match", f"DICOM pixels are {dicom.pixels.shape}, the PNG's {png.shape}")
        return
    try:  # the PNG the writer makes of these stored values, exactly
        made = png_values(dicom.pixels, png_depth)
    except ValueError as e:
        result.fail("dicom_match", f"a {png_depth}-bit PNG cannot be compared with {dicom.bits_stored}-bit "
                                   f"DICOM pixels: {e}")
        return
    if not np.array_equal(made, png):
        differ = int(np.count_nonzero(made != png))
        rule = {(16, 8): "round(v * 255 / 4095)", (16, 16): "(v << 4) | (v >> 8)", (8, 8): "v"}.get(
            (8 * dicom.pixels.dtype.itemsize, png_depth), "?")
        result.fail("dicom_match", f"{differ} of {png.size} DICOM pixels differ from the PNG's (a {png_depth}-bit "
                                   f"PNG holds {rule} of the DICOM's value v)")


# the objects beside the image: manifest column -> (what it is, the end of its SOP Class name in pydicom)
LABEL_OBJECTS = {"sr": ("SR", "SR Storage"), "seg": ("SEG", "Segmentation Storage")}


def _check_labels_objects(out: Path, row: Mapping[str, str], result: ImageResult) -> None:
    """sha256 and kind of the row's DICOM SR and SEG; a missing one is ``readable``, where the row says there is one.

    Only the file meta is parsed (a few microseconds); dciodvfy checks a sample of them in full.
    """
    from pydicom.filereader import read_preamble
    from pydicom.uid import UID

    for kind, (what, sop_class) in LABEL_OBJECTS.items():
        rel = row.get(f"{kind}_path")
        if not rel:
            # a synthmed manifest has the column; there every DICOM image has an SR, and a SEG where it has masks
            owed = f"{kind}_path" in row and row.get("dicom_path") and (kind == "sr" or row.get("mask_paths"))
            if owed:
                result.fail("readable", f"the manifest names no DICOM {what} beside {row['dicom_path']}")
            continue
        data = _read(out, rel)
        if isinstance(data, str):
            result.fail("readable", data)
            continue
        if row.get(f"{kind}_sha256") and _sha256(data) != row[f"{kind}_sha256"]:
            result.fail("sha256", f"{rel} does not match the manifest's sha256")
        try:
            fp = io.BytesIO(data)
            read_preamble(fp, False)
            name = UID(str(read_file_meta(fp).MediaStorageSOPClassUID)).name
        except Exception as e:  # pydicom raises many kinds on a broken file
            result.fail("readable", f"{rel} is not a DICOM file: {type(e).__name__}: {e}")
            continue
        if not name.endswith(sop_class):
            result.fail("readable", f"{rel} is not a DICOM {what}: its SOP Class is {name}")


# ----------------------------------------------------------------------------- the report's rows

# The per-image checks that apply to some rows only: which, and what the table says when none has it
APPLIES_TO = {"dicom_match": (lambda row: bool(row.get("png_path") and row.get("dicom_path")),
                              "no row has both a PNG and a DICOM file (image.formats): nothing to compare"),
              "empty_mask": (lambda row: bool(row.get("mask_paths")), "no row has a mask: nothing to check")}


def table_rows(section: None, inputs: CheckInputs) -> dict[str, dict]:
    """The check table's rows of the per-image checks: how many images each flagged (of those it applies to), with
    its limit or note."""
    rows = {}
    for check in registry.get_family(None).checks:
        entry = flag_row(check, inputs.results, inputs.gate)
        if check.name in APPLIES_TO:
            applies, none = APPLIES_TO[check.name]
            entry["checked"] = sum(applies(row) for row in inputs.rows)
            if not entry["checked"]:
                entry["note"] = none
        if check.note:
            entry["note"] = check.note
        if check.threshold:
            entry["threshold"] = getattr(inputs.thresholds, check.threshold)
        rows[check.name] = entry
    return rows
